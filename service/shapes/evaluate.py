"""Quality metrics for the shapes world: our own computation, and pycocotools' COCOeval to cross-check.

- ``ap50``: COCO-style box AP at IoU 0.5 (101-point interpolation, per-class then averaged), written here.
- ``coco_eval``: the same data through pycocotools ``COCOeval`` (bbox or segm), for the cross-check.
- ``match_instances`` / ``end_to_end``: one-to-one matching of predicted to ground-truth masks by mask IoU
  (predictions in score order, as COCOeval), then label accuracy of matched pairs, their mean mask IoU,
  and recall.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predicted instance. box: XYXY original pixels; rle: pycocotools RLE dict (bytes counts)."""

    image_id: int
    category_id: int  # COCO id (1-based)
    score: float
    box: tuple[float, float, float, float]
    rle: dict[str, Any]


def _box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) XYWH → (N, M) IoU, as COCO computes it (no +1)."""
    ax0, ay0, aw, ah = a.T[:, :, None]
    bx0, by0, bw, bh = b.T[:, None, :]
    iw = np.clip(np.minimum(ax0 + aw, bx0 + bw) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay0 + ah, by0 + bh) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def ap50(predictions: Sequence[Prediction], gt: dict[str, Any], max_dets: int = 100) -> float:
    """Mean over categories (with ground truth) of box AP at IoU 0.5, COCO's 101-point interpolation."""
    gts: dict[tuple[int, int], list[list[float]]] = {}
    for a in gt["annotations"]:
        gts.setdefault((a["image_id"], a["category_id"]), []).append(a["bbox"])
    per_image: dict[int, list[Prediction]] = {}
    for p in predictions:
        per_image.setdefault(p.image_id, []).append(p)
    kept = [p for ps in per_image.values() for p in sorted(ps, key=lambda p: -p.score)[:max_dets]]
    aps = []
    recall_points = np.linspace(0, 1, 101)
    for cat in sorted({c["id"] for c in gt["categories"]}):
        n_gt = sum(len(v) for (_, c), v in gts.items() if c == cat)
        if n_gt == 0:
            continue
        dets = [p for p in kept if p.category_id == cat]
        tp = np.zeros(len(dets))
        by_image: dict[int, list[int]] = {}
        for i, p in enumerate(dets):
            by_image.setdefault(p.image_id, []).append(i)
        for image_id, idx in by_image.items():
            boxes = np.array(gts.get((image_id, cat), []), np.float64).reshape(-1, 4)
            idx = sorted(idx, key=lambda i: -dets[i].score)
            if not len(boxes):
                continue
            d = np.array([[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (dets[i].box for i in idx)], np.float64)
            ious = _box_iou_xywh(d, boxes)
            used = np.zeros(len(boxes), bool)
            for row, i in enumerate(idx):
                candidates = np.where(~used & (ious[row] >= 0.5))[0]
                if len(candidates):
                    best = candidates[ious[row, candidates].argmax()]
                    used[best] = True
                    tp[i] = 1
        order = np.argsort([-p.score for p in dets], kind="mergesort")
        tps = np.cumsum(tp[order])
        fps = np.cumsum(1 - tp[order])
        recall = tps / n_gt
        precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        sampled = [
            precision[np.searchsorted(recall, r, side="left")] if r <= (recall[-1] if len(recall) else -1) else 0.0
            for r in recall_points
        ]
        aps.append(float(np.mean(sampled)))
    return float(np.mean(aps)) if aps else 0.0


def coco_eval(predictions: Sequence[Prediction], gt: dict[str, Any], iou_type: str) -> dict[str, float]:
    """pycocotools COCOeval (``bbox`` or ``segm``): returns {"map": AP@[.5:.95], "map50": AP@.5}."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        results = [
            {
                "image_id": p.image_id,
                "category_id": p.category_id,
                "score": p.score,
                "bbox": [p.box[0], p.box[1], p.box[2] - p.box[0], p.box[3] - p.box[1]],
                "segmentation": {"size": p.rle["size"], "counts": _text(p.rle["counts"])},
            }
            for p in predictions
        ]
        if not results:
            return {"map": 0.0, "map50": 0.0}
        coco_dt = coco_gt.loadRes(results)
        e = COCOeval(coco_gt, coco_dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {"map": float(e.stats[0]), "map50": float(e.stats[1])}


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


@dataclasses.dataclass(frozen=True)
class EndToEnd:
    images: int
    ground_truth: int
    predictions: int
    matched: int
    label_accuracy: float  # matched pairs whose label is right
    mean_mask_iou: float  # over matched pairs
    recall: float  # matched / ground truth

    @property
    def precision(self) -> float:
        return self.matched / self.predictions if self.predictions else 0.0


def match_instances(pred: Sequence[dict[str, Any]], gt: Sequence[dict[str, Any]], threshold: float = 0.5):
    """One-to-one matching by mask IoU, as COCOeval matches: predictions in descending ``score`` order, each
    taking the unmatched ground truth it overlaps most (IoU >= threshold). Returns [(pi, gi, iou)].

    Score order matters when two predictions cover one object (say a circle also detected as a hexagon):
    the more confident one is the answer, not whichever mask happens to overlap a hair more.
    """
    if not pred or not gt:
        return []
    ious = mask_utils.iou([_rle(p) for p in pred], [_rle(g) for g in gt], [0] * len(gt))
    used: set[int] = set()
    out = []
    for i in sorted(range(len(pred)), key=lambda k: -float(pred[k]["score"])):
        candidates = [(ious[i, j], j) for j in range(len(gt)) if j not in used and ious[i, j] >= threshold]
        if candidates:
            iou, j = max(candidates)
            used.add(j)
            out.append((i, j, float(iou)))
    return out


def _rle(item: dict[str, Any]) -> dict[str, Any]:
    rle = item["rle"]
    return {"size": list(rle["size"]), "counts": rle["counts"]}


def end_to_end(pairs: Sequence[tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]]) -> EndToEnd:
    """pairs: per image (predictions, ground truth), each item a dict with "label" and "rle" (predictions also
    "score")."""
    n_gt = n_pred = n_match = n_right = 0
    ious: list[float] = []
    for pred, gt in pairs:
        n_gt, n_pred = n_gt + len(gt), n_pred + len(pred)
        for i, j, iou in match_instances(pred, gt):
            n_match += 1
            n_right += pred[i]["label"] == gt[j]["label"]
            ious.append(iou)
    return EndToEnd(
        images=len(pairs),
        ground_truth=n_gt,
        predictions=n_pred,
        matched=n_match,
        label_accuracy=n_right / n_match if n_match else 0.0,
        mean_mask_iou=float(np.mean(ious)) if ious else 0.0,
        recall=n_match / n_gt if n_gt else 0.0,
    )
