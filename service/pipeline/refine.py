"""Mask refinement after SAM's thresholding: clip to the prompt box, fill small holes, remove small islands.

SAM answers a box with the object it sees, and sometimes spills far beyond the box onto neighbouring objects or
leaves stray fragments; a *labeled* instance whose mask covers other objects is wrong. The field's answers,
applied here per instance in this order:

1. **Clip to the box plus a margin** (box-prompted instances only: detections and region boxes). The margin is a
   fraction of the box's width / height on each side, so a detector box a little too tight loses nothing.
2. **Fill holes, then remove islands, smaller than ``min_region_area`` pixels**: exactly the semantics of SAM's
   ``remove_small_regions`` (``sam2.utils.amg``, used by its automatic mask generator with
   ``min_mask_region_area``): 8-connected components; if every island is small, the largest one stays. It runs
   on the mask's bounding window (plus a one-pixel border) instead of the whole image, so its cost follows the
   object's size; background that reaches the window's border is never a hole.

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
    """Refines one mask in place; returns a window that holds every set pixel of it afterwards (the box + margin
    it was clipped to, else the whole frame).

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
    crop = tight.crop(mask)
    crop[...] = remove_small_regions_windowed(crop, refinement.min_region_area)
    return tight  # hole filling stays inside the mask's window, island removal only shrinks it


def refine_window(mask: WindowedMask, box: np.ndarray | None, refinement: Refinement) -> WindowedMask:
    """``refine_mask`` for a mask held as a window: the same pixels, without touching the frame. Clipping narrows
    the window (a view, nothing written); hole filling and island removal give a new crop of the mask's tight
    window. The returned mask's window holds every set pixel."""
    clip = clip_window(box, refinement, (mask.height, mask.width))
    if clip is not None:
        mask = mask.within(clip)
    if refinement.min_region_area <= 0:
        return mask
    tight = mask.tight()
    if tight.bounds.empty:
        return tight
    crop, parts = _remove_small_regions(tight.crop, refinement.min_region_area)
    return WindowedMask(mask.height, mask.width, tight.bounds, crop, parts)


def remove_small_regions_windowed(crop: np.ndarray, area: int) -> np.ndarray:
    """SAM's hole filling then island removal on a window that holds the whole mask.

    crop: (h, w) bool, the mask's bounding window. Returns a new (h, w) bool array.
    """
    return _remove_small_regions(crop, area)[0]


def _remove_small_regions(crop: np.ndarray, area: int) -> tuple[np.ndarray, int]:
    """``remove_small_regions_windowed``, and the number of 8-connected parts left (island removal counts them).

    Components are the same in a mask and its transpose, so the mask is labelled in its own memory order (a view of
    column-major memory, as upsampling makes masks, is labelled as its C-contiguous transpose: OpenCV then reads it
    without a copy, and the result keeps the layout RLE reads); only which of equally large islands stays when all
    are small depends on the order, and ``_largest`` breaks that tie in the mask's row-major order, as SAM does."""
    across = crop.strides[0] < crop.strides[1]  # column-major: rows of the transpose are contiguous
    padded = np.pad(crop.T if across else crop, 1)  # background around the window: one component, reaching the border
    filled = _fill_small_holes(padded, area)
    kept, parts = _remove_small_islands(filled, area, across)
    kept = kept[1:-1, 1:-1]
    return (kept.T if across else kept), parts


def _fill_small_holes(mask: np.ndarray, area: int) -> np.ndarray:
    """mask: (h, w) bool, C-contiguous, background reaching its border."""
    n, found = cv2.connectedComponents(np.logical_not(mask).view(np.uint8), connectivity=8)
    if n <= 2:  # the mask (label 0) and the background around it: no hole (most masks; no areas to count)
        return mask
    labels = np.asarray(found, np.int32)
    outside = labels[0, 0]  # the padding's component: the background around the object, never a hole
    stays = label_areas(labels, n) >= area  # background that stays: the outside and holes too large to fill
    stays[0], stays[outside] = False, True
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
        keep[_largest(labels, sizes, across)] = True
    return by_label(keep, labels), int(keep.sum())


def _largest(labels: np.ndarray, sizes: np.ndarray, across: bool) -> int:
    """The label of the largest island; among equals, the one SAM keeps: the first in the refined mask's row-major
    order (OpenCV numbers components in the order it meets them, and ``np.argmax`` takes the first)."""
    largest = np.flatnonzero(sizes[1:] == sizes[1:].max()) + 1
    if len(largest) == 1 or not across:
        return int(largest[0])
    in_order = labels.T.reshape(-1)  # the refined mask's row-major order (a copy; ties are rare)
    return int(in_order[np.flatnonzero(np.isin(in_order, largest))[0]])
