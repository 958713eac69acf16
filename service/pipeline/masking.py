"""The mask stages of the detector path: every SAM prompt of the image decoded in measured chunks, then each
mask upsampled in its window (where its logits reach the threshold, within its box + margin when refinement clips),
thresholded, refined and encoded, with what review reads; no stage holds a whole frame of a mask but PNG's."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from service.models.tensors import ImageFeatures
from service.pipeline.image import DecodedImage
from service.pipeline.prompts import Plan, SamPrompt
from service.pipeline.refine import clip_window, refine_window
from service.pipeline.review import MaskStats, mask_stats
from service.processing.masks import RLE, Bounds, EncodedMask, WindowedMask, encode_window
from service.processing.segmentation import BestMasks, SegmenterProcessing
from service.runners.base import Runner


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
        """Upsample, threshold, refine and encode, one mask per prompt, with what review reads.

        Each mask is finished on the mask pool from its own logits (OpenCV, torch and numpy's elementwise operations
        release the GIL while they work), upsampled only inside its window and, when refinement clips, its box +
        margin: memory per thread follows one window. A device-resident runner's logits (a torch tensor) are
        upsampled for every mask at once where they are (``_Grid.every_window``: a few kernels per pass, one copy to
        the host), and only refinement and encoding run per mask. Masks that refinement leaves as they are get their
        RLE where the logits are."""
        each = self._each_alone if isinstance(low_res, np.ndarray) else self._all_at_once
        finish_one = each(low_res, (image.height, image.width), p, prompts)
        final = FinalMasks([], [], [])
        for mask in self._pool.map(finish_one, range(len(prompts))):
            final.encoded.append(mask.encoded)
            final.boxes.append(mask.box)
            final.stats.append(mask.stats)
        return final

    def _each_alone(
        self, low_res: Any, hw: tuple[int, int], p: Plan, prompts: list[SamPrompt]
    ) -> Callable[[int], FinishedMask]:
        """Host logits: each mask upsampled on its own, on its thread of the pool."""
        runs_there = _runs_there(p)

        def finish_one(i: int) -> FinishedMask:
            clip = clip_window(prompts[i].box, p.refinement, hw)
            up = self.segmentation.postprocess(low_res[i : i + 1], hw, [clip], rle=runs_there)
            rle = up.rle[0] if up.rle is not None else None
            return _finish_mask(up.windows[0], prompts[i], float(up.stability[0]), p, rle)

        return finish_one

    def _all_at_once(
        self, low_res: Any, hw: tuple[int, int], p: Plan, prompts: list[SamPrompt]
    ) -> Callable[[int], FinishedMask]:
        """A device-resident runner's logits: every mask upsampled there at once (on the calling thread), then
        each refined and encoded on its thread of the pool."""
        clips = [clip_window(prompt.box, p.refinement, hw) for prompt in prompts]
        every = self.segmentation.postprocess(low_res, hw, clips, rle=_runs_there(p))

        def finish_one(i: int) -> FinishedMask:
            rle = every.rle[i] if every.rle is not None else None
            return _finish_mask(every.windows[i], prompts[i], float(every.stability[i]), p, rle)

        return finish_one


def _runs_there(p: Plan) -> bool:
    """Whether masks are encoded as RLE that refinement leaves as upsampled: their runs are found where the logits
    are (``postprocess(rle=True)``)."""
    return p.mask_encoding == RLE and p.refinement.min_region_area <= 0


def _finish_mask(mask: WindowedMask, prompt: SamPrompt, stability: float, p: Plan, rle: bytes | None) -> FinishedMask:
    """One upsampled mask held as its window → refined, encoded, its box (clicks-only prompts) and review stats.

    Everything reads only the mask's window (after refinement, the tight one of its set pixels): the same results
    as reading the frame, and a small object on a large image costs its own size. ``rle``: the mask's RLE counts
    when already computed (refinement leaves it unchanged: it was upsampled within its clip window)."""
    refined = refine_window(mask, prompt.box, p.refinement) if p.refinement.active else mask
    tight = refined.tight()
    if rle is not None and _runs_there(p):
        encoded = EncodedMask(mask.height, mask.width, RLE, rle_counts=rle)
    else:
        encoded = encode_window(tight, p.mask_encoding)
    bounds = None if tight.bounds.empty else tight.bounds
    box = _bounds_box(bounds) if prompt.box is None else None
    return FinishedMask(encoded, box, _stats(tight, stability))


def _stats(tight: WindowedMask, stability: float) -> MaskStats:
    """Review's stats of a mask held as its tight window (``mask_stats``); its parts as refinement counted them,
    else counted in the crop's memory order (area and 8-connected parts of a transposed mask are the mask's)."""
    if tight.bounds.empty:
        return mask_stats(tight.crop, stability, None)
    if tight.parts is not None:
        return MaskStats(stability=stability, area=int(np.count_nonzero(tight.crop)), components=tight.parts)
    crop = tight.crop.T if tight.crop.T.flags.c_contiguous else tight.crop
    return mask_stats(crop, stability, Bounds(0, crop.shape[0], 0, crop.shape[1]))


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
