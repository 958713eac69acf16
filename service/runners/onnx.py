"""In-process ONNX Runtime execution of the exported graphs (``detseg export``): no torch at request time.

On first start the profile's models are exported (and checked against torch) into
``<cache_dir>/onnx/<weights>/``, the same repository layout Triton serves; later starts reuse it. Class names
and input sizes come from the configs' ``detseg_*`` parameters, as for the Triton runner.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.config import Settings
from service.models.graphs import IO, decoder_outputs, detector_io, read_parameters
from service.models.profiles import ModelSet
from service.models.roles import Role
from service.models.text import SentenceEncoder, load_sentence_encoder
from service.runners.base import ClassPrompts, DecoderOutput, ImageFeatures, PromptBatch
from service.runners.batching import BatchPolicy
from service.runners.exported import decoder_feeds, detector_feeds, specs, text_feeds, tokenizer_for
from service.runners.local import Arrays, LocalRunner

log = logging.getLogger(__name__)


class OnnxRunner(LocalRunner):
    """Runs the three exported graphs with ONNX Runtime in this process."""

    backend = "onnx"

    def __init__(self, sessions: dict[Role, Any], tokenizer: SentenceEncoder | None, *args: Any, **kwargs: Any) -> None:
        """``tokenizer``: the sentence encoder whose token ids the text-encoder graph takes (open vocabulary)."""
        super().__init__(*args, **kwargs)
        self._sessions = sessions
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> OnnxRunner:
        import onnxruntime as ort

        from service.models.triton_repo import ensure_repository, export_cache, parse_config

        repo = export_cache(models, settings)
        if ensure_repository(models, settings, repo):
            log.info("exported %s + %s to ONNX (once per weights)", models.detector.name, models.segmenter.name)
        options = ort.SessionOptions()
        if settings.threads > 0:
            options.intra_op_num_threads = settings.threads
        # ONNX Runtime's CPU arena keeps the peak activation memory of the largest batch for good. Measured, SAM 2
        # encoder at 1024² on 2 cores: a batch of 4 leaves 5.9 GB with it, 0.34 GB without (2.0 s/image either
        # way); at batch 8 the arena-less run is slower (3.6 vs 2.6 s/image), hence micro-batches of 4 by default.
        options.enable_cpu_mem_arena = False
        graphs = read_parameters(
            {
                role: {k: v.string_value for k, v in parse_config(repo / role / "config.pbtxt").parameters.items()}
                for role in Role
                if (repo / role / "config.pbtxt").exists()
            }
        )
        sessions = {
            role: ort.InferenceSession(
                str(repo / role / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for role in graphs.roles
        }
        detector, segmenter = specs(graphs)
        text = load_sentence_encoder(settings.text_encoder)
        return cls(
            sessions,
            tokenizer_for(graphs, text),
            detector,
            segmenter,
            graphs.models,
            models.profile,
            batching=BatchPolicy.from_settings(settings),
            text=text,
        )

    def _detect_sync(self, images: np.ndarray, classes: ClassPrompts | None) -> Arrays:
        outputs = detector_io(classes is not None).outputs
        return tuple(self._sessions[Role.DETECTOR].run(list(outputs), detector_feeds(images, classes)))

    def _embed_classes_sync(self, names: Sequence[str]) -> np.ndarray:
        feeds = text_feeds(self._tokenizer, list(names))
        (embeddings,) = self._sessions[Role.TEXT_ENCODER].run(list(IO[Role.TEXT_ENCODER].outputs), feeds)
        return embeddings

    def _embed_exemplars_sync(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        if not self.detector.visual_prompts:
            return super()._embed_exemplars_sync(image, visuals)
        io = IO[Role.VISUAL_PROMPT_ENCODER]
        feeds = dict(zip(io.inputs, (image, visuals), strict=True))
        (embeddings,) = self._sessions[Role.VISUAL_PROMPT_ENCODER].run(list(io.outputs), feeds)
        return embeddings[0]

    def _encode_sync(self, images: np.ndarray) -> Arrays:
        io = IO[Role.SAM2_IMAGE_ENCODER]
        return tuple(self._sessions[Role.SAM2_IMAGE_ENCODER].run(list(io.outputs), {io.inputs[0]: images}))

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        feeds = decoder_feeds(features, prompts, self.segmenter.image_size)
        masks, iou = self._sessions[Role.SAM2_MASK_DECODER].run(list(decoder_outputs(prompts.multimask)), feeds)
        return DecoderOutput(low_res_masks=masks, iou_predictions=iou)
