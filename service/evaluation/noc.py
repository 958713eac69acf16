"""Annotator effort: NoC@85 / NoC@90, the number of clicks a simulated annotator needs to bring a mask to IoU
0.85 / 0.90 with the ground truth (at most ``MAX_CLICKS``; an instance that never gets there counts as
``MAX_CLICKS``), the standard figure of interactive segmentation (e.g. RITM, SimpleClick).

The annotator (deterministic): the first click is positive, at the point of the object farthest from its
boundary; every next click goes to the largest error region of the current mask, at its point farthest from
the region's boundary (OpenCV's exact L2 distance transform; ties to the first pixel in row-major order):
positive when the region is a miss (object not covered), negative when it is a spill. All clicks so far go to
the service as one region prompt on the image's cached handle (EncodeImage: the encoder runs once per image),
SAM choosing among three candidate masks while there is a single click (``multimask``), as SAM's own
interactive demo does. Clicking stops once IoU reaches the highest threshold; the IoU-per-click curve carries
the last IoU forward to ``MAX_CLICKS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

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
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def next_click(gt: np.ndarray, mask: np.ndarray) -> Click:
    """The click at the centre of the largest error region of ``mask`` against ``gt`` (both (H, W) bool)."""
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((gt & ~mask, True), (mask & ~gt, False)):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region.view(np.uint8), connectivity=8)
        if count <= 1:
            continue
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[k, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, labels == k, positive)
    if best is None:  # the mask is perfect already: a confirming click on the object
        x, y = interior_point(gt)
        return Click(x + 0.5, y + 0.5, True)
    x, y = interior_point(best[1])
    return Click(x + 0.5, y + 0.5, best[2])


def annotate(
    client: Client, handle: ImageHandle, gt: np.ndarray, annotation_id: int, thresholds: Sequence[float] = THRESHOLDS
) -> InstanceEffort:
    """Clicks on one ground-truth mask (H, W) bool until IoU >= max(thresholds) or MAX_CLICKS."""
    clicks: list[Click] = []
    ious: list[float] = []
    mask = np.zeros_like(gt)
    while len(clicks) < MAX_CLICKS and (not ious or ious[-1] < max(thresholds)):
        clicks.append(next_click(gt, mask))
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
