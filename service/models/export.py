"""ONNX export of the three pipeline roles, each checked against its torch module on random inputs.

- ``detector``: the ultralytics model's raw head, images (B, 3, S, S) → output0 (B, 4 + nc, A); batch dynamic.
- ``sam2_image_encoder``: images (B, 3, S, S) → image_embed, high_res_0, high_res_1; batch dynamic.
- ``sam2_mask_decoder``: one image's features (batch 1) + B prompts of P points (both dynamic) + optional
  mask input → single_masks, single_iou, multi_masks, multi_iou (see ``sam_ops.decode``).
All use the TorchScript-based exporter (opset 17), the path measured to work offline here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models import sam_ops
from service.models.graphs import IO
from service.models.roles import Role

OPSET = 17


@dataclasses.dataclass(frozen=True)
class ExportReport:
    role: Role
    path: Path
    max_abs_diff: float  # ONNX Runtime vs torch on random inputs, worst output element
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class _DetectorHead(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, tuple | list) else out


class _Encoder(torch.nn.Module):
    def __init__(self, sam: Any) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sam_ops.image_features(self.sam, images)


class _Decoder(torch.nn.Module):
    def __init__(self, sam: Any) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels, mask_input, has_mask_input):  # type: ignore[no-untyped-def]
        return sam_ops.decode(
            self.sam, image_embed, high_res_0, high_res_1, point_coords, point_labels, mask_input, has_mask_input
        )


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic: dict[str, dict[int, str]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def _max_diff(path: Path, module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in feeds.values()))
    want = want if isinstance(want, tuple | list) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


def export_detector(model: torch.nn.Module, imgsz: int, path: Path) -> ExportReport:
    head = _DetectorHead(model)
    names, outs = IO[Role.DETECTOR].inputs, IO[Role.DETECTOR].outputs
    dynamic = {n: {0: "batch"} for n in (*names, *outs)}
    _export(head, (torch.zeros(1, 3, imgsz, imgsz),), path, names, outs, dynamic)
    rng = np.random.default_rng(0)
    diff = _max_diff(path, head, {names[0]: rng.random((2, 3, imgsz, imgsz), dtype=np.float32)})
    return ExportReport(Role.DETECTOR, path, diff, names, outs)


def export_encoder(sam: Any, path: Path) -> ExportReport:
    s = int(sam.image_size)
    encoder = _Encoder(sam)
    names, outs = IO[Role.SAM2_IMAGE_ENCODER].inputs, IO[Role.SAM2_IMAGE_ENCODER].outputs
    dynamic = {n: {0: "batch"} for n in (*names, *outs)}
    _export(encoder, (torch.zeros(1, 3, s, s),), path, names, outs, dynamic)
    rng = np.random.default_rng(0)
    diff = _max_diff(path, encoder, {names[0]: rng.standard_normal((2, 3, s, s), dtype=np.float32)})
    return ExportReport(Role.SAM2_IMAGE_ENCODER, path, diff, names, outs)


def export_decoder(sam: Any, path: Path) -> ExportReport:
    s = int(sam.image_size)
    decoder = _Decoder(sam)
    with torch.no_grad():
        embed, hr0, hr1 = sam_ops.image_features(sam, torch.zeros(1, 3, s, s))

    def example(b: int, p: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "image_embed": rng.standard_normal(embed.shape, dtype=np.float32),
            "high_res_0": rng.standard_normal(hr0.shape, dtype=np.float32),
            "high_res_1": rng.standard_normal(hr1.shape, dtype=np.float32),
            "point_coords": rng.uniform(0, s, (b, p, 2)).astype(np.float32),
            "point_labels": rng.integers(0, 4, (b, p)).astype(np.int32),
            "mask_input": rng.standard_normal((b, 1, s // 4, s // 4), dtype=np.float32),
            "has_mask_input": (rng.random(b) < 0.5).astype(np.float32),
        }

    names, outs = IO[Role.SAM2_MASK_DECODER].inputs, IO[Role.SAM2_MASK_DECODER].outputs
    assert names == tuple(example(1, 1, np.random.default_rng(0))), "example feeds follow the graph's inputs"
    dynamic = {
        "point_coords": {0: "prompts", 1: "points"},
        "point_labels": {0: "prompts", 1: "points"},
        "mask_input": {0: "prompts"},
        "has_mask_input": {0: "prompts"},
        **{o: {0: "prompts"} for o in outs},
    }
    args = tuple(torch.from_numpy(v) for v in example(2, 3, np.random.default_rng(1)).values())
    _export(decoder, args, path, names, outs, dynamic)
    rng = np.random.default_rng(2)
    diff = max(_max_diff(path, decoder, example(b, p, rng)) for b, p in ((1, 2), (7, 3), (4, 5)))
    return ExportReport(Role.SAM2_MASK_DECODER, path, diff, names, outs)
