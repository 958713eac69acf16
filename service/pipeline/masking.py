"""The mask stages of the detector path: every SAM prompt of the image decoded in measured chunks, then each
mask upsampled in its box window, thresholded, refined and encoded, with what review reads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

import numpy as np

from service.models.tensors import ImageFeatures
from service.pipeline.image import DecodedImage
from service.pipeline.prompts import Plan, SamPrompt
from service.pipeline.refine import refine_mask
from service.pipeline.review import MaskStats, mask_stats
from service.processing.masks import Bounds, EncodedMask, encode_masks, mask_bounds
from service.processing.segmentation import BestMasks, SegmenterProcessing
from service.runners.base import Runner

_MASK_CHUNK = 16  # instances upsampled at a time: bounds memory to 16 x H x W floats


@dataclasses.dataclass(frozen=True)
class LowResMasks:
    """Per SAM prompt: the best (s, s) mask logits (numpy, or a tensor on the device of a device-resident runner)
    as (N, s, s), and its (N,) score."""

    logits: Any
    scores: np.ndarray


@dataclasses.dataclass(frozen=True)
class FinishedMask:
    """One prompt's final mask: encoded; its XYXY box for a clicks-only prompt (None if empty, and for every other
    prompt); its stability, area and parts (review)."""

    encoded: EncodedMask
    box: np.ndarray | None
    stats: MaskStats


@dataclasses.dataclass(frozen=True)
class FinalMasks:
    """Per SAM prompt: the encoded final mask; for clicks-only prompts the mask's XYXY box (None if empty, and
    for every other prompt); the mask's stability, area and parts (review)."""

    encoded: list[EncodedMask]
    boxes: list[np.ndarray | None]
    stats: list[MaskStats]


class Masks:
    """Decodes and finishes a request's masks; ``mask_threads``: threads refining and encoding them."""

    def __init__(self, runner: Runner, segmentation: SegmenterProcessing, mask_threads: int = 1) -> None:
        self.runner = runner
        self.segmentation = segmentation
        self._pool = concurrent.futures.ThreadPoolExecutor(mask_threads, thread_name_prefix="masks")

    async def decode(
        self, features: ImageFeatures, prompts: list[SamPrompt], image: DecodedImage, multimask: bool
    ) -> LowResMasks:
        """All prompts of the image, one decoder call per prompt shape."""
        best = BestMasks(len(prompts), self.runner.segmenter.image_size // 4)
        hw = (image.height, image.width)
        for indices, batch in self.segmentation.prompt_batches(prompts, hw, multimask):
            best.add(indices, await self.runner.decode(features.select(0), batch))
        return LowResMasks(best.low_res, best.scores)

    def finish(self, low_res: Any, image: DecodedImage, p: Plan, prompts: list[SamPrompt]) -> FinalMasks:
        """Upsample, threshold, refine and encode in chunks, one mask per prompt, with what review reads."""
        hw = (image.height, image.width)
        final = FinalMasks([], [], [])
        for i in range(0, low_res.shape[0], _MASK_CHUNK):
            up = self.segmentation.postprocess(low_res[i : i + _MASK_CHUNK], hw)
            chunk = prompts[i : i + _MASK_CHUNK]
            # Masks are finished on the mask pool (OpenCV and most of numpy release the GIL while they work).
            finished = self._pool.map(lambda m, q, s: _finish_mask(m, q, float(s), p), up.masks, chunk, up.stability)
            for mask in finished:
                final.encoded.append(mask.encoded)
                final.boxes.append(mask.box)
                final.stats.append(mask.stats)
        return final


def _finish_mask(mask: np.ndarray, prompt: SamPrompt, stability: float, p: Plan) -> FinishedMask:
    """One upsampled (H, W) bool mask → refined in place, encoded, its box (clicks-only prompts) and review stats.

    Everything after the refinement reads only the mask's window of set pixels (``mask_bounds``): the same results
    as reading the frame, and a small object on a large image costs its own size."""
    window = refine_mask(mask, prompt.box, p.refinement) if p.refinement.active else None
    bounds = mask_bounds(mask, window)
    (encoded,) = encode_masks(mask[None], p.mask_encoding, [bounds])
    box = _bounds_box(bounds) if prompt.box is None else None
    return FinishedMask(encoded, box, mask_stats(mask, stability, bounds))


def _bounds_box(bounds: Bounds | None) -> np.ndarray | None:
    """A mask's tight window (``mask_bounds``) → its XYXY pixel-edge box, or None when the mask is empty."""
    if bounds is None:
        return None
    return np.array([bounds.x0, bounds.y0, bounds.x1, bounds.y1], dtype=np.float32)


def points_box(prompt: SamPrompt) -> np.ndarray:
    """Box around the positive clicks of a points-only region (the frame's reference, not a mask bound)."""
    pts = prompt.points[prompt.point_labels == 1]
    pts = pts if len(pts) else prompt.points
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)]).astype(np.float32)
