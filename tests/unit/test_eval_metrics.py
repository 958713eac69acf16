"""`detseg eval`'s figures on hand-made ground truth and predictions, against pycocotools run on the same inputs:
per-class AP by category id whatever the dataset's order, detections COCO ignores (on crowd regions) left out,
"no data" as None, NoC's never-reached share (RITM's NoF) and its clicks (RITM's)."""

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
from service.evaluation.noc import MAX_CLICKS, Click, InstanceEffort, next_click, summarize
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


def test_a_match_to_annotation_id_0_is_a_match() -> None:
    """Label Studio's and Roboflow's COCO exports number annotations from 0, and COCOeval records a match as the
    ground truth's id, 0 meaning none: three perfect masks scored AP50 0.442, recall 0.667, one false positive."""
    rles = [_rle(0, 0, 10, 10), _rle(15, 15, 25, 25), _rle(30, 0, 40, 10)]
    found = ImagePrediction(1, tuple(_found(r, 0.9 - k / 10, 1) for k, r in enumerate(rles)))
    for first in (0, 1):
        dataset = _dataset([_annotation(first + k, 1, r) for k, r in enumerate(rles)], [{"id": 1, "name": "a"}])
        figures = metrics.evaluate(dataset, [found], 0.5)
        assert figures["mask_ap50"] == pytest.approx(1.0), first
        assert (figures["overall"]["recall"], figures["overall"]["false_positives_per_image"]) == (1.0, 0.0), first
    assert sorted(a["id"] for a in dataset.coco["annotations"]) == [1, 2, 3]  # ids from 1 are kept as they are


def test_predictions_past_cocos_100_per_image_are_matched_at_the_operating_threshold() -> None:
    """COCOeval leaves an image's results past maxDets (100) out of its matching; `--prompt boxes` asks up to 256
    regions, and the 20 perfect masks past 100 counted as false positives and their ground truth as missed. AP keeps
    COCO's 100."""
    squares = [_rle(x, y, x + 3, y + 3) for x in range(0, 40, 3)[:13] for y in range(0, 40, 4)[:10]][:120]
    dataset = _dataset([_annotation(k + 1, 1, r) for k, r in enumerate(squares)], [{"id": 1, "name": "a"}])
    found = ImagePrediction(1, tuple(_found(r, 1.0 - k / 1000, 1) for k, r in enumerate(squares)))
    figures = metrics.evaluate(dataset, [found], 0.5)
    assert len(squares) == 120
    assert figures["overall"]["recall"] == 1.0 and figures["overall"]["false_positives_per_image"] == 0.0
    results = metrics.coco_results(dataset, [found])
    assert figures["mask_ap50"] == pytest.approx(_pycocotools_ap50(dataset, results, 1))  # COCO's 100, as COCOeval


def test_per_class_ap50_is_0_not_no_data_when_nothing_was_predicted() -> None:
    """With no prediction at all every class was None ("no ground truth"), where COCOeval says 0 as soon as any
    other class has a prediction: the before/after comparison showed no change for a class that went to 0."""
    dataset = _dataset([_annotation(1, 1, _rle(0, 0, 10, 10))], [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    assert metrics.evaluate(dataset, [ImagePrediction(1, ())], 0.5)["ap50_per_class"] == {"a": 0.0, "b": None}


def _ritm_distances(gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RITM's ``Clicker._get_next_click`` (isegm/inference/clicker.py, padding on, no ignore mask) as written there, up
    to its choice: the miss's and the spill's distance maps, clicked pixels zeroed. It clicks the first pixel at the
    larger maximum (the miss's if strictly larger)."""
    import cv2

    fn = np.pad(np.logical_and(gt, np.logical_not(pred)), ((1, 1), (1, 1)), "constant")
    fp = np.pad(np.logical_and(np.logical_not(gt), pred), ((1, 1), (1, 1)), "constant")
    fn_dt = cv2.distanceTransform(fn.astype(np.uint8), cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    fp_dt = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    return fn_dt, fp_dt


def test_the_simulated_annotator_clicks_where_ritms_does() -> None:
    """NoC is RITM's figure: its next click is over the whole miss and spill (not the largest connected region's
    centre, which picked a thin strip's middle over a deeper blob's), never on a pixel clicked before (the same point
    was sent again and again when SAM ignored it). RITM's OpenCV distances carry float rounding that differs from run
    to run, so a click is RITM's where it is on a pixel at RITM's largest distance (within 1e-4) of the same sign."""
    import cv2

    rng = np.random.default_rng(0)
    for case in range(200):
        h, w = rng.integers(8, 48, 2)
        gt, pred = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        for target in (gt, pred):
            for _ in range(rng.integers(1, 4)):
                cv2.ellipse(target, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                            (int(rng.integers(1, w)), int(rng.integers(1, h))), float(rng.uniform(0, 180)), 0, 360,
                            1, -1)  # fmt: skip
        gt = gt.astype(bool)
        pred = pred.astype(bool) if case % 5 else np.zeros((h, w), bool)  # a first click every fifth case
        clicks: list[Click] = []
        not_clicked = np.ones((h, w), np.float32)
        for _ in range(3):  # the same mask three times: the model ignoring the clicks
            fn_dt, fp_dt = _ritm_distances(gt, pred, not_clicked)
            if max(fn_dt.max(), fp_dt.max()) == 0:
                break
            click = next_click(gt, pred, clicks)
            x, y = int(click.x), int(click.y)
            assert (click.x - x, click.y - y) == (0.5, 0.5)
            if abs(fn_dt.max() - fp_dt.max()) > 1e-4:
                assert click.positive == bool(fn_dt.max() > fp_dt.max()), case
            chosen = fn_dt if click.positive else fp_dt
            assert chosen[y, x] >= chosen.max() - 1e-4 and not_clicked[y, x] == 1, case
            clicks.append(click)
            not_clicked[y, x] = 0


def test_the_distance_map_on_the_regions_box_is_the_whole_frames() -> None:
    """The annotator's distance maps are computed on each region's bounding box (a small object in a 12 MP photo
    cost a whole-frame transform per click); every distance, and so every click, is the whole frame's."""
    import cv2
    from scipy import ndimage

    from service.evaluation import noc

    rng = np.random.default_rng(1)
    for case in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        region = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(0, 3)):
            cv2.ellipse(region, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                        (int(rng.integers(0, w)), int(rng.integers(0, h))), float(rng.uniform(0, 180)), 0, 360,
                        1, -1)  # fmt: skip
        region = region.astype(bool)
        whole = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        assert np.array_equal(noc._distance(region), whole), case
        if region.any():
            assert noc.interior_point(region) == tuple(np.unravel_index(np.argmax(whole), whole.shape)[::-1]), case


def test_the_report_shows_class_names_as_written(tmp_path: Path) -> None:
    """A class named with two "$" (a price band) was read as TeX by matplotlib and the whole report failed (nothing
    written, a traceback); in report.md a name's "<b>" was markup and its line break a broken table row."""
    from service.evaluation.report import PLOTS, write_report

    a, b = _rle(0, 0, 10, 10), _rle(20, 20, 30, 30)
    names = {1: "price $5_$10", 2: "<b>bold</b>\nline"}
    dataset = _dataset([_annotation(1, 1, a), _annotation(2, 2, b)], [{"id": k, "name": v} for k, v in names.items()])
    figures = metrics.evaluate(dataset, [ImagePrediction(1, (_found(a, 0.9, 1), _found(b, 0.8, 2)))], 0.5)
    write_report(figures, tmp_path, "report")
    assert all((tmp_path / f"{name}.png").is_file() for name in PLOTS)
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert any(r.startswith("| price $5_$10 | ") for r in rows)
    assert any(r.startswith("| &lt;b&gt;bold&lt;/b&gt; line | ") for r in rows)
