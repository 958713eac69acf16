"""Annotator effort: NoC@85 / NoC@90, the number of clicks a simulated annotator needs to bring a mask to IoU
0.85 / 0.90 with the ground truth (at most ``MAX_CLICKS``; an instance that never gets there counts as
``MAX_CLICKS``), the standard figure of interactive segmentation (e.g. RITM, SimpleClick).

The annotator (deterministic) is RITM's (``isegm/inference/clicker.py``, ``Clicker._get_next_click``), which
SimpleClick and later work evaluate with: over the whole miss (object not covered) and the whole spill (covered,
not object) of the current mask, each pixel's distance to the nearest pixel outside it (the exact L2 distance
transform, exact, the image edge counting as outside), pixels clicked before excluded; the click goes to the farthest
pixel (the first in row-major order), positive when the miss's farthest is farther than the spill's, else negative.
The first click (no mask yet) is thus positive, at the point of the object farthest from its boundary.
All clicks so far go to the service as one region prompt on the image's cached handle (EncodeImage: the encoder runs
once per image), SAM choosing among three candidate masks while there is a single click (``multimask``), as SAM's
own interactive demo does. Clicking stops once IoU reaches the highest threshold; the IoU-per-click curve carries
the last IoU forward to ``MAX_CLICKS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from service.client import Client, ImageHandle, Point, Region

MAX_CLICKS = 20
THRESHOLDS = (0.85, 0.90)


@dataclasses.dataclass(frozen=True)
class Click:
    """Pixel-centre coordinates (original pixels) and whether it says "object" (True) or "not object"."""

    x: float
    y: float
    positive: bool


@dataclasses.dataclass(frozen=True)
class InstanceEffort:
    """The clicks given and the IoU after each (same length)."""

    annotation_id: int
    clicks: tuple[Click, ...]
    ious: tuple[float, ...]

    def noc(self, threshold: float) -> int:
        """Clicks until IoU >= threshold; MAX_CLICKS if never."""
        return next((n + 1 for n, iou in enumerate(self.ious) if iou >= threshold), MAX_CLICKS)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``region`` (H, W) bool farthest from its boundary (the image edge counts as
    boundary); the first such pixel in row-major order."""
    distance = _distance(region)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def next_click(gt: np.ndarray, mask: np.ndarray, previous: Sequence[Click] = ()) -> Click:
    """RITM's next click on ``mask`` against ``gt`` (both (H, W) bool), never on a pixel of the ``previous`` clicks
    (the module docstring). Where nothing is left to click (the mask is perfect, or every error pixel was clicked), a
    confirming click on the object."""
    clicked = np.ones(gt.shape, np.float32)  # RITM's not_clicked_map
    for c in previous:
        clicked[int(c.y), int(c.x)] = 0.0
    miss = _distance(gt & ~mask) * clicked
    spill = _distance(mask & ~gt) * clicked
    farthest_miss, farthest_spill = float(miss.max(initial=0.0)), float(spill.max(initial=0.0))
    if farthest_miss == farthest_spill == 0.0:
        x, y = interior_point(gt)
        return Click(x + 0.5, y + 0.5, True)
    positive = farthest_miss > farthest_spill
    distance = miss if positive else spill
    row, column = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return Click(int(column) + 0.5, int(row) + 0.5, positive)


def _distance(region: np.ndarray) -> np.ndarray:
    """Each pixel of ``region`` (H, W) bool: its L2 distance to the nearest pixel outside it, the image edge counting
    as outside (0 outside the region). SciPy's exact transform: OpenCV's (RITM's) differs by float rounding from run
    to run (its threads), which decided between pixels at equal distances. Computed on the region's bounding box and
    a ring of outside around it, the same distances (a pixel beyond the ring is never nearer than the ring) at a
    fraction of the cost for a small object in a large photo."""
    out = np.zeros(region.shape, np.float64)
    rows, columns = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if rows.size:
        box = np.s_[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        out[box] = ndimage.distance_transform_edt(np.pad(region[box], 1))[1:-1, 1:-1]
    return out


def annotate(
    client: Client, handle: ImageHandle, gt: np.ndarray, annotation_id: int, thresholds: Sequence[float] = THRESHOLDS
) -> InstanceEffort:
    """Clicks on one ground-truth mask (H, W) bool until IoU >= max(thresholds) or MAX_CLICKS."""
    clicks: list[Click] = []
    ious: list[float] = []
    mask = np.zeros_like(gt)
    while len(clicks) < MAX_CLICKS and (not ious or ious[-1] < max(thresholds)):
        clicks.append(next_click(gt, mask, clicks))
        points = tuple(Point(c.x, c.y, c.positive) for c in clicks)
        result = client.segment(handle, regions=[Region(points=points)], multimask=len(clicks) == 1)
        mask = result.instances[0].mask
        ious.append(mask_iou(mask, gt))
    return InstanceEffort(annotation_id, tuple(clicks), tuple(ious))


def summarize(efforts: Sequence[InstanceEffort], thresholds: Sequence[float] = THRESHOLDS) -> dict[str, object]:
    """NoC per threshold (mean clicks), the share that never got there, and mean IoU after 1..MAX_CLICKS clicks."""
    out: dict[str, object] = {"instances": len(efforts)}
    for t in thresholds:
        nocs = [e.noc(t) for e in efforts]
        out[f"noc@{round(t * 100)}"] = float(np.mean(nocs)) if nocs else None
        # never reached within MAX_CLICKS (RITM's NoF): an instance past t once and below it later reached it
        out[f"failed@{round(t * 100)}"] = (
            (sum(all(iou < t for iou in e.ious) for e in efforts) / len(efforts)) if efforts else None
        )
    curve = [[(e.ious[min(n, len(e.ious) - 1)]) for e in efforts] for n in range(MAX_CLICKS)]
    out["mean_iou_per_click"] = [float(np.mean(c)) for c in curve] if efforts else []
    return out
