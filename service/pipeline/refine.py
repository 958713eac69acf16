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

``Refinement.NONE`` leaves SAM's masks untouched (parity with ``SAM2ImagePredictor``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import cv2
import numpy as np

from service.processing.masks import Bounds, mask_bounds


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


def refine_mask(mask: np.ndarray, box: np.ndarray | None, refinement: Refinement) -> Bounds:
    """Refines one mask in place; returns a window that holds every set pixel of it afterwards (the box + margin
    it was clipped to, else the whole frame).

    mask: (H, W) bool at original resolution, any memory layout (a view into a batch is fine);
    box: (4,) float XYXY in original-image pixels, the instance's prompt box, or None (clicks only: no clipping).
    """
    h, w = mask.shape
    y0, y1, x0, x1 = 0, h, 0, w
    if box is not None and refinement.box_margin is not None:
        bx0, by0, bx1, by1 = (float(v) for v in box)
        mx, my = (bx1 - bx0) * refinement.box_margin, (by1 - by0) * refinement.box_margin
        x0, x1 = max(0, math.floor(bx0 - mx)), min(w, math.ceil(bx1 + mx))
        y0, y1 = max(0, math.floor(by0 - my)), min(h, math.ceil(by1 + my))
        mask[:y0] = False
        mask[y1:] = False
        mask[y0:y1, :x0] = False
        mask[y0:y1, x1:] = False
    window = Bounds(y0, y1, x0, x1)
    if refinement.min_region_area <= 0:
        return window
    tight = mask_bounds(mask, window)
    if tight is None:
        return window
    crop = tight.crop(mask)
    crop[...] = remove_small_regions_windowed(crop, refinement.min_region_area)
    return tight  # hole filling stays inside the mask's window, island removal only shrinks it


def remove_small_regions_windowed(crop: np.ndarray, area: int) -> np.ndarray:
    """SAM's hole filling then island removal on a window that holds the whole mask.

    crop: (h, w) bool, the mask's bounding window. Returns a new (h, w) bool array.
    """
    padded = np.pad(crop, 1)  # background around the window: one component, reaching the border
    filled = _fill_small_holes(padded, area)
    return _remove_small_islands(filled, area)[1:-1, 1:-1]


def _fill_small_holes(mask: np.ndarray, area: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=8)
    outside = labels[0, 0]  # the padding's component: the background around the object, never a hole
    fill = stats[:, cv2.CC_STAT_AREA] < area  # a lookup table by label: much faster than np.isin
    fill[0] = fill[outside] = False
    if not fill.any():
        return mask
    return mask | fill[labels]


def _remove_small_islands(mask: np.ndarray, area: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sizes = stats[:, cv2.CC_STAT_AREA]
    keep = sizes >= area
    keep[0] = False  # the background
    if keep[1:].all():
        return mask
    if not keep.any():  # every island is small: the largest stays
        keep[int(np.argmax(sizes[1:])) + 1] = True
    return keep[labels]
