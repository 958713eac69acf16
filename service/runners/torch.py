"""In-process torch execution of the ultralytics detector and the SAM 2 encoder / prompt decoder.

Model calls run on a small thread pool so the gRPC event loop never blocks and the detector and the
SAM image encoder of one request run concurrently. Modules are used read-only (eval, no grad), and no
per-request state lives on them, so concurrent requests are safe (STYLE 11).
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
)

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
        workers: int = 2,
    ) -> None:
        self._det = detector_module
        self._sam = segmenter_module
        self.detector = detector
        self.segmenter = segmenter
        self.models = models
        self.calls: collections.Counter[str] = collections.Counter()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torch-runner")

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> TorchRunner:
        """Loads both models from verified files and sets torch's thread count from Settings."""
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        det: Any = load_detector_module(models.detector.path)
        sam = load_segmenter_module(
            models.segmenter.architecture, models.segmenter.path, models.segmenter.overrides, settings.device
        )
        names = tuple(str(det.names[i]) for i in range(len(det.names)))
        detector = DetectorSpec(names=names, imgsz=settings.detector_imgsz, stride=int(det.stride.max()))
        segmenter = SegmenterSpec(image_size=int(sam.image_size))
        descriptors = (
            _descriptor(models.detector, detector.imgsz, names),
            _descriptor(models.segmenter, segmenter.image_size, ()),
        )
        return cls(det, sam, detector, segmenter, descriptors)

    async def _run(self, name: str, fn: Callable[[], T]) -> T:
        self.calls[name] += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _no_grad(fn))

    async def detect(self, images: np.ndarray) -> DetectorOutput:
        def run() -> DetectorOutput:
            out = self._det(torch.from_numpy(images))
            raw = out[0] if isinstance(out, tuple | list) else out
            return DetectorOutput(raw=raw.numpy())

        return await self._run("detect", run)

    async def encode(self, images: np.ndarray) -> ImageFeatures:
        def run() -> ImageFeatures:
            sam = self._sam
            backbone_out = sam.forward_image(torch.from_numpy(images))
            _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
            if sam.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
            n = images.shape[0]
            # (HW, N, C) sequences -> (N, C, H, W) maps, finest level first.
            feats = [
                f.permute(1, 2, 0).reshape(n, -1, h, w).contiguous().numpy()
                for f, (h, w) in zip(vision_feats, feat_sizes, strict=True)
            ]
            return ImageFeatures(image_embed=feats[-1], high_res_feats=tuple(feats[:-1]))

        return await self._run("encode", run)

    async def decode(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        def run() -> DecoderOutput:
            sam = self._sam
            coords = torch.from_numpy(prompts.point_coords)
            labels = torch.from_numpy(prompts.point_labels)
            sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            low_res, iou, _, _ = sam.sam_mask_decoder(
                image_embeddings=torch.from_numpy(features.image_embed),
                image_pe=sam.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=prompts.multimask,
                repeat_image=coords.shape[0] > 1,
                high_res_features=[torch.from_numpy(f) for f in features.high_res_feats],
            )
            return DecoderOutput(low_res_masks=low_res.float().numpy(), iou_predictions=iou.float().numpy())

        return await self._run("decode", run)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
