"""The tensor-level runner interface shared by every backend (torch and ONNX Runtime in-process, Triton over gRPC).

Runners execute models and nothing else: pre/post-processing lives once in ``service.processing``; the tensor
contracts they take and return are in ``service.models.tensors``.
All arrays are numpy; coordinate frames are stated per field.
"""

from __future__ import annotations

import collections
import contextvars
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.models.roles import ModelDescriptor
from service.models.tensors import (
    ClassPrompts,
    ConceptOutput,
    ConceptSpec,
    DecoderOutput,
    DetectorOutput,
    DetectorSpec,
    ImageFeatures,
    MemoryCorrection,
    PromptBatch,
    SegmenterSpec,
    TextEncoderSpec,
    TrackOutput,
    TrackStep,
)

# The caller's deadline as a time.monotonic() instant (None: no deadline). The API layer sets it per RPC;
# runners honour it (the Triton runner forwards what is left to Triton). Tasks inherit it (contextvars).
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("detseg_deadline", default=None)


def time_left() -> float | None:
    """Seconds until the current request's deadline (may be <= 0), or None without a deadline."""
    deadline = DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


class Runner(Protocol):
    """Executes the models of one profile. Methods are safe to call concurrently."""

    @property
    def detector(self) -> DetectorSpec: ...
    @property
    def segmenter(self) -> SegmenterSpec: ...
    @property
    def text_encoder(self) -> TextEncoderSpec | None:
        """None when this runner embeds no text (free-text prompts are then FAILED_PRECONDITION)."""
        ...

    @property
    def concepts(self) -> ConceptSpec | None:
        """None when no concept segmenter (SAM 3) is loaded (texts then go to the detector)."""
        ...

    @property
    def models(self) -> Sequence[ModelDescriptor]: ...
    @property
    def backend(self) -> str: ...
    @property
    def profile(self) -> str:
        """The model profile served (demo, official, test, custom)."""
        ...

    @property
    def calls(self) -> collections.Counter[str]:
        """Per-method call counts, for metrics and tests."""
        ...

    async def detect(self, images: np.ndarray, classes: ClassPrompts | None = None) -> DetectorOutput:
        """images: (N, 3, imgsz, imgsz) float32 RGB in [0, 1], letterboxed. ``classes``: the vocabulary of this
        call, required by an open-vocabulary detector and refused by a closed one."""
        ...

    async def encode(self, images: np.ndarray) -> ImageFeatures:
        """images: (N, 3, S, S) float32, SAM-normalised (ImageNet mean/std); numpy, or a tensor on
        ``segmenter.input_device`` when the runner names one."""
        ...

    async def decode(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        """All prompts of one image in one call; ``features`` has batch size 1."""
        ...

    async def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts → (N, text_encoder.dim) float32 sentence embeddings, L2-normalised."""
        ...

    async def embed_classes(self, names: Sequence[str]) -> np.ndarray:
        """Class names / phrases → (N, detector.class_dim) float32 class embeddings for ``ClassPrompts``
        (open-vocabulary detectors only)."""
        ...

    async def embed_exemplars(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        """Visual-prompt embeddings (K, detector.class_dim) float32 of K example regions on one image.

        image: (1, 3, imgsz, imgsz) as ``detect`` takes it; visuals: (1, K, imgsz/8, imgsz/8) float32 masks of
        the regions in that letterboxed frame (open-vocabulary detectors only)."""
        ...

    async def segment_concepts(
        self, images: np.ndarray, texts: Sequence[str], exemplars: Sequence[np.ndarray] = ()
    ) -> ConceptOutput:
        """images: (1, 3, S, S) float32 RGB in [-1, 1] stretched to ``concepts.image_size``; ``exemplars``: one
        (K, 4) float32 array per exemplar class, its boxes as normalised cxcywh. The output's rows are the texts,
        then the exemplar classes. Unsupported without a concept segmenter."""
        ...

    def track_memory(self) -> object:
        """A new, empty memory bank for one tracked object (opaque; ``track`` reads and updates it). Unsupported
        where SAM 2's memory modules do not run in this process."""
        ...

    async def track(self, features: ImageFeatures, steps: Sequence[TrackStep]) -> TrackOutput:
        """One video frame for N objects with SAM 2's memory (``service.models.sam_memory``): ``features`` of the
        frame (batch 1, from ``encode``), each step prompts its object on the frame or tracks it from its memory."""
        ...

    async def remember(self, features: ImageFeatures, corrections: Sequence[MemoryCorrection]) -> None:
        """Re-encodes each object's memory of the frame it was just tracked on (``track``; ``features`` of that
        frame) from the correction's mask. Unsupported where ``track`` is."""
        ...

    async def start(self) -> None:
        """Connects / warms what the runner needs; specs and models are valid afterwards. May wait."""
        ...

    async def ready(self) -> bool:
        """Whether the models can be run now (backs gRPC health). Cheap; never raises."""
        ...

    async def close(self) -> None: ...
