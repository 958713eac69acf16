"""Review routing through the real server (demo models): every instance says whether a person should check
it and why; requests tighten or loosen the rules and can drop flagged instances; bad rules are refused."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.shapes.world import render_scene
from tests.helpers import encode, rle_mask


def _ask(stub, image: bytes, **review) -> pb.SegmentResponse:
    options = pb.SegmentOptions(score_threshold=0.05, review=pb.ReviewRules(**review))
    return stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image), options=options), timeout=120)


@pytest.fixture(scope="module")
def scene_bytes():
    return encode(render_scene(9_000_102).image)  # 11 instances at score >= 0.05, three rules fire


def test_every_instance_carries_a_review_with_sams_stability(demo_stub, scene_bytes):
    response = _ask(demo_stub, scene_bytes)
    assert response.instances
    for inst in response.instances:
        assert 0.0 <= inst.review.stability_score <= 1.0
        assert inst.review.needed == bool(inst.review.reasons)
        fired = set(inst.review.reasons)
        assert (pb.REVIEW_REASON_LOW_SCORE in fired) == (inst.score < 0.5)  # the server default
        assert (pb.REVIEW_REASON_LOW_MASK_SCORE in fired) == (inst.mask_score < 0.8)
        assert (pb.REVIEW_REASON_UNSTABLE_MASK in fired) == (inst.review.stability_score < 0.9)
        assert (pb.REVIEW_REASON_TINY_MASK in fired) == (rle_mask(inst.mask).sum() < 64)
    # at score >= 0.05 the demo detector returns some low-score boxes: the rule really fires
    assert any(pb.REVIEW_REASON_LOW_SCORE in i.review.reasons for i in response.instances)


def test_requests_set_the_rules_and_drop_flagged_keeps_exactly_the_unflagged(demo_stub, scene_bytes):
    everything = _ask(demo_stub, scene_bytes, score_below=1.0)
    assert all(pb.REVIEW_REASON_LOW_SCORE in i.review.reasons for i in everything.instances)
    off = dict(score_below=0, mask_score_below=0, stability_below=0, min_mask_area=0, max_mask_components=0,
               text_similarity_below=0)  # fmt: skip
    assert not any(i.review.needed for i in _ask(demo_stub, scene_bytes, **off).instances)
    flagged = _ask(demo_stub, scene_bytes)
    kept = _ask(demo_stub, scene_bytes, drop_flagged=True)
    expected = [(i.label, round(i.score, 5)) for i in flagged.instances if not i.review.needed]
    assert [(i.label, round(i.score, 5)) for i in kept.instances] == expected
    assert 0 < len(kept.instances) < len(flagged.instances)


def test_a_region_prompt_is_never_flagged_for_a_low_detector_score(demo_stub, scene_bytes):
    request = pb.SegmentRequest(
        image=pb.Image(encoded=scene_bytes),
        regions=[pb.RegionPrompt(box=pb.BoundingBox(x_min=5, y_min=5, x_max=60, y_max=60))],
        options=pb.SegmentOptions(review=pb.ReviewRules(score_below=1.0)),
    )
    (inst,) = demo_stub.Segment(request, timeout=60).instances
    assert pb.REVIEW_REASON_LOW_SCORE not in inst.review.reasons


def test_bad_rules_are_invalid_argument_naming_the_field(demo_stub, scene_bytes):
    with pytest.raises(grpc.RpcError) as err:
        _ask(demo_stub, scene_bytes, mask_score_below=2.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.review.mask_score_below: 2.0 is outside [0, 1]" in err.value.details()


def test_list_models_reports_the_default_rules(demo_stub, settings):
    rules = demo_stub.ListModels(pb.ListModelsRequest(), timeout=30).defaults.review
    assert np.isclose(rules.score_below, settings.review_score_below)
    assert rules.min_mask_area == settings.review_min_mask_area and not rules.drop_flagged
