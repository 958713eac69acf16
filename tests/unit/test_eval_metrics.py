"""`detseg eval`'s figures on hand-made ground truth and predictions, against pycocotools run on the same inputs:
per-class AP by category id whatever the dataset's order, detections COCO ignores (on crowd regions) left out,
"no data" as None, and NoC's never-reached share (RITM's NoF)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service.evaluation import metrics
from service.evaluation.dataset import EvalDataset, EvalImage, _checked
from service.evaluation.noc import MAX_CLICKS, InstanceEffort, summarize
from service.evaluation.predict import ImagePrediction, Predicted
from service.results import Instance

SIDE = 40


def _rle(x0: int, y0: int, x1: int, y1: int) -> dict:
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _dataset(annotations: list[dict], categories: list[dict]) -> EvalDataset:
    coco = {
        "images": [{"id": 1, "file_name": "1.png", "width": SIDE, "height": SIDE}],
        "annotations": annotations,
        "categories": categories,
    }
    coco = _checked(coco, Path("ground-truth.json"))
    image = EvalImage(1, "1.png", Path("1.png"), SIDE, SIDE, {})
    return EvalDataset(coco, (image,), {c["id"]: c["name"] for c in categories})


def _annotation(id: int, category: int, rle: dict, crowd: int = 0) -> dict:
    return {"id": id, "image_id": 1, "category_id": category, "segmentation": rle, "iscrowd": crowd}


def _found(rle: dict, score: float, category: int) -> Predicted:
    x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
    return Predicted(Instance("x", 0, score, (x, y, x + w, y + h), 0.9, "detector", 0, "", 0.0, rle), category)


def _pycocotools_ap50(dataset: EvalDataset, results: list[dict], category: int) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(dataset.coco))
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in results]), "segm")
        e.params.catIds = [category]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[1])


def test_per_class_ap50_follows_the_category_ids_whatever_their_order_in_the_file() -> None:
    """COCOeval's category axis is sorted by id; it was read in the file's order of categories: with "a" (id 2) listed
    before "b" (id 1), a perfectly found "a" scored 0 and a missed "b" 1 (and their PR curves swapped)."""
    a, b = _rle(0, 0, 10, 10), _rle(20, 20, 30, 30)
    dataset = _dataset([_annotation(1, 2, a), _annotation(2, 1, b)], [{"id": 2, "name": "a"}, {"id": 1, "name": "b"}])
    predictions = [ImagePrediction(1, (_found(a, 0.9, 2),))]
    figures = metrics.evaluate(dataset, predictions, 0.5)
    results = metrics.coco_results(dataset, predictions)
    assert figures["ap50_per_class"] == {
        "a": pytest.approx(_pycocotools_ap50(dataset, results, 2)),
        "b": pytest.approx(_pycocotools_ap50(dataset, results, 1)),
    }
    assert figures["ap50_per_class"]["a"] == pytest.approx(1.0)
    assert max(figures["pr_curves"]["a"]) == pytest.approx(1.0) and max(figures["pr_curves"]["b"]) <= 0
    assert list(figures["ap50_per_class"]) == ["a", "b"]  # the dataset's order


def test_a_detection_on_a_crowd_region_is_neither_a_match_nor_a_false_positive() -> None:
    """COCO ignores it (dtIgnore); it counted as a matched instance: its IoU with the crowd region in the mean mask
    IoU and the histogram, and the crowd id among the matched ground truth."""
    missed, crowd, inside = _rle(0, 0, 10, 10), _rle(15, 0, 40, 40), _rle(20, 10, 30, 20)
    dataset = _dataset([_annotation(1, 1, missed), _annotation(2, 1, crowd, crowd=1)], [{"id": 1, "name": "a"}])
    figures = metrics.evaluate(dataset, [ImagePrediction(1, (_found(inside, 0.9, 1),))], 0.5)
    overall = figures["overall"]
    assert (overall["ground_truth"], overall["recall"], overall["mean_mask_iou"]) == (1, 0.0, None)
    assert overall["predictions"] == 0 and overall["false_positives_per_image"] == 0.0
    assert figures["matched_mask_ious"] == [] and figures["ground_truth"] == 1  # the crowd region is no instance
    assert figures["review"]["any"]["recall_if_dropped"] == 0.0


def test_ap_without_any_ground_truth_instance_is_no_figure() -> None:
    """pycocotools says -1 ("no data"); it was printed as the AP, -1.000."""
    dataset = _dataset([], [{"id": 1, "name": "a"}])
    figures = metrics.evaluate(dataset, [ImagePrediction(1, (_found(_rle(0, 0, 5, 5), 0.9, 1),))], 0.5)
    assert (figures["mask_ap"], figures["mask_ap50"], figures["box_ap"], figures["box_ap50"]) == (None,) * 4


def test_the_never_reached_share_counts_instances_that_never_reached_the_threshold() -> None:
    """Clicking goes on to the highest threshold, so an instance may pass 0.85 and fall below it again: it reached
    0.85 (its NoC@85 is 2), and "failed@85" counted it as never reaching it (its last IoU)."""
    dipped = InstanceEffort(1, (), (0.5, 0.86, 0.87, *([0.84] * (MAX_CLICKS - 3))))
    never = InstanceEffort(2, (), tuple([0.6] * MAX_CLICKS))
    figures = summarize([dipped, never])
    assert figures["noc@85"] == (2 + MAX_CLICKS) / 2
    assert figures["failed@85"] == 0.5 and figures["failed@90"] == 1.0


def test_caller_boxes_are_ranked_by_mask_score_not_by_the_order_of_the_ground_truth() -> None:
    """`--prompt boxes`: every instance is a caller's region, score 1; COCOeval then ranked them in the order they
    came (the ground truth's in the file), and the same masks scored AP50 0.505 or 0.2525 by that order alone."""
    good_gt, bad_gt = _rle(0, 0, 10, 10), _rle(20, 20, 30, 30)
    good, bad = _rle(0, 0, 10, 9), _rle(20, 20, 24, 24)  # IoU 0.9 and 0.16 with their ground truth

    def region(rle: dict, mask_score: float) -> Predicted:
        x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
        box = (x, y, x + w, y + h)
        return Predicted(Instance("a", -1, 1.0, box, mask_score, "region_prompt", 0, "", 0.0, rle), 1)

    found = (region(good, 0.95), region(bad, 0.3))
    ap50 = set()
    for order in ((0, 1), (1, 0)):
        truth = [_annotation(k + 1, 1, (good_gt, bad_gt)[i]) for k, i in enumerate(order)]
        predicted = ImagePrediction(1, tuple(found[i] for i in order))
        ap50.add(round(metrics.evaluate(_dataset(truth, [{"id": 1, "name": "a"}]), [predicted], 0.5)["mask_ap50"], 4))
    assert ap50 == {0.505}  # the confident good mask first, whatever the order
