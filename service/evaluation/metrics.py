"""Figures of predictions against a COCO ground truth, all from pycocotools (nothing re-implemented).

- AP and AP50, mask and box: ``COCOeval`` on every prediction (``stats[0]``, ``stats[1]``).
- At the operating threshold (the score a user keeps instances at): ``COCOeval`` again on those predictions,
  and its own matching at IoU 0.5 (``evalImgs[...]["dtMatches"]``, area "all", 100 detections) decides which
  prediction matched which ground-truth instance; the mask IoU of a matched pair is ``pycocotools.mask.iou``.
  From the matches: mean mask IoU of matched instances per class and per slice (attribute = value), recall
  (matched ground truth / ground truth), false positives per image (unmatched predictions / images), and the
  share of predictions flagged for review.
- Review trade-off, per rule and for any rule: how many predictions it sends to a person (load), and how many
  of the errors it catches (an error: a prediction that matched nothing, or matched with mask IoU under
  ``good_iou``), and the recall left if flagged predictions were dropped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.evaluation.dataset import EvalDataset
from service.evaluation.predict import ImagePrediction
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.results import enum_name

# The review rules, named as results name them (the proto's ReviewReason values but UNSPECIFIED, in order).
REVIEW_RULES = tuple(
    enum_name(pb.ReviewReason, v) for v in pb.ReviewReason.values() if v != pb.REVIEW_REASON_UNSPECIFIED
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One prediction at the operating threshold: the ground-truth id it matched (0: none) and their mask IoU."""

    image_id: int
    category_id: int
    score: float
    gt_id: int
    mask_iou: float
    review_reasons: tuple[str, ...]
    mask_score: float
    stability: float


def coco_results(dataset: EvalDataset, predictions: Sequence[ImagePrediction], min_score: float = 0.0) -> list[dict]:
    """COCO results (segmentation RLE, bbox XYWH, score) of the predictions with a dataset category and
    ``score >= min_score``; each carries ``review_reasons`` (ignored by pycocotools). A caller's region (``--prompt
    boxes``) scores 1 as an instance: its result is ranked by its mask score (SAM's predicted IoU) instead, as SAM's
    own evaluations rank masks; with every score 1, AP followed the order of the ground truth in the file."""
    out = []
    for image in predictions:
        for p in image.instances:
            i = p.instance
            if p.category_id is None or i.score < min_score:
                continue
            x0, y0, x1, y1 = i.box
            out.append(
                {
                    "image_id": image.image_id,
                    "category_id": p.category_id,
                    "score": float(i.mask_score if i.source == "region_prompt" else i.score),
                    "segmentation": {"size": list(i.rle["size"]), "counts": i.rle["counts"]},
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "review_reasons": list(i.review_reasons),
                    "mask_score": float(i.mask_score),
                    "stability": float(i.stability),
                }
            )
    return out


def cocoeval(dataset: EvalDataset, results: list[dict], iou_type: str, *, every_result: bool = False) -> Any:
    """A COCOeval (``iou_type`` "segm" or "bbox") evaluated and accumulated, or None with no results.
    ``every_result``: its largest ``maxDets`` raised from COCO's 100 to the most results of one image and category,
    so that every result is matched (the operating threshold's figures: COCOeval leaves the results past 100 out,
    and they counted as false positives, their ground truth as missed); AP and AP50 keep COCO's 100."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return None
    # loadRes takes a result's area from its bbox when it has one: mask results go without (area = mask
    # pixels, bbox from the mask), box results without their segmentation
    drop = "bbox" if iou_type == "segm" else "segmentation"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset.coco
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results]), iou_type)
        if every_result:
            most = max(collections.Counter((r["image_id"], r["category_id"]) for r in results).values())
            e.params.maxDets = [*e.params.maxDets[:-1], max(most, e.params.maxDets[-1])]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def outcomes(dataset: EvalDataset, e: Any, results: list[dict]) -> tuple[list[Outcome], set[int]]:
    """Each result's match at IoU 0.5 (area "all", most detections) in COCOeval ``e`` over ``results``, and the
    set of matched ground-truth ids. A result COCOeval ignores (matched to a crowd region: ``dtIgnore``) is left
    out, as COCO leaves it out of AP: neither a match nor a false positive."""
    from pycocotools import mask as mask_utils

    gts = {a["id"]: a for a in dataset.coco["annotations"]}
    by_id = {i + 1: r for i, r in enumerate(results)}  # loadRes numbers results 1..N in order
    t = 0  # iouThrs[0] == 0.5
    assert e.params.iouThrs[t] == 0.5
    matched: dict[int, int] = {}
    ignored: set[int] = set()
    for ev in e.evalImgs:
        if ev is None or ev["aRng"] != e.params.areaRng[0] or ev["maxDet"] != e.params.maxDets[-1]:
            continue
        for d, g, skip in zip(ev["dtIds"], ev["dtMatches"][t], ev["dtIgnore"][t], strict=True):
            matched[int(d)] = int(g)
            if skip:
                ignored.add(int(d))
    out = []
    for d, r in by_id.items():
        if d in ignored:
            continue
        g = matched.get(d, 0)
        iou = 0.0
        if g:
            gt_rle = dataset_rle(gts[g], dataset)
            iou = float(mask_utils.iou([_rle(r["segmentation"])], [gt_rle], [0])[0][0])
        out.append(
            Outcome(
                r["image_id"],
                r["category_id"],
                r["score"],
                g,
                iou,
                tuple(r["review_reasons"]),
                r["mask_score"],
                r["stability"],
            )
        )
    return out, {o.gt_id for o in out if o.gt_id}


def dataset_rle(annotation: dict[str, Any], dataset: EvalDataset) -> dict[str, Any]:
    """A ground-truth annotation's mask as compressed RLE (polygons and uncompressed RLE converted by
    pycocotools, as COCO.annToRLE does)."""
    from pycocotools import mask as mask_utils

    image = dataset.image(annotation["image_id"])
    seg = annotation["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, image.height, image.width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, image.height, image.width)
    return _rle(seg)


def _rle(seg: dict[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _group(
    outs: Sequence[Outcome], gt_ids: Sequence[int], matched: set[int], images: int
) -> dict[str, float | int | None]:
    good = [o.mask_iou for o in outs if o.gt_id]
    return {
        "ground_truth": len(gt_ids),
        "predictions": len(outs),
        "recall": (sum(g in matched for g in gt_ids) / len(gt_ids)) if gt_ids else None,
        "mean_mask_iou": _mean(good),
        "false_positives_per_image": sum(not o.gt_id for o in outs) / images if images else None,
        "flagged_share": (sum(bool(o.review_reasons) for o in outs) / len(outs)) if outs else None,
    }


def evaluate(
    dataset: EvalDataset, predictions: Sequence[ImagePrediction], operating_threshold: float, good_iou: float = 0.75
) -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-ready dict (None where a figure has no data)."""
    everything = coco_results(dataset, predictions)
    kept = coco_results(dataset, predictions, operating_threshold)
    all_gt = [a["id"] for a in dataset.coco["annotations"] if not a.get("iscrowd")]
    figures: dict[str, Any] = {
        "images": len(dataset.images),
        "ground_truth": len(all_gt),  # crowd regions are not instances to find (COCO ignores them)
        "operating_threshold": operating_threshold,
        "good_iou": good_iou,
        "failed_images": [
            {"image_id": p.image_id, "file_name": dataset.image(p.image_id).file_name, "error": p.error}
            for p in predictions
            if p.error
        ],
    }
    for iou_type, name in (("segm", "mask"), ("bbox", "box")):
        e = cocoeval(dataset, everything, iou_type)
        figures[f"{name}_ap"] = _ap(e, 0, bool(all_gt))
        figures[f"{name}_ap50"] = _ap(e, 1, bool(all_gt))
        if name == "mask":
            figures["pr_curves"] = _pr_curves(dataset, e)
            figures["ap50_per_class"] = _ap50_per_class(e, dataset)
    e = cocoeval(dataset, kept, "segm", every_result=True)
    outs, matched = outcomes(dataset, e, kept) if e is not None else ([], set())
    figures["overall"] = _group(outs, all_gt, matched, len(dataset.images))
    figures["matched_mask_ious"] = [o.mask_iou for o in outs if o.gt_id]
    figures["per_class"] = {
        name: _group(
            [o for o in outs if o.category_id == cid],
            [a["id"] for a in dataset.coco["annotations"] if a["category_id"] == cid and not a.get("iscrowd")],
            matched,
            len(dataset.images),
        )
        for cid, name in dataset.categories.items()
    }
    figures["per_slice"] = _per_slice(dataset, outs, matched)
    figures["review"] = _review_tradeoff(outs, all_gt, matched, good_iou)
    figures["review_curves"] = _review_curves(outs, good_iou)
    return figures


# The continuous review rules, swept: rule name → the Outcome field it thresholds ("flag when below").
SWEPT = {"low_score": "score", "low_mask_score": "mask_score", "unstable_mask": "stability"}


def _review_curves(outs: Sequence[Outcome], good_iou: float) -> dict[str, dict[str, list[float]]]:
    """For each continuous rule, flagging below thresholds 0, 0.02, ..., 1: the load and the share of errors
    caught (what choosing that threshold would do on this data)."""
    errors = [not o.gt_id or o.mask_iou < good_iou for o in outs]
    total = sum(errors)
    thresholds = [round(t, 2) for t in np.linspace(0, 1, 51)]
    curves = {}
    for rule, field in SWEPT.items():
        values = np.array([getattr(o, field) for o in outs], dtype=np.float64)
        wrong = np.array(errors, dtype=bool)
        load, caught = [], []
        for t in thresholds:
            flagged = values < t
            load.append(float(flagged.mean()) if len(values) else 0.0)
            caught.append(float((flagged & wrong).sum() / total) if total else 0.0)
        curves[rule] = {"thresholds": thresholds, "load": load, "error_recall": caught}
    return curves


def _per_slice(dataset: EvalDataset, outs: Sequence[Outcome], matched: set[int]) -> dict[str, dict[str, Any]]:
    """{attribute: {value: figures}}: the images holding that value, their predictions and ground truth."""
    out: dict[str, dict[str, Any]] = {}
    annotations = [a for a in dataset.coco["annotations"] if not a.get("iscrowd")]
    for attribute in dataset.slice_names:
        groups: dict[str, set[int]] = defaultdict(set)
        for image in dataset.images:
            groups[image.slices.get(attribute, "(none)")].add(image.id)
        out[attribute] = {
            value: _group(
                [o for o in outs if o.image_id in ids],
                [a["id"] for a in annotations if a["image_id"] in ids],
                matched,
                len(ids),
            )
            | {"images": len(ids)}
            for value, ids in sorted(groups.items())
        }
    return out


def _review_tradeoff(
    outs: Sequence[Outcome], gt_ids: Sequence[int], matched: set[int], good_iou: float
) -> dict[str, dict[str, float | int | None]]:
    errors = {id(o) for o in outs if not o.gt_id or o.mask_iou < good_iou}
    table = {}
    for rule in (*REVIEW_RULES, "any"):
        flagged = [o for o in outs if (rule in o.review_reasons if rule != "any" else bool(o.review_reasons))]
        caught = sum(id(o) in errors for o in flagged)
        flagged_ids = {id(o) for o in flagged}
        kept_gt = {o.gt_id for o in outs if o.gt_id and id(o) not in flagged_ids}
        table[rule] = {
            "flagged": len(flagged),
            "load": len(flagged) / len(outs) if outs else None,
            "errors": len(errors),
            "errors_caught": caught,
            "error_recall": caught / len(errors) if errors else None,
            "flag_precision": caught / len(flagged) if flagged else None,
            "recall_if_dropped": len(kept_gt & matched) / len(gt_ids) if gt_ids else None,
        }
    return table


def _ap(e: Any, stat: int, any_ground_truth: bool) -> float | None:
    """``e.stats[stat]`` (0: AP, 1: AP50); 0 with no results; None where it has no data (no ground truth instance:
    pycocotools' -1)."""
    if not any_ground_truth:
        return None
    if e is None:
        return 0.0
    value = float(e.stats[stat])
    return None if value < 0 else value


def _precision_by_category(e: Any) -> dict[int, np.ndarray]:
    """Mask precision at COCOeval's 101 recall thresholds, IoU 0.5 (area all, 100 detections), by category id:
    COCOeval's category axis follows ``params.catIds`` (sorted ids), not the dataset's order of categories."""
    precision = e.eval["precision"][0, :, :, 0, -1]  # (recall thresholds, categories)
    return {int(cid): precision[:, k] for k, cid in enumerate(e.params.catIds)}


def _ap50_per_class(e: Any, dataset: EvalDataset) -> dict[str, float | None]:
    """AP at IoU 0.5 per category name (area all, 100 detections), None where a category has no ground truth; 0
    where it has some and there are no results at all (as COCOeval says once any category has a result)."""
    by_id = _precision_by_category(e) if e is not None else {}
    found = {a["category_id"] for a in dataset.coco["annotations"] if not a.get("iscrowd")}
    out: dict[str, float | None] = {}
    for cid, name in dataset.categories.items():
        p = by_id.get(cid)
        if p is None:
            out[name] = 0.0 if e is None and cid in found else None
        else:
            out[name] = float(p.mean()) if (p > -1).any() else None
    return out


def _pr_curves(dataset: EvalDataset, e: Any) -> dict[str, list[float]]:
    """Mask precision at COCOeval's 101 recall thresholds, IoU 0.5, per category name (-1: no data)."""
    if e is None:
        return {}
    by_id = _precision_by_category(e)
    out = {"recall": [float(r) for r in e.params.recThrs]}
    for cid, name in dataset.categories.items():
        out[name] = [float(v) for v in by_id[cid]]
    return out
