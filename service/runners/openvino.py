"""In-process execution of the exported graphs (``detseg export``) with the fastest CPU runtime per role.

The graphs are the ONNX backend's (exported once per weights into ``<cache_dir>/onnx/<weights>/``). Per role, the
runtime measured fastest on a 2-core Xeon, 2 threads, seeded YOLO11n at 640² and SAM 2.1-T at 1024² (min of 6
interleaved runs, one process; torch fp32 in brackets):

- detector: OpenVINO f32, 35 ms (ONNX Runtime 40 ms with its arena, 56 ms without; torch 57 ms);
- sam2_image_encoder: OpenVINO, f32 1.37 s or int8 0.80 s (``Settings.precision``; ONNX Runtime 2.18 s;
  torch 1.65 s). Its IR is built once per graph and cached (``service.models.openvino_ir``);
- sam2_mask_decoder: torch for calls of 4 prompts or more (its decoder shares the image side between prompts:
  30 ms/box at 13 boxes under the tuned allocator), the exported graph on ONNX Runtime for fewer (49 ms for one
  prompt vs torch's 72);
- text / visual-prompt encoders (open-vocabulary detectors): ONNX Runtime, as the onnx backend.

Every OpenVINO model runs with ``INFERENCE_PRECISION_HINT=f32`` (its bf16 default wrecked the detector's boxes) and
``settings.threads`` threads. OpenVINO's compile aborts in a process with jemalloc or tcmalloc LD_PRELOADed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.config import Settings
from service.models.graphs import IO
from service.models.openvino_ir import F32, cpu_supports_int8, encoder_ir
from service.models.profiles import ModelSet
from service.models.roles import ModelRole, Role
from service.models.text import load_sentence_encoder
from service.runners.base import DecoderOutput, ImageFeatures, PromptBatch
from service.runners.batching import BatchPolicy
from service.runners.exported import load_export, ort_session, specs, tokenizer_for
from service.runners.local import Arrays
from service.runners.onnx import OnnxRunner

log = logging.getLogger(__name__)

# The int8 encoder's calibration images (never the quality gate's photos, ultralytics' bus.jpg and zidane.jpg):
# scikit-learn's two sample photos (china.jpg, flower.jpg; scikit-learn comes with nncf), each whole, mirrored and as
# two crops, and four shapes-world scenes. Renaming it rebuilds cached int8 encoders.
CALIBRATION = "sklearn-photos-x8+shapes-train-4"
# Decoder calls of this many prompts or more run on torch (see OpenVinoRunner._decode_sync).
SHARED_DECODER_MIN_PROMPTS = 4


@dataclasses.dataclass(frozen=True)
class Execution:
    """How one role's graph runs: runtime "openvino" | "onnxruntime"; precision "fp32" | "int8"."""

    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime}-{self.precision}"


class OpenVinoModel:
    """A compiled OpenVINO model with ONNX Runtime's calling convention, ``run(output_names, feeds) -> [arrays]``;
    safe to call from several threads (one infer request per thread)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._local = threading.local()

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)  # copies of the outputs (share_outputs=False)
        return [results[name] for name in outputs]


class OpenVinoRunner(OnnxRunner):
    """The ONNX backend's graphs, each on its fastest runtime here; the image encoder optionally in int8.

    ``execution``: how each role runs (``str(runner.execution[Role.SAM2_IMAGE_ENCODER])`` is e.g. "openvino-int8").
    """

    backend = "openvino"

    def __init__(self, *args: Any, execution: dict[Role, Execution], sam: Any, **kwargs: Any) -> None:
        """``sam``: the torch SAM 2 module, whose decoder serves calls of SHARED_DECODER_MIN_PROMPTS prompts or more."""
        super().__init__(*args, **kwargs)
        self.execution = execution
        self._sam = sam

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        """Few prompts: the exported graph on ONNX Runtime. More: torch's decoder, which computes the image side
        the prompts share once per call (``sam_ops``; exact). Measured on 2 cores at 1024² under the tuned allocator:
        1 prompt 49 vs 72 ms (ONNX Runtime faster), 13 prompts 46 vs 30 ms per prompt (torch faster)."""
        if len(prompts.point_coords) < SHARED_DECODER_MIN_PROMPTS:
            return super()._decode_sync(features, prompts)
        import torch

        from service.runners.torch import decode_batch

        with torch.inference_mode():
            masks, iou = decode_batch(self._sam, features, prompts, torch.from_numpy)
        return DecoderOutput(low_res_masks=masks.numpy(), iou_predictions=iou.numpy())

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> OpenVinoRunner:
        import openvino as ov

        core = ov.Core()
        precision = resolve_encoder_precision(settings, core)
        export = load_export(models, settings)
        config: dict[str, Any] = {**F32, "PERFORMANCE_HINT": "LATENCY"}
        if settings.threads > 0:
            config["INFERENCE_NUM_THREADS"] = settings.threads
        image_size = export.graphs.image_size
        ir = encoder_ir(
            core,
            export.graph(Role.SAM2_IMAGE_ENCODER),
            image_size,
            precision,
            lambda: calibration_images(image_size),
            CALIBRATION,
        )
        sessions: dict[Role, Any] = {
            Role.DETECTOR: OpenVinoModel(core.compile_model(str(export.graph(Role.DETECTOR)), "CPU", config)),
            Role.SAM2_IMAGE_ENCODER: OpenVinoModel(core.compile_model(str(ir.xml), "CPU", config)),
            # Calls of fewer than SHARED_DECODER_MIN_PROMPTS prompts (re-prompts, clicks). The arena keeps the
            # largest call's activations (at 1024²: +3.0 GB after a call of 50 boxes), so only small calls come here.
            Role.SAM2_MASK_DECODER: ort_session(export.graph(Role.SAM2_MASK_DECODER), settings, arena=True),
        }
        execution = {
            Role.DETECTOR: Execution("openvino", "fp32"),
            Role.SAM2_IMAGE_ENCODER: Execution("openvino", precision),
            Role.SAM2_MASK_DECODER: Execution("torch|onnxruntime", "fp32"),
        }
        import torch

        from service.models.loading import load_segmenter_module

        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        seg = models.segmenter
        sam = load_segmenter_module(seg.architecture, seg.path, seg.overrides, "cpu")
        for role in export.graphs.roles:
            if role not in sessions:  # the open-vocabulary detector's prompt encoders
                sessions[role] = ort_session(export.graph(role), settings, arena=False)
                execution[role] = Execution("onnxruntime", "fp32")
        log.info("openvino backend: %s", ", ".join(f"{role} {execution[role]}" for role in export.graphs.roles))
        detector, segmenter = specs(export.graphs)
        text = load_sentence_encoder(settings.text_encoder)
        described = tuple(
            dataclasses.replace(m, precision="int8-encoder")
            if m.role == ModelRole.SEGMENTER and precision == "int8"
            else m
            for m in export.graphs.models
        )
        return cls(
            sessions,
            tokenizer_for(export.graphs, text),
            detector,
            segmenter,
            described,
            models.profile,
            batching=BatchPolicy.from_settings(settings),
            text=text,
            execution=execution,
            sam=sam,
        )

    def _encode_sync(self, images: np.ndarray) -> Arrays:
        """The encoder IR takes one image (a static shape: compiles in ~1 s and runs fastest); N images, N calls."""
        io = IO[Role.SAM2_IMAGE_ENCODER]
        encoder = self._sessions[Role.SAM2_IMAGE_ENCODER]
        per_image = [encoder.run(list(io.outputs), {io.inputs[0]: images[i : i + 1]}) for i in range(len(images))]
        return tuple(np.concatenate(outputs) for outputs in zip(*per_image, strict=True))


def resolve_encoder_precision(settings: Settings, core: Any) -> str:
    """fp32 | int8 for ``settings.precision``: auto is int8 where OpenVINO's CPU plugin has int8 kernels."""
    if settings.precision == "auto":
        return "int8" if cpu_supports_int8(core) else "fp32"
    return settings.precision


def calibration_images(image_size: int) -> list[np.ndarray]:
    """The CALIBRATION set as the encoder takes it: 12 × (1, 3, S, S) float32, SAM-normalised."""
    from sklearn.datasets import load_sample_image

    from service.pipeline.segmentation import SegmenterProcessing
    from service.runners.base import SegmenterSpec
    from service.shapes.dataset import scenes

    rgbs = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)  # (427, 640, 3) uint8
        h, w = photo.shape[:2]
        rgbs += [photo, photo[:, ::-1], photo[h // 6 : h - h // 6, w // 6 : w - w // 6], photo[: 2 * h // 3, w // 3 :]]
    rgbs += [scene.image for scene in scenes("train", 4)]
    processing = SegmenterProcessing(SegmenterSpec(image_size=image_size))
    return [processing.preprocess(np.ascontiguousarray(rgb)) for rgb in rgbs]
