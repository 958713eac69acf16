"""Review rules (service.pipeline.review): each rule fires on its own condition, stability equals sam2's."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.pipeline.review import (
    MaskStats,
    Reason,
    ReviewOptions,
    ReviewRules,
    mask_stats,
    resolve_review,
    review,
)
from service.pipeline.vocabulary import EMBEDDING, TextMatch
from service.processing.upsampling import stability_scores

RULES = ReviewRules(
    score_below=0.5, mask_score_below=0.8, stability_below=0.9, min_mask_area=64, max_mask_components=3,
    text_similarity_below=0.6,
)  # fmt: skip
GOOD = MaskStats(stability=0.97, area=5000, components=1)


def test_stability_equals_sam2s_calculate_stability_score():
    import torch
    from sam2.utils.amg import calculate_stability_score

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 64, 80)) * 4 + rng.normal(size=(6, 1, 1)) * 3).astype(np.float32)
    ours = stability_scores(logits, 0.0)
    theirs = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    assert np.allclose(ours, theirs, atol=1e-6) and 0 < ours.min() < ours.max() < 1


def test_an_empty_mask_is_stable_by_definition_not_nan():
    assert stability_scores(np.full((1, 8, 8), -5, np.float32), 0.0)[0] == 1.0


def test_mask_stats_count_area_and_8_connected_parts():
    mask = np.zeros((40, 40), bool)
    mask[2:6, 2:6] = True  # 16 px
    mask[6:9, 6:9] = True  # touches the first diagonally: one part under 8-connectivity, 9 px
    mask[20:30, 20:30] = True  # 100 px
    stats = mask_stats(mask, 0.5)
    assert (stats.area, stats.components, stats.stability) == (125, 2, 0.5)
    assert mask_stats(np.zeros((5, 5), bool), 1.0).components == 0


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"score": 0.3}, Reason.LOW_SCORE),
        ({"mask_score": 0.5}, Reason.LOW_MASK_SCORE),
        ({"stats": MaskStats(0.7, 5000, 1)}, Reason.UNSTABLE_MASK),
        ({"stats": MaskStats(0.97, 20, 1)}, Reason.TINY_MASK),
        ({"stats": MaskStats(0.97, 5000, 4)}, Reason.FRAGMENTED_MASK),
        ({"text_match": TextMatch(0, "automobile", 2, "car", 0.55, EMBEDDING)}, Reason.WEAK_TEXT_MATCH),
    ],
)
def test_each_rule_fires_alone_on_its_condition(kwargs, reason):
    base = {"score": 0.9, "mask_score": 0.95, "stats": GOOD, "text_match": None}
    flag = review(RULES, **{**base, **kwargs})
    assert flag.reasons == (reason,) and flag.needed
    assert not review(RULES, **base).needed


def test_a_rule_at_zero_is_off_and_regions_have_no_detector_score():
    off = ReviewRules(0, 0, 0, 0, 0, 0)
    worst = {"score": 0.0, "mask_score": 0.0, "stats": MaskStats(0.0, 0, 9), "text_match": None}
    assert not review(off, **worst).needed
    assert Reason.LOW_SCORE not in review(RULES, **{**worst, "score": None}).reasons
    assert review(RULES, score=0.2, mask_score=None, stats=None, text_match=None).reasons == (Reason.LOW_SCORE,)


def test_request_options_override_the_server_rules_and_are_range_checked():
    rules = resolve_review(ReviewOptions(score_below=0.9, max_mask_components=0), RULES)
    assert rules.score_below == 0.9 and rules.max_mask_components == 0 and rules.mask_score_below == 0.8
    with pytest.raises(InvalidInput, match=r"options\.review\.stability_below: 1\.5 is outside \[0, 1\]"):
        resolve_review(ReviewOptions(stability_below=1.5), RULES)
    with pytest.raises(InvalidInput, match=r"options\.review\.min_mask_area: -1 must be >= 0"):
        resolve_review(ReviewOptions(min_mask_area=-1), RULES)
    with pytest.raises(InvalidInput, match="options.review.score_below"):
        resolve_review(ReviewOptions(score_below=float("nan")), RULES)
