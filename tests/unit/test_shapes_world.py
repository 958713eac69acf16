"""The shapes world: deterministic, valid COCO/YOLO annotations, and metrics that agree with COCOeval."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from service.shapes.dataset import coco_annotations, scenes, yolo_label_lines
from service.shapes.evaluate import Prediction, ap50, coco_eval, end_to_end
from service.shapes.world import CLASSES, MIN_VISIBLE, render_scene


def _digest(seed: int) -> str:
    scene = render_scene(seed)
    h = hashlib.sha256(scene.image.tobytes())
    for inst in scene.instances:
        h.update(inst.mask.tobytes())
        h.update(repr((inst.category_id, inst.box)).encode())
    return h.hexdigest()


def test_same_seed_same_bytes_and_annotations():
    assert _digest(11) == _digest(11)
    assert _digest(11) != _digest(12)


@pytest.mark.slow  # renders a few hundred scenes
def test_scenes_vary_in_size_count_and_class():
    items = list(scenes("val", 40))
    sizes = {(s.width, s.height) for s in items}
    counts = {len(s.instances) for s in items}
    classes = {i.category_id for s in items for i in s.instances}
    assert len(sizes) > 30 and all(256 <= w <= 640 and 256 <= h <= 640 for w, h in sizes)
    assert min(counts) >= 1 and max(counts) <= 8 and len(counts) >= 5
    assert classes == set(range(len(CLASSES)))


def test_annotations_load_in_pycocotools_and_match_the_masks():
    items = list(scenes("test", 10))
    coco = COCO()
    coco.dataset = coco_annotations(items)
    coco.createIndex()
    assert len(coco.getImgIds()) == 10 and len(coco.getCatIds()) == len(CLASSES)
    for scene in items:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=scene.seed))
        assert len(anns) == len(scene.instances)
        for ann, inst in zip(anns, scene.instances, strict=True):
            assert np.array_equal(coco.annToMask(ann).astype(bool), inst.mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == inst.box and ann["area"] == inst.mask.sum() > 0


def test_objects_stay_mostly_visible_and_yolo_labels_are_normalised():
    for scene in scenes("train", 15):
        for line in yolo_label_lines(scene):
            cls, *xywh = line.split()
            assert 0 <= int(cls) < len(CLASSES) and all(0 < float(v) <= 1 for v in xywh)
        for inst in scene.instances:
            assert inst.mask.sum() >= 150 * MIN_VISIBLE


def _gt_predictions(items, jitter: float, seed: int) -> list[Prediction]:
    rng = np.random.default_rng(seed)
    preds = []
    for scene in items:
        for inst in scene.instances:
            x0, y0, x1, y1 = inst.box
            d = rng.normal(0, jitter * (x1 - x0), 4)
            box = (x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3])
            cat = inst.category_id + 1 if rng.random() > 0.1 else (inst.category_id + 1) % len(CLASSES) + 1
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            preds.append(Prediction(scene.seed, cat, float(rng.random()), box, rle))
    return preds


@pytest.mark.parametrize("jitter", [0.0, 0.15, 0.3])
def test_our_ap50_agrees_with_cocoeval(jitter):
    items = list(scenes("val", 25))
    gt = coco_annotations(items)
    preds = _gt_predictions(items, jitter, seed=int(jitter * 100))
    ours, theirs = ap50(preds, gt), coco_eval(preds, gt, "bbox")["map50"]
    assert abs(ours - theirs) < 0.01, (ours, theirs)
    if jitter == 0.0:
        assert ours > 0.8


def test_end_to_end_matching_counts_labels_and_recall():
    scene = render_scene(3)
    gt = [
        {"label": i.category, "rle": mask_utils.encode(np.asfortranarray(i.mask.astype(np.uint8)))}
        for i in scene.instances
    ]
    pred = [{**g, "score": 0.9} for g in gt[:-1]]
    pred[0] = {**pred[0], "label": "wrong"}
    m = end_to_end([(pred, gt)])
    assert m.matched == len(gt) - 1 and m.mean_mask_iou == 1.0
    assert m.recall == (len(gt) - 1) / len(gt) and m.label_accuracy == (len(gt) - 2) / (len(gt) - 1)


def test_matching_follows_scores_when_two_predictions_cover_one_object():
    scene = render_scene(3)
    truth = scene.instances[0]
    gt = [{"label": truth.category, "rle": mask_utils.encode(np.asfortranarray(truth.mask.astype(np.uint8)))}]
    grown = truth.mask.copy()
    grown[:, 1:] |= truth.mask[:, :-1]  # one pixel wider: IoU just below 1
    confident = {
        "label": truth.category,
        "score": 0.9,
        "rle": mask_utils.encode(np.asfortranarray(grown.astype(np.uint8))),
    }
    duplicate = {"label": "wrong", "score": 0.3, "rle": gt[0]["rle"]}  # a perfect mask, but less confident
    m = end_to_end([([duplicate, confident], gt)])
    assert m.matched == 1 and m.label_accuracy == 1.0 and m.mean_mask_iou < 1.0
