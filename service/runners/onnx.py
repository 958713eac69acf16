"""In-process ONNX Runtime execution of the exported graphs (``detseg export``): no torch at request time.

On first start the profile's models are exported (and checked against torch) into
``<cache_dir>/onnx/<weights>/``, the same repository layout Triton serves; later starts reuse it. Class names
and input sizes come from the configs' ``detseg_*`` parameters, as for the Triton runner.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from service.config import Settings
from service.models.graphs import IO, decoder_outputs, read_parameters
from service.models.profiles import ModelSet
from service.models.roles import MODEL_ROLES, Role
from service.models.text import load_sentence_encoder
from service.runners.base import ClassPrompts, DecoderOutput, ImageFeatures, PromptBatch
from service.runners.batching import BatchPolicy
from service.runners.exported import decoder_feeds, specs
from service.runners.local import Arrays, LocalRunner

log = logging.getLogger(__name__)


class OnnxRunner(LocalRunner):
    """Runs the three exported graphs with ONNX Runtime in this process."""

    backend = "onnx"

    def __init__(self, sessions: dict[Role, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions = sessions

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> OnnxRunner:
        import onnxruntime as ort

        from service.models.triton_repo import ensure_repository, parse_config

        key = f"{models.detector.sha256[:16]}-{models.segmenter.sha256[:16]}-{settings.detector_imgsz}"
        repo = settings.cache_dir / "onnx" / key
        if ensure_repository(models, settings, repo):
            log.info("exported %s + %s to ONNX (once per weights)", models.detector.name, models.segmenter.name)
        options = ort.SessionOptions()
        if settings.threads > 0:
            options.intra_op_num_threads = settings.threads
        # ONNX Runtime's CPU arena keeps the peak activation memory of the largest batch for good. Measured, SAM 2
        # encoder at 1024² on 2 cores: a batch of 4 leaves 5.9 GB with it, 0.34 GB without (2.0 s/image either
        # way); at batch 8 the arena-less run is slower (3.6 vs 2.6 s/image), hence micro-batches of 4 by default.
        options.enable_cpu_mem_arena = False
        sessions = {
            role: ort.InferenceSession(
                str(repo / role / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for role in MODEL_ROLES
        }
        graphs = read_parameters(
            {
                role: {k: v.string_value for k, v in parse_config(repo / role / "config.pbtxt").parameters.items()}
                for role in MODEL_ROLES
            }
        )
        detector, segmenter = specs(graphs)
        return cls(
            sessions,
            detector,
            segmenter,
            graphs.models,
            models.profile,
            batching=BatchPolicy.from_settings(settings),
            text=load_sentence_encoder(settings.text_encoder),
        )

    def _detect_sync(self, images: np.ndarray, classes: ClassPrompts | None) -> Arrays:
        io = IO[Role.DETECTOR]
        return tuple(self._sessions[Role.DETECTOR].run(list(io.outputs), {io.inputs[0]: images}))

    def _encode_sync(self, images: np.ndarray) -> Arrays:
        io = IO[Role.SAM2_IMAGE_ENCODER]
        return tuple(self._sessions[Role.SAM2_IMAGE_ENCODER].run(list(io.outputs), {io.inputs[0]: images}))

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        feeds = decoder_feeds(features, prompts, self.segmenter.image_size)
        masks, iou = self._sessions[Role.SAM2_MASK_DECODER].run(list(decoder_outputs(prompts.multimask)), feeds)
        return DecoderOutput(low_res_masks=masks, iou_predictions=iou)
