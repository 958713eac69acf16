"""In-process ONNX Runtime execution of the exported graphs (``detseg export``): no torch at request time.

On first start the profile's models are exported (and checked against torch) into
``<cache_dir>/onnx/<weights>/``, the same repository layout Triton serves; later starts reuse it. Class names
and input sizes come from the configs' ``detseg_*`` parameters, as for the Triton runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.config import Settings
from service.models.graphs import IO, decoder_outputs, detector_io
from service.models.profiles import ModelSet
from service.models.roles import Role
from service.models.tensors import ClassPrompts, DecoderOutput, ImageFeatures, PromptBatch
from service.models.text import SentenceEncoder, load_sentence_encoder
from service.runners.batching import BatchPolicy
from service.runners.exported import (
    decoder_feeds,
    detector_feeds,
    load_export,
    ort_session,
    specs,
    text_feeds,
    tokenizer_for,
)
from service.runners.local import Arrays, LocalRunner


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
        export = load_export(models, settings)
        # No memory arena: at SAM 2's 1024² a micro-batch of 4 encoder images would hold 5.9 GB for good (0.34 GB
        # without, 2.0 s/image either way); at batch 8 the arena-less run is slower, hence batches of 4 by default.
        sessions = {role: ort_session(export.graph(role), settings, arena=False) for role in export.graphs.roles}
        detector, segmenter = specs(export.graphs)
        text = load_sentence_encoder(settings.text_encoder)
        return cls(
            sessions,
            tokenizer_for(export.graphs, text),
            detector,
            segmenter,
            export.graphs.models,
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
