"""evaluate_open's operating-threshold calibration (issue 20 finding 13): which threshold it picks from detections,
what recall and absent-phrase false positives it counts. Scenes and detections are built by hand, so each count is
known."""

from __future__ import annotations

import numpy as np

from service.shapes.attributes import AttributeInstance, AttributeScene
from service.training.evaluate_open import (
    FP_BOUND,
    Phrase,
    PhraseDetections,
    above,
    least_within,
    recall,
    threshold_rows,
)

RED_STAR = Phrase("red star", None, "red", "star")
BLUE_CIRCLE = Phrase("blue circle", None, "blue", "circle")


def _scene(seed: int, *boxes: tuple[str, str, tuple[float, float, float, float]]) -> AttributeScene:
    instances = tuple(
        AttributeInstance(shape, colour, "large", np.zeros((64, 64), bool), box, 0.06) for colour, shape, box in boxes
    )
    return AttributeScene(seed, np.zeros((64, 64, 3), np.uint8), instances)


def _dets(found: dict[tuple[int, str], list[tuple[tuple[float, float, float, float], float]]]) -> PhraseDetections:
    boxes = {key: np.array([b for b, _ in v], np.float32).reshape(-1, 4) for key, v in found.items()}
    scores = {key: np.array([s for _, s in v], np.float32) for key, v in found.items()}
    return PhraseDetections(boxes, scores)


# Scene 1 holds a red star; scenes 2-21 hold a blue circle each (20 scenes where "red star" is absent).
STAR_BOX, CIRCLE_BOX = (10.0, 10.0, 30.0, 30.0), (40.0, 40.0, 60.0, 60.0)
SCENES = [_scene(1, ("red", "star", STAR_BOX))] + [_scene(s, ("blue", "circle", CIRCLE_BOX)) for s in range(2, 22)]


def _answers(false_star_scores: list[float]) -> PhraseDetections:
    """ "red star" finds its star at 0.9 (and a duplicate box at 0.8) and a false box on the first absent scenes at
    the given scores; "blue circle" finds every circle at 0.6."""
    found: dict[tuple[int, str], list] = {(1, "red star"): [(STAR_BOX, 0.9), ((11.0, 10.0, 30.0, 31.0), 0.8)]}
    found[1, "blue circle"] = []
    for i, scene in enumerate(SCENES[1:]):
        score = false_star_scores[i] if i < len(false_star_scores) else None
        found[scene.seed, "red star"] = [(CIRCLE_BOX, score)] if score is not None else []
        found[scene.seed, "blue circle"] = [(CIRCLE_BOX, 0.6)]
    return _dets(found)


def test_recall_counts_each_instance_once_and_needs_half_overlap():
    dets = _answers([])
    assert recall(SCENES, [RED_STAR], dets) == 1.0  # the duplicate box does not count a second star
    assert recall(SCENES, [BLUE_CIRCLE], dets) == 1.0
    assert recall(SCENES, [BLUE_CIRCLE], above(dets, 0.7)) == 0.0  # the circles' boxes score 0.6
    shifted = _dets({(s.seed, "red star"): [((20.0, 20.0, 40.0, 40.0), 0.9)] for s in SCENES})  # IoU 1/7
    assert recall(SCENES, [RED_STAR], shifted) == 0.0
    assert recall(SCENES[1:], [RED_STAR], dets) is None  # nothing described: no recall, not 0


def test_the_least_threshold_keeping_every_absent_phrase_within_the_bound_is_chosen():
    # 20 absent requests: two false boxes (0.1 per request) break the bound of 0.05, one (0.05) keeps it
    dets = _answers([0.28, 0.33])
    rows = threshold_rows(SCENES, {"trained": [RED_STAR, BLUE_CIRCLE]}, dets)
    assert rows["0.25"]["trained"]["over_bound"] == ["red star"]
    assert rows["0.25"]["trained"]["worst_absent"] == {"phrase": "red star", "fp_per_request": 2 / 20}
    assert rows["0.3"]["trained"]["worst_absent"]["fp_per_request"] == 1 / 20 <= FP_BOUND
    assert rows["0.35"]["trained"]["worst_absent"]["fp_per_request"] == 0.0
    assert least_within(rows) == 0.3
    assert rows["0.5"]["trained"]["recall"] == 1.0 and rows["0.25"]["trained"]["recall"] == 1.0
    assert least_within(threshold_rows(SCENES, {"trained": [RED_STAR]}, _answers([0.9, 0.9]))) is None
