"""ONNX export of the three pipeline roles, each checked against its torch module on random inputs.

- ``detector``: the ultralytics model's raw head, images (B, 3, S, S) → output0 (B, 4 + nc, A); batch dynamic.
  An open-vocabulary detector (YOLOE) also takes ``class_embeddings`` (B, C, D): the class count C is dynamic,
  so a new vocabulary needs no re-export; its two prompt encoders are exported beside it:
  ``text_encoder`` (MiniLM token ids → class embeddings, the checkpoint's projection and text head included)
  and ``visual_prompt_encoder`` (images + region masks → class embeddings, YOLOE's SAVPE).
- ``sam2_image_encoder``: images (B, 3, S, S) → image_embed, high_res_0, high_res_1; batch dynamic.
- ``sam2_mask_decoder``: one image's features (batch 1) + B prompts of P points (both dynamic) + optional
  mask input → single_masks, single_iou, multi_masks, multi_iou (see ``sam_ops.decode``).
All use the TorchScript-based exporter (opset 17), the path measured to work offline here.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models import open_vocabulary, sam_ops
from service.models.graphs import IO, OPEN_DETECTOR_IO
from service.models.loading import head_output
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
        return head_output(self.model(images))


class _OpenDetectorHead(torch.nn.Module):
    """An open-vocabulary detector with its class embeddings as an input (``open_vocabulary.detect``)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        return open_vocabulary.detect(self.model, images, class_embeddings)


class _VisualPromptEncoder(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, visuals: torch.Tensor) -> torch.Tensor:
        return open_vocabulary.visual_prompt_embeddings(self.model, images, visuals)


class _TextEncoder(torch.nn.Module):
    """MiniLM (mean pooling, L2 norm) → the fixed projection → the detector's text head."""

    projection: torch.Tensor

    def __init__(self, transformer: Any, projection: np.ndarray, model: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.register_buffer("projection", torch.from_numpy(projection))
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        features = torch.nn.functional.normalize(pooled, dim=-1) @ self.projection
        return open_vocabulary.class_embeddings_from_text(self.model, features[None])[0]


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
    # The tracer's and exporter's warnings (advanced indexing in this opset, tensors read as Python values) are
    # ignored: every exported graph is checked against torch on the same inputs (_max_diff), which is the gate.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


def export_open_detector(model: Any, imgsz: int, class_dim: int, path: Path) -> ExportReport:
    """An open-vocabulary detector with a dynamic class count; checked at other batch sizes and class counts
    than the one traced with, against ultralytics' own ``predict`` (not only against the traced function)."""
    head = _OpenDetectorHead(model)
    io = OPEN_DETECTOR_IO
    dynamic = {
        "images": {0: "batch"},
        "class_embeddings": {0: "batch", 1: "classes"},
        "output0": {0: "batch", 1: "boxes_and_classes"},
    }
    example = (torch.zeros(1, 3, imgsz, imgsz), torch.zeros(1, 3, class_dim))
    _export(head, example, path, io.inputs, io.outputs, dynamic)
    rng = np.random.default_rng(0)
    diff = 0.0
    for b, c in ((2, 1), (1, 7)):
        feeds = {
            "images": rng.random((b, 3, imgsz, imgsz), dtype=np.float32),
            "class_embeddings": rng.standard_normal((b, c, class_dim), dtype=np.float32),
        }
        diff = max(diff, _max_diff(path, _UltralyticsPredict(model), feeds))
    return ExportReport(Role.DETECTOR, path, diff, io.inputs, io.outputs)


class _UltralyticsPredict(torch.nn.Module):
    """The reference for the open detector graph: ultralytics' own ``predict`` with the class embeddings given
    (YOLOE: as ``vpe``, which its visual branch passes on unchanged when 3-D; YOLO-World: as ``txt_feats``, with
    the head's ``nc`` set as its ``set_classes`` would). Mutates the module: for export-time checks only."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        classes = class_embeddings.shape[1]
        if type(self.model).__name__ in open_vocabulary.WORLD_KINDS:
            self.model.model[-1].nc = classes
            return head_output(self.model.predict(images, txt_feats=class_embeddings))
        return head_output(self.model.predict(images, vpe=class_embeddings))[:, : 4 + classes]


def export_visual_prompt_encoder(model: Any, imgsz: int, path: Path) -> ExportReport:
    """YOLOE's SAVPE: images (B, 3, S, S) + region masks (B, K, S/8, S/8), K dynamic → (B, K, D)."""
    encoder = _VisualPromptEncoder(model)
    io = IO[Role.VISUAL_PROMPT_ENCODER]
    side = imgsz // 8
    dynamic = {
        "images": {0: "batch"},
        "visuals": {0: "batch", 1: "prompts"},
        "visual_embeddings": {0: "batch", 1: "prompts"},
    }
    example = (torch.zeros(1, 3, imgsz, imgsz), torch.zeros(1, 2, side, side))
    _export(encoder, example, path, io.inputs, io.outputs, dynamic)
    rng = np.random.default_rng(0)
    diff = 0.0
    for b, k in ((1, 1), (2, 4)):
        feeds = {
            "images": rng.random((b, 3, imgsz, imgsz), dtype=np.float32),
            "visuals": (rng.random((b, k, side, side)) < 0.2).astype(np.float32),
        }
        diff = max(diff, _max_diff(path, encoder, feeds))
    return ExportReport(Role.VISUAL_PROMPT_ENCODER, path, diff, io.inputs, io.outputs)


def export_text_encoder(transformer: Any, projection: np.ndarray, model: Any, path: Path) -> ExportReport:
    """Token ids (N, L) + mask (N, L), both dynamic → (N, D) class embeddings, as the detector's text head gives
    them for the projected sentence embeddings (``open_vocabulary.class_embeddings_from_text``)."""
    encoder = _TextEncoder(transformer, projection, model)
    io = IO[Role.TEXT_ENCODER]
    dynamic = {
        "input_ids": {0: "texts", 1: "tokens"},
        "attention_mask": {0: "texts", 1: "tokens"},
        "text_embeddings": {0: "texts"},
    }
    example = (torch.ones(2, 5, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64))
    _export(encoder, example, path, io.inputs, io.outputs, dynamic)
    rng = np.random.default_rng(0)
    vocab = int(transformer.config.vocab_size)
    diff = 0.0
    for n, length in ((1, 3), (4, 11)):
        mask = np.ones((n, length), np.int64)
        mask[0, length - 1 :] = 0 if length > 2 else 1  # padding in the first text
        feeds = {"input_ids": rng.integers(0, vocab, (n, length)).astype(np.int64), "attention_mask": mask}
        diff = max(diff, _max_diff(path, encoder, feeds))
    return ExportReport(Role.TEXT_ENCODER, path, diff, io.inputs, io.outputs)


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
