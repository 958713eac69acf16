"""In-process torch execution of the ultralytics detector and the SAM 2 encoder / prompt decoder.

Model calls run on a small thread pool so the gRPC event loop never blocks and the detector and the
SAM image encoder of one request run concurrently. Detector and encoder calls of concurrent requests
are micro-batched (``service.runners.batching``): one forward pass serves several callers. Modules are
used read-only (eval, no grad), and no per-request state lives on them, so concurrent requests are safe
(STYLE 11).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from service.config import Settings
from service.errors import DeadlineExceeded
from service.models import sam_ops
from service.models.loading import load_detector_module, load_segmenter_module
from service.models.profiles import ModelSet, WeightsRef
from service.runners.base import (
    DecoderOutput,
    DetectorOutput,
    DetectorSpec,
    ImageFeatures,
    ModelDescriptor,
    PromptBatch,
    SegmenterSpec,
    time_left,
)
from service.runners.batching import MicroBatcher

log = logging.getLogger(__name__)
T = TypeVar("T")


class TorchRunner:
    """Runs a detector and a SAM 2 model in this process (see ``service.runners.base.Runner``)."""

    backend = "torch"

    def __init__(
        self,
        detector_module: torch.nn.Module,
        segmenter_module: Any,
        detector: DetectorSpec,
        segmenter: SegmenterSpec,
        models: tuple[ModelDescriptor, ...],
        profile: str = "custom",
        workers: int = 2,
        batching: tuple[int, float, int] = (8, 0.0, 64),
    ) -> None:
        """``batching``: (max batch, max wait seconds, max queue) of the detector's and encoder's micro-batchers."""
        self._det = detector_module
        self._sam = segmenter_module
        self.detector = detector
        self.segmenter = segmenter
        self.models = models
        self.profile = profile
        self.calls: collections.Counter[str] = collections.Counter()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torch-runner")
        self.detect_batcher = MicroBatcher("detector", self._detect_batch, *batching)
        self.encode_batcher = MicroBatcher("encoder", self._encode_batch, *batching)

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> TorchRunner:
        """Loads both models from verified files and sets torch's thread count from Settings."""
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        loaded = load_detector_module(models.detector.path)
        det: Any = loaded.module
        sam = load_segmenter_module(
            models.segmenter.architecture, models.segmenter.path, models.segmenter.overrides, settings.device
        )
        names = tuple(str(det.names[i]) for i in range(len(det.names)))
        imgsz = loaded.input_size(settings.detector_imgsz)
        detector = DetectorSpec(names=names, imgsz=imgsz, stride=int(det.stride.max()))
        segmenter = SegmenterSpec(image_size=int(sam.image_size))
        descriptors = (
            _descriptor(models.detector, detector.imgsz, names),
            _descriptor(models.segmenter, segmenter.image_size, ()),
        )
        batching = (settings.batch_max_size, settings.batch_max_wait_ms / 1000, settings.batch_max_queue)
        return cls(det, sam, detector, segmenter, descriptors, models.profile, batching=batching)

    async def start(self) -> None:
        """Nothing to connect: the modules are loaded by ``load``."""

    async def ready(self) -> bool:
        return True

    async def _run(self, name: str, fn: Callable[[], T]) -> T:
        self.calls[name] += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _no_grad(fn))

    async def detect(self, images: np.ndarray) -> DetectorOutput:
        _check_deadline()
        (raw,) = await self.detect_batcher.submit(images)
        return DetectorOutput(raw=raw)

    async def encode(self, images: np.ndarray) -> ImageFeatures:
        _check_deadline()
        embed, hr0, hr1 = await self.encode_batcher.submit(images)
        return ImageFeatures(image_embed=embed, high_res_feats=(hr0, hr1))

    async def _detect_batch(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        def run() -> tuple[np.ndarray, ...]:
            out = self._det(torch.from_numpy(images))
            raw = out[0] if isinstance(out, tuple | list) else out
            return (raw.numpy(),)

        return await self._run("detect", run)

    async def _encode_batch(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        def run() -> tuple[np.ndarray, ...]:
            embed, hr0, hr1 = sam_ops.image_features(self._sam, torch.from_numpy(images))
            return embed.contiguous().numpy(), hr0.contiguous().numpy(), hr1.contiguous().numpy()

        return await self._run("encode", run)

    async def decode(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        _check_deadline()

        def run() -> DecoderOutput:
            hr0, hr1 = (torch.from_numpy(f) for f in features.high_res_feats)
            single, single_iou, multi, multi_iou = sam_ops.decode(
                self._sam,
                torch.from_numpy(features.image_embed),
                hr0,
                hr1,
                torch.from_numpy(prompts.point_coords),
                torch.from_numpy(prompts.point_labels),
            )
            masks, iou = (multi, multi_iou) if prompts.multimask else (single, single_iou)
            return DecoderOutput(low_res_masks=masks.float().numpy(), iou_predictions=iou.float().numpy())

        return await self._run("decode", run)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_deadline() -> None:
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded("the request's deadline passed before the models ran")


def _no_grad(fn: Callable[[], T]) -> Callable[[], T]:
    def wrapped() -> T:
        with torch.inference_mode():
            return fn()

    return wrapped


def _descriptor(ref: WeightsRef, input_size: int, vocabulary: tuple[str, ...]) -> ModelDescriptor:
    return ModelDescriptor(
        role=ref.role,
        name=ref.name,
        architecture=ref.architecture,
        version=ref.version,
        weights_sha256=ref.sha256,
        input_size=input_size,
        vocabulary=vocabulary,
    )
