"""The detector's NMS is per prompt (issue 20): each class's detections equal those of a head output holding that
class alone, whatever other classes are asked and however many answers they have.

Pure post-processing on head outputs of the documented layout ((1, 4 + C, A): XYWH letterboxed pixels, then
per-class scores), drawn at random with many overlapping boxes and shared anchors.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.models.tensors import DetectorOutput, DetectorSpec
from service.processing.detection import Detections, DetectorProcessing
from service.processing.masks import RLE

IMGSZ, ANCHORS, HW = 640, 600, (480, 640)


def _processing(classes: int, open_vocabulary: bool) -> DetectorProcessing:
    names = tuple(f"c{k}" for k in range(classes))
    return DetectorProcessing(DetectorSpec(names, IMGSZ, 32, 512 if open_vocabulary else 0))


def _head(classes: int, seed: int) -> np.ndarray:
    """(1, 4 + classes, ANCHORS) float32: boxes clustered on a few objects (so NMS has work), random scores that
    rank anchors alike for every class (as prompts meaning one object do)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(100, 540, (8, 2))[rng.integers(0, 8, ANCHORS)] + rng.normal(0, 6, (ANCHORS, 2))
    sizes = rng.uniform(40, 160, (8, 2))[rng.integers(0, 8, ANCHORS)] * rng.uniform(0.85, 1.15, (ANCHORS, 2))
    scores = rng.uniform(0, 1, (ANCHORS, 1)) ** 3 * rng.uniform(0.7, 1.0, (ANCHORS, classes))  # anchors good for all
    return np.concatenate([centres, sizes, scores], axis=1).T[None].astype(np.float32)


def _post(p: DetectorProcessing, raw: np.ndarray, class_ids=None, max_instances=100, max_total=None) -> Detections:
    return p.postprocess(
        DetectorOutput(raw=raw), 0, HW, class_ids=class_ids, score_threshold=0.2, iou_threshold=0.5,
        max_instances=max_instances, max_total=max_total,
    )  # fmt: skip


def _rows(d: Detections, class_id: int) -> list[tuple]:
    keep = d.class_ids == class_id
    return sorted(zip(map(tuple, d.boxes[keep].tolist()), d.scores[keep].tolist(), strict=True))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_instances", [3, 100])
def test_open_vocabulary_class_answers_as_that_class_alone(seed, max_instances):
    classes = 6
    raw = _head(classes, seed)
    together = _post(_processing(classes, True), raw, max_instances=max_instances)
    alone = _processing(1, True)
    counts = []
    for k in range(classes):
        solo = _post(alone, np.ascontiguousarray(raw[:, [0, 1, 2, 3, 4 + k]]), max_instances=max_instances)
        assert _rows(together, k) == _rows(solo, 0)
        counts.append(len(solo))
    assert max(counts) == max_instances if max_instances == 3 else max(counts) < max_instances
    assert len({b.tobytes() for b in together.boxes}) < len(together)  # some boxes answer several classes
    assert list(together.scores) == sorted(together.scores, reverse=True)


def test_one_box_answers_every_open_vocabulary_class_that_scores_it():
    raw = np.zeros((1, 4 + 2, 3), np.float32)
    raw[0, :4] = np.array([[320, 320, 100, 100]] * 3, np.float32).T  # three anchors, one object
    raw[0, 4:, 0] = (0.9, 0.8)  # anchor 0 is the best for both classes
    raw[0, 4:, 1] = (0.5, 0.3)
    d = _post(_processing(2, True), raw)
    assert sorted(d.class_ids.tolist()) == [0, 1] and d.boxes[0].tobytes() == d.boxes[1].tobytes()
    assert d.scores.tolist() == pytest.approx([0.9, 0.8])


@pytest.mark.parametrize("seed", range(5))
def test_closed_class_answers_as_that_class_alone_with_its_own_cap(seed):
    classes = 5
    raw = _head(classes, seed)
    p = _processing(classes, False)
    together = _post(p, raw, class_ids=[0, 2, 3], max_instances=2)
    for k in (0, 2, 3):
        assert _rows(together, k) == _rows(_post(p, raw, class_ids=[k], max_instances=2), k)
        assert len(_rows(together, k)) == 2


def test_closed_without_classes_is_ultralytics_nms():
    import torch
    from ultralytics.utils.nms import non_max_suppression

    raw = _head(4, 0)
    d = _post(_processing(4, False), raw, max_instances=7)
    (det,) = non_max_suppression(torch.from_numpy(raw), conf_thres=0.2, iou_thres=0.5, max_det=7)
    assert d.class_ids.tolist() == det[:, 5].int().tolist() and d.scores.tolist() == det[:, 4].tolist()


def test_max_total_keeps_the_highest_scores():
    raw = _head(6, 1)
    p = _processing(6, True)
    every = _post(p, raw)
    capped = _post(p, raw, max_total=5)
    assert len(every) > 5 and capped.scores.tolist() == every.scores[:5].tolist()
    assert capped.class_ids.tolist() == every.class_ids[:5].tolist()


def _concepts(texts: int, queries: int, seed: int) -> dict[str, np.ndarray]:
    """SAM 3's raw answer for ``texts`` texts (``service.models.sam3.Grounding``'s fields): boxes (T, Q, 4) cxcywh in
    fractions of the input, clustered so that NMS has work; logits (T, Q); presence (T,); mask logits (T, Q, 8, 8)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.15, 0.85, (6, 2))[rng.integers(0, 6, (texts, queries))]
    centres = centres + rng.normal(0, 0.01, centres.shape)
    sizes = rng.uniform(0.05, 0.2, (texts, queries, 2))
    return {
        "boxes": np.concatenate([centres, sizes], axis=-1).astype(np.float32),
        "logits": rng.normal(0, 2, (texts, queries)).astype(np.float32),
        "presence": rng.normal(2, 1, texts).astype(np.float32),
        "mask_logits": rng.normal(0, 1, (texts, queries, 8, 8)).astype(np.float32),
    }


def _concept_rows(raw: dict[str, np.ndarray], max_instances: int, max_total: int | None = None) -> list[tuple]:
    from service.processing.concepts import ConceptProcessing

    d = ConceptProcessing(image_size=1008).postprocess(
        **raw, hw=HW, score_threshold=0.1, iou_threshold=0.5, max_instances=max_instances, mask_encoding=RLE,
        max_total=max_total,
    )  # fmt: skip
    return list(zip(d.text_ids.tolist(), map(tuple, d.boxes.tolist()), d.scores.tolist(), strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_sam3_texts_are_each_answered_as_if_asked_alone_up_to_max_instances_each(seed):
    """(The cap was shared: with max_instances 3 and several texts, the first text's answers took others' places,
    where the proto promises each prompt its own max_instances.)"""
    raw = _concepts(texts=3, queries=40, seed=seed)
    together = _concept_rows(raw, max_instances=3)
    for t in range(3):
        alone = _concept_rows({k: v[t : t + 1] for k, v in raw.items()}, max_instances=3)
        assert [row[1:] for row in together if row[0] == t] == [row[1:] for row in alone] and len(alone) == 3
    scores = [row[2] for row in together]
    assert scores == sorted(scores, reverse=True)
    assert _concept_rows(raw, max_instances=3, max_total=4) == together[:4]  # the request's bound, by score


@pytest.mark.parametrize("seed", range(3))
def test_sam3_answers_carry_their_masks_area_and_parts_for_review(seed):
    """Concept answers skipped the mask review rules (an empty SAM 3 mask passed min_mask_area with drop_flagged):
    each answer now carries its mask's area and 8-connected parts, equal to pycocotools' area and OpenCV's count on
    the decoded mask."""
    import cv2
    from pycocotools import mask as mask_utils

    from service.processing.concepts import ConceptProcessing

    raw = _concepts(texts=2, queries=30, seed=seed)
    raw["mask_logits"][0, :5] = -5.0  # some empty masks
    d = ConceptProcessing(image_size=1008).postprocess(
        **raw, hw=HW, score_threshold=0.05, iou_threshold=0.5, max_instances=20, mask_encoding=RLE
    )
    assert len(d.masks) > 3 and len(d.areas) == len(d.parts) == len(d.masks)
    for mask, area, parts in zip(d.masks, d.areas, d.parts, strict=True):
        rle = {"size": [mask.height, mask.width], "counts": mask.rle_counts}
        assert area == int(mask_utils.area(rle))
        decoded = np.ascontiguousarray(mask_utils.decode(rle))
        assert parts == (cv2.connectedComponents(decoded, connectivity=8)[0] - 1 if area else 0)
