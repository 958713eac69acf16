"""What every in-process runner shares: a thread pool, the one thread that runs torch on the host
(``torch_thread``), micro-batched detector/encoder calls, deadlines.

Subclasses implement blocking methods on numpy arrays (run on the pool, never on the event loop):
``_detect_sync(images, classes) -> (raw,)``, ``_encode_sync(images) -> (embed, high_res_0, high_res_1)``,
``_decode_sync(features, prompts) -> DecoderOutput``, and for open-vocabulary detectors
``_embed_classes_sync(names) -> (N, class_dim)``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from service.errors import DeadlineExceeded, ModelUnavailable, Unsupported
from service.models import sam_memory
from service.models.loading import load_segmenter_module
from service.models.profiles import WeightsRef
from service.models.roles import ModelDescriptor
from service.models.sam_memory import MemoryTracker, ObjectMemory, ObjectStep
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
from service.models.text import SentenceEncoder
from service.runners.base import time_left
from service.runners.batching import BatchPolicy, MicroBatcher

T = TypeVar("T")
Arrays = tuple[np.ndarray, ...]


class Call(enum.StrEnum):
    """A model call of a local runner (``LocalRunner._run``): its name in ``calls`` and in ``torch_calls``."""

    DETECT = "detect"
    ENCODE = "encode"
    EMBED_CLASSES = "embed_classes"
    EMBED_EXEMPLARS = "embed_exemplars"
    DECODE = "decode"
    SEGMENT_CONCEPTS = "segment_concepts"
    TRACK = "track"
    REMEMBER = "remember"
    EMBED_TEXT = "embed_text"


# What a runner running all its models with torch on the CPU sends to its torch thread.
CALLS: frozenset[Call] = frozenset(Call)


def torch_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """One thread for the process's torch work on the host, with the caller's torch thread count; every thread that
    starts using torch after this call runs its ops on one thread (torch's count for a thread is the last one set
    anywhere when it first uses torch). The caller's own count stays as it was.

    Why one: torch runs an op's parallel part on OpenMP, and libgomp gives each OS thread that starts a parallel region
    a team of worker threads of its own, kept as long as that thread lives. Once the process holds more of them than
    cores, libgomp throttles every team's spinning between regions (GOMP's throttled spin count), and each region
    waits on a futex to start: SAM's decoder, hundreds of small regions per call, took 26-32 ms per one-prompt call
    in the server with one team and 33-41 ms with its several (benchmarks/RESULTS.md, re-prompt). Threads that used
    torch before this call keep their teams: the server loads the models on a thread that ends (``app._prepare``)."""
    import torch

    threads = torch.get_num_threads()
    pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,)
    )
    pool.submit(torch.get_num_threads).result()  # started: its count is set before the default falls to 1
    # torch.set_num_threads also sets the calling thread's count: called on a thread of its own, which then ends.
    default = threading.Thread(target=torch.set_num_threads, args=(1,), name="torch-default-threads")
    default.start()
    default.join()
    return pool


class LocalRunner:
    """Base of the in-process runners (see ``service.runners.base.Runner`` for the interface)."""

    backend = "local"
    # The calls (``_run`` names) that run torch on the host: on ``torch_thread``; the others (OpenVINO, ONNX Runtime,
    # a GPU's torch) on the pool.
    torch_calls: frozenset[Call] = frozenset({Call.TRACK, Call.REMEMBER, Call.EMBED_TEXT})
    concepts: ConceptSpec | None = None  # a runner with a concept segmenter sets it
    tracker: MemoryTracker | None = None  # a runner with SAM 2's memory modules in torch sets it

    def __init__(
        self,
        detector: DetectorSpec,
        segmenter: SegmenterSpec,
        models: tuple[ModelDescriptor, ...],
        profile: str,
        batching: BatchPolicy,
        text: SentenceEncoder | None,
        workers: int = 2,
    ) -> None:
        """``batching``: the detector's and encoder's micro-batching; ``text``: the sentence encoder free text
        is matched with (None: texts unsupported); ``workers``: threads running model calls (2: one request's
        detector and encoder run concurrently). ``models`` describes the detector and segmenter; the text
        encoder's descriptor is added here."""
        self.detector = detector
        self.segmenter = segmenter
        self.models = models + ((text.descriptor,) if text is not None else ())
        self._text = text
        self.text_encoder = TextEncoderSpec(dim=text.info.dim) if text is not None else None
        self.profile = profile
        self.calls: collections.Counter[str] = collections.Counter()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.backend)
        self._torch = torch_thread(f"{self.backend}-torch")
        self.detect_batcher = MicroBatcher(
            "detector", lambda x, classes: self._run(Call.DETECT, lambda: self._detect_sync(x, classes)), batching
        )
        self.encode_batcher = MicroBatcher(
            "encoder", lambda x, _: self._run(Call.ENCODE, lambda: self._encode_sync(x)), batching
        )

    def _detect_sync(self, images: np.ndarray, classes: ClassPrompts | None) -> Arrays:
        raise NotImplementedError

    def _embed_classes_sync(self, names: Sequence[str]) -> np.ndarray:
        raise Unsupported("this detector has a fixed vocabulary; it takes class names, not class embeddings")

    def _encode_sync(self, images: np.ndarray) -> Arrays:
        raise NotImplementedError

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        raise NotImplementedError

    def _segment_concepts_sync(
        self, images: np.ndarray, texts: Sequence[str], exemplars: Sequence[np.ndarray]
    ) -> ConceptOutput:
        raise Unsupported("this server has no concept segmenter (serve with --concept-model sam3, torch backend)")

    async def start(self) -> None:
        """Nothing to connect: the models are loaded by the constructor's caller."""

    async def ready(self) -> bool:
        return True

    async def _run(self, name: Call, fn: Callable[[], T]) -> T:
        self.calls[name] += 1
        pool = self._torch if name in self.torch_calls else self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def detect(self, images: np.ndarray, classes: ClassPrompts | None = None) -> DetectorOutput:
        _check_deadline()
        if (classes is not None) != self.detector.open_vocabulary:
            raise ValueError("class prompts are for open-vocabulary detectors, and they need them")
        (raw,) = await self.detect_batcher.submit(images, classes, classes.key if classes is not None else None)
        return DetectorOutput(raw=raw)

    async def embed_classes(self, names: Sequence[str]) -> np.ndarray:
        return await self._run(Call.EMBED_CLASSES, lambda: self._embed_classes_sync(names))

    async def embed_exemplars(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        _check_deadline()
        return await self._run(Call.EMBED_EXEMPLARS, lambda: self._embed_exemplars_sync(image, visuals))

    def _embed_exemplars_sync(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        raise Unsupported("exemplars need a detector that takes visual prompts (YOLOE)")

    async def encode(self, images: np.ndarray) -> ImageFeatures:
        _check_deadline()
        embed, hr0, hr1 = await self.encode_batcher.submit(images)
        return ImageFeatures(image_embed=embed, high_res_feats=(hr0, hr1))

    async def decode(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        _check_deadline()
        return await self._run(Call.DECODE, lambda: self._decode_sync(features, prompts))

    async def segment_concepts(
        self, images: np.ndarray, texts: Sequence[str], exemplars: Sequence[np.ndarray] = ()
    ) -> ConceptOutput:
        _check_deadline()
        return await self._run(Call.SEGMENT_CONCEPTS, lambda: self._segment_concepts_sync(images, texts, exemplars))

    def track_memory(self) -> object:
        self._tracking()
        return ObjectMemory()

    async def track(self, features: ImageFeatures, steps: Sequence[TrackStep]) -> TrackOutput:
        _check_deadline()
        tracker = self._tracking()
        return await self._run(Call.TRACK, lambda: _track_sync(tracker, features, steps))

    async def remember(self, features: ImageFeatures, corrections: Sequence[MemoryCorrection]) -> None:
        _check_deadline()
        tracker = self._tracking()

        def remember_sync() -> None:
            frame = tracker.frame_features(features)
            for c in corrections:
                tracker.remember(frame, c.frame_index, c.memory, c.mask)

        await self._run(Call.REMEMBER, remember_sync)

    def _tracking(self) -> MemoryTracker:
        if self.tracker is None:
            raise Unsupported(
                "video tracking needs SAM 2's memory modules in the server's process: the torch or openvino backend, "
                "with a segmenter whose memory path fits it (or a tracker module beside it, as the demo's)"
            )
        return self.tracker

    async def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        text = self._text
        if text is None:
            raise Unsupported("texts: this server has no text encoder (serve with text_encoder=minilm)")
        return await self._run(Call.EMBED_TEXT, lambda: text.encode(texts))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._torch.shutdown(wait=False, cancel_futures=True)


def memory_tracker(segmenter: Any, ref: WeightsRef | None, device: str) -> MemoryTracker | None:
    """What tracks on this runner: SAM 2's memory path on the segmenter module itself, or on the tracker module
    ``ref`` names (whose image encoder must be the segmenter's, bit for bit: frames are encoded by the segmenter);
    None when the module's memory path cannot run (``sam_memory.tracks``)."""
    module = segmenter
    if ref is not None:
        module = load_segmenter_module(ref.architecture, ref.path, ref.overrides, device)
        if not sam_memory.shares_image_encoder(segmenter, module):
            raise ModelUnavailable(f"{ref.path.name}: its image encoder is not the segmenter's; it cannot track")
    return MemoryTracker(module) if sam_memory.tracks(module) else None


def _track_sync(tracker: MemoryTracker, features: ImageFeatures, steps: Sequence[TrackStep]) -> TrackOutput:
    """Prompted steps one by one; the others together (``MemoryTracker.track_many`` batches what it can)."""
    frame = tracker.frame_features(features)
    results: dict[int, ObjectStep] = {}
    tracked = []
    for i, step in enumerate(steps):
        if step.points is not None and step.labels is not None:
            results[i] = tracker.start(frame, step.frame_index, step.points, step.labels, step.memory)
        else:
            tracked.append(i)
    by_index: dict[int, list[int]] = {}
    for i in tracked:
        by_index.setdefault(steps[i].frame_index, []).append(i)
    for index, members in by_index.items():
        outs = tracker.track_many(frame, index, [steps[i].memory for i in members])  # type: ignore[misc]
        results.update(zip(members, outs, strict=True))
    side = tracker.image_size // 4
    masks = [results[i].low_res_mask[0, 0].float().cpu().numpy() for i in range(len(steps))]
    low_res = np.stack(masks) if masks else np.zeros((0, side, side), np.float32)
    scores = np.asarray([results[i].object_score for i in range(len(steps))], np.float32)
    return TrackOutput(low_res_masks=low_res, object_scores=scores)


def _check_deadline() -> None:
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded("the request's deadline passed before the models ran")


def descriptor(
    ref: WeightsRef, input_size: int, vocabulary: tuple[str, ...], open_vocabulary: bool = False
) -> ModelDescriptor:
    return ModelDescriptor(
        role=ref.role,
        name=ref.name,
        architecture=ref.architecture,
        version=ref.version,
        weights_sha256=ref.sha256,
        input_size=input_size,
        vocabulary=vocabulary,
        open_vocabulary=open_vocabulary,
    )
