"""Mask refinement after SAM's thresholding: clip to the prompt box, fill small holes, remove small islands.

SAM answers a box with the object it sees, and sometimes spills far beyond the box onto neighbouring objects or
leaves stray fragments; a *labeled* instance whose mask covers other objects is wrong. The field's answers,
applied here per instance in this order:

1. **Clip to the box plus a margin** (box-prompted instances only: detections and region boxes). The margin is a
   fraction of the box's width / height on each side, so a detector box a little too tight loses nothing.
2. **Fill holes, then remove islands, smaller than ``min_region_area`` pixels**: exactly the semantics of SAM's
   ``remove_small_regions`` (``sam2.utils.amg``, used by its automatic mask generator with
   ``min_mask_region_area``) over the whole frame: 8-connected components; background between the mask and the
   frame's edge is a hole too when small; if every island is small, the largest one stays (of equals, the one SAM
   keeps). It runs on the mask's bounding window, padded, instead of the whole image, so its cost follows the
   object's size (``_remove_small_regions`` says how the frame beyond the window is counted). An empty mask stays
   empty (SAM's would fill a frame smaller than the area).

Masks arrive held as windows (``WindowedMask``, ``refine_window``): clipping narrows the window and writes nothing;
``refine_mask`` does the same to a whole (H, W) mask in place.

``Refinement.NONE`` leaves SAM's masks untouched (parity with ``SAM2ImagePredictor``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import cv2
import numpy as np

from service.processing.labels import by_label, label_areas
from service.processing.masks import Bounds, WindowedMask, mask_bounds


@dataclasses.dataclass(frozen=True)
class Refinement:
    """What to do to each mask. min_region_area: pixels (0 = off); box_margin: fraction of the box side per side
    (None = no clipping)."""

    min_region_area: int = 0
    box_margin: float | None = None

    NONE: ClassVar[Refinement]

    @property
    def active(self) -> bool:
        return self.min_region_area > 0 or self.box_margin is not None


Refinement.NONE = Refinement()


def clip_window(box: np.ndarray | None, refinement: Refinement, hw: tuple[int, int]) -> Bounds | None:
    """The window a mask is clipped to: its prompt box (4,) float XYXY, original-image pixels, plus the margin,
    within the (H, W) frame; None when it is not clipped (no box, or no ``box_margin``)."""
    if box is None or refinement.box_margin is None:
        return None
    h, w = hw
    bx0, by0, bx1, by1 = (float(v) for v in box)
    mx, my = (bx1 - bx0) * refinement.box_margin, (by1 - by0) * refinement.box_margin
    x0, y0 = min(w, max(0, math.floor(bx0 - mx))), min(h, max(0, math.floor(by0 - my)))
    # A box beyond the frame's edge clips the whole mask (an empty window, never negative ends).
    return Bounds(y0, max(y0, min(h, math.ceil(by1 + my))), x0, max(x0, min(w, math.ceil(bx1 + mx))))


def refine_mask(mask: np.ndarray, box: np.ndarray | None, refinement: Refinement) -> Bounds:
    """Refines one mask in place; returns a window that holds every set pixel of it afterwards.

    mask: (H, W) bool at original resolution, any memory layout (a view into a batch is fine);
    box: (4,) float XYXY in original-image pixels, the instance's prompt box, or None (clicks only: no clipping).
    """
    h, w = mask.shape
    window = clip_window(box, refinement, (h, w))
    if window is not None:
        y0, y1, x0, x1 = window.y0, window.y1, window.x0, window.x1
        mask[:y0] = False
        mask[y1:] = False
        mask[y0:y1, :x0] = False
        mask[y0:y1, x1:] = False
    else:
        window = Bounds(0, h, 0, w)
    if refinement.min_region_area <= 0:
        return window
    tight = mask_bounds(mask, window)
    if tight is None:
        return window
    cleaned = _cleaned(WindowedMask(h, w, tight, tight.crop(mask)), refinement.min_region_area)
    if tight.intersect(cleaned.bounds) == cleaned.bounds:
        tight.crop(mask)[...] = False
    else:  # background beyond the window filled (rare): the whole frame was refined
        mask[...] = False
    cleaned.bounds.crop(mask)[...] = cleaned.crop
    return cleaned.bounds


def refine_window(mask: WindowedMask, box: np.ndarray | None, refinement: Refinement) -> WindowedMask:
    """``refine_mask`` for a mask held as a window: the same pixels, without touching the frame. Clipping narrows
    the window (a view, nothing written); hole filling and island removal give a new crop of the mask's tight
    window. The returned mask's window holds every set pixel."""
    clip = clip_window(box, refinement, (mask.height, mask.width))
    if clip is not None:
        mask = mask.within(clip)
    if refinement.min_region_area <= 0:
        return mask
    return _cleaned(mask.tight(), refinement.min_region_area)


def _cleaned(tight: WindowedMask, area: int) -> WindowedMask:
    """SAM's ``remove_small_regions`` (holes, then islands) of the whole frame, computed on the mask's tight window.
    Background beyond the window is one or two components with the frame outside the window (``_Outside``); only
    when one of them is a small hole (the mask covers nearly all of a small frame) is the whole frame refined."""
    if tight.bounds.empty:
        return tight
    cleaned = _remove_small_regions(tight.crop, area, tight.bounds, (tight.height, tight.width))
    if cleaned is None:
        whole = Bounds(0, tight.height, 0, tight.width)
        cleaned = _remove_small_regions(tight.frame(), area, whole, (tight.height, tight.width))
        assert cleaned is not None  # nothing lies beyond the whole frame
        crop, parts = cleaned
        return WindowedMask(tight.height, tight.width, whole, crop, parts).tight()
    crop, parts = cleaned
    return WindowedMask(tight.height, tight.width, tight.bounds, crop, parts)


@dataclasses.dataclass(frozen=True)
class _Outside:
    """The frame's background beyond the padded window, one piece: ``pixels`` of it, and one pixel of the padded
    window's border that touches it (row, column of the padded window, as refined: transposed when it is)."""

    pixel: tuple[int, int]
    pixels: int


def _remove_small_regions(
    crop: np.ndarray, area: int, bounds: Bounds, frame: tuple[int, int]
) -> tuple[np.ndarray, int] | None:
    """SAM's hole filling then island removal for the mask whose every set pixel lies in ``crop``, the ``bounds``
    window of an (H, W) ``frame``: the new crop (same shape) and the number of 8-connected parts left (island removal
    counts them); None when a small hole reaches beyond the window (``_cleaned`` then refines the whole frame).

    The window is padded with background on each side that is not the frame's edge, so background reaching it is
    joined to the frame beyond (``_Outside``: its area counts; a notch between the mask and the frame's edge is a hole,
    as it is to SAM). The padding also puts the padded window's origin on an even row and column of the frame:
    OpenCV labels 2 x 2 blocks from the origin, so islands are numbered in the order SAM's whole-frame labelling
    numbers them, and of equally large islands (all small) the one SAM keeps stays (``_largest``).

    Components are the same in a mask and its transpose, so the mask is labelled in its own memory order (a view of
    column-major memory, as upsampling makes masks, is labelled as its C-contiguous transpose: OpenCV then reads it
    without a copy, and the result keeps the layout RLE reads)."""
    (h, w), y0, x0 = frame, bounds.y0, bounds.x0
    top, left = (0 if v == 0 else 1 + (v - 1) % 2 for v in (y0, x0))
    bottom, right = int(bounds.y1 < h), int(bounds.x1 < w)
    rows, cols = (top, bottom), (left, right)
    across = crop.strides[0] < crop.strides[1]  # column-major: rows of the transpose are contiguous
    padded = np.pad(crop.T, (cols, rows)) if across else np.pad(crop, (rows, cols))
    outside = _outside(bounds, frame, rows, cols, across)
    filled = _fill_small_holes(padded, area, outside)
    inner = (slice(left, left + crop.shape[1]), slice(top, top + crop.shape[0]))
    inner = inner if across else inner[::-1]
    if filled is not padded and np.count_nonzero(filled) != np.count_nonzero(filled[inner]):
        return None  # a hole filled reaches the padding: beyond the window
    kept, parts = _remove_small_islands(filled, area, across)
    kept = kept[inner]
    return (kept.T if across else kept), parts


def _outside(
    bounds: Bounds, frame: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], across: bool
) -> list[_Outside]:
    """The pieces of the frame beyond the padded window (all background): one, unless the window spans the frame's
    width (then the rows above and the rows below) or its height (the columns left and right)."""
    (h, w), (top, bottom), (left, right) = frame, rows, cols
    y0, y1, x0, x1 = bounds.y0 - top, bounds.y1 + bottom, bounds.x0 - left, bounds.x1 + right
    wide, tall = x0 == 0 and x1 == w, y0 == 0 and y1 == h
    pieces: list[tuple[tuple[int, int], int]] = []
    if not wide and not tall:
        pieces.append(((0, 0) if top or left else (-1, -1), h * w - (y1 - y0) * (x1 - x0)))
    elif wide and not tall:
        pieces += [((0, 0), y0 * w)] if top else []
        pieces += [((-1, 0), (h - y1) * w)] if bottom else []
    elif tall and not wide:
        pieces += [((0, 0), x0 * h)] if left else []
        pieces += [((0, -1), (w - x1) * h)] if right else []
    return [_Outside((c, r) if across else (r, c), n) for (r, c), n in pieces]


def _fill_small_holes(mask: np.ndarray, area: int, outside: list[_Outside]) -> np.ndarray:
    """mask: (h, w) bool, C-contiguous, padded (``_remove_small_regions``) → it with every background component
    under ``area`` pixels filled, counting the frame beyond the padded window (``outside``); ``mask`` itself when
    none is."""
    n, found = cv2.connectedComponents(np.logical_not(mask).view(np.uint8), connectivity=8)
    if n <= 1 or (n == 2 and any(o.pixels >= area for o in outside)):
        return mask  # no background, or one component larger than the frame beyond (most masks; no areas counted)
    labels = np.asarray(found, np.int32)
    sizes = label_areas(labels, n)
    for o in outside:
        sizes[labels[o.pixel]] += o.pixels
    stays = sizes >= area  # background that stays: holes too large to fill, and the background around the object
    stays[0] = False  # the mask
    if stays.sum() == n - 1:
        return mask
    return by_label(~stays, labels)


def _remove_small_islands(mask: np.ndarray, area: int, across: bool) -> tuple[np.ndarray, int]:
    """mask: (h, w) bool, C-contiguous → the mask without islands under ``area`` pixels, and its islands left.
    ``across``: the mask is the transpose of the one refined (ties among the largest islands broken in its order)."""
    n, found = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
    if n <= 2:  # one island (or none) stays whatever its area
        return mask, n - 1
    labels = np.asarray(found, np.int32)
    sizes = label_areas(labels, n)
    keep = sizes >= area
    keep[0] = False  # the background
    if keep[1:].all():
        return mask, n - 1
    if not keep.any():  # every island is small: the largest stays
        keep[_largest(mask, labels, sizes, across)] = True
    return by_label(keep, labels), int(keep.sum())


def _largest(mask: np.ndarray, labels: np.ndarray, sizes: np.ndarray, across: bool) -> int:
    """The label of the largest island; among equals, the one SAM keeps: the first OpenCV numbers labelling the
    refined mask (``np.argmax`` takes the first). Labels of the transpose (``across``) come in another order, so
    then the refined mask itself is labelled too (a copy; ties are rare)."""
    largest = np.flatnonzero(sizes[1:] == sizes[1:].max()) + 1
    if len(largest) == 1 or not across:
        return int(largest[0])
    _, refined = cv2.connectedComponents(np.ascontiguousarray(mask.T).view(np.uint8), connectivity=8)
    first = [np.unravel_index(np.flatnonzero(labels == k)[0], labels.shape) for k in largest]
    return int(min(zip((refined[c, r] for r, c in first), largest, strict=True))[1])
