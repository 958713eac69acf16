"""Free-text prompts through the real gRPC server: mapped to the detector's classes by the real MiniLM encoder.

The test profile's detector has random weights (its boxes mean nothing), so these tests check the plumbing
against the same server answering class names; the semantics of the mapping are real (MiniLM), and the demo
profile shows them on a trained detector.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.world import render_scene
from tests.conftest import ServerThread, ultralytics_asset, wait_serving
from tests.helpers import encode, mask_iou, rle_mask

BUS = ultralytics_asset("bus.jpg").read_bytes()
LOW = pb.SegmentOptions(score_threshold=0.01, max_instances=50)


def _boxes(instances) -> list[tuple[float, ...]]:
    return sorted((i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max) for i in instances)


def test_texts_are_answered_as_the_classes_they_mean(stub):
    by_text = stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=BUS), texts=["automobile", "pedestrian", "bus"], options=LOW),
        timeout=120,
    )
    by_class = stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=BUS), classes=["car", "person", "bus"], options=LOW), timeout=120
    )
    assert by_text.instances and all(i.source == pb.INSTANCE_SOURCE_TEXT for i in by_text.instances)
    meaning = {0: "car", 1: "person", 2: "bus"}
    for index, cls in meaning.items():
        mine = [i for i in by_text.instances if i.text_match.text_index == index]
        assert all(i.label == cls and i.text_match.matched_class == cls for i in mine)
        assert _boxes(mine) == _boxes([i for i in by_class.instances if i.label == cls])
    exact = [i.text_match for i in by_text.instances if i.text_match.text == "bus"]
    assert exact and all(m.kind == pb.TEXT_MATCH_KIND_EXACT and m.similarity == 1.0 for m in exact)
    mapped = [i.text_match for i in by_text.instances if i.text_match.text == "automobile"]
    assert mapped and all(m.kind == pb.TEXT_MATCH_KIND_EMBEDDING and 0.5 <= m.similarity < 1 for m in mapped)
    assert "match_texts" in {t.stage for t in by_text.provenance.timings}


def test_a_detection_wanted_by_several_prompts_is_returned_once_per_prompt(stub):
    request = pb.SegmentRequest(
        image=pb.Image(encoded=BUS),
        classes=["car"],
        texts=["automobile", "car"],
        regions=[pb.RegionPrompt(box=pb.BoundingBox(x_min=10, y_min=10, x_max=200, y_max=300), label="mine")],
        options=LOW,
    )
    response = stub.Segment(request, timeout=120)
    cars = [i for i in response.instances if i.source == pb.INSTANCE_SOURCE_DETECTOR]
    assert cars and all(i.label == "car" for i in cars)
    for text_index in (0, 1):
        same = [
            i
            for i in response.instances
            if i.source == pb.INSTANCE_SOURCE_TEXT and i.text_match.text_index == text_index
        ]
        assert _boxes(same) == _boxes(cars)
        for a, b in zip(sorted(same, key=lambda i: -i.score), sorted(cars, key=lambda i: -i.score), strict=True):
            assert mask_iou(rle_mask(a.mask), rle_mask(b.mask)) == 1.0  # one SAM answer, shared
    assert response.instances[-1].source == pb.INSTANCE_SOURCE_REGION_PROMPT and response.instances[-1].label == "mine"


def test_unrelated_text_is_invalid_argument_before_the_detector_or_sam_run(stub, runner):
    before = {k: runner.calls[k] for k in ("detect", "encode", "decode")}
    with pytest.raises(grpc.RpcError) as err:
        stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=BUS), texts=["quantum chromodynamics"]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[0]: 'quantum chromodynamics' matches none of the detector's classes (nearest: " in err.value.details()
    assert {k: runner.calls[k] for k in ("detect", "encode", "decode")} == before


def test_a_repeated_text_is_embedded_once(stub, runner):
    request = pb.SegmentRequest(image=pb.Image(encoded=BUS), texts=["motorbike rider"], options=LOW)
    first = runner.calls["embed_text"]
    for _ in range(3):
        try:
            stub.Segment(request, timeout=60)
        except grpc.RpcError as e:  # whichever the answer, the text is embedded once
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert runner.calls["embed_text"] - first == 1


def test_list_models_names_the_text_encoder_and_the_prompt_kinds(stub):
    from service.models.text import SHA256

    response = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    (text,) = [m for m in response.models if m.role == pb.MODEL_ROLE_TEXT_ENCODER]
    assert text.name == "all-MiniLM-L6-v2" and text.weights_sha256 == SHA256
    assert set(response.prompt_kinds) == {pb.PROMPT_KIND_CLASSES, pb.PROMPT_KIND_REGIONS, pb.PROMPT_KIND_TEXTS}
    assert response.defaults.text_match_threshold == pytest.approx(0.5) and response.defaults.max_text_prompts == 64


def test_demo_detector_answers_a_description_with_the_shape_it_means(demo_stub):
    scene = next(s for s in (render_scene(seed) for seed in range(2_000_000, 2_000_050)) if _has(s, "circle"))
    response = demo_stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), texts=["round shape"]), timeout=120
    )
    assert response.instances and {i.label for i in response.instances} == {"circle"}
    truth = [i.mask for i in scene.instances if i.category == "circle"]
    for inst in response.instances:
        assert inst.text_match.matched_class == "circle" and inst.text_match.kind == pb.TEXT_MATCH_KIND_EMBEDDING
        assert max(mask_iou(rle_mask(inst.mask), t) for t in truth) >= 0.7
    assert len(response.instances) == len(truth)


def _has(scene, category: str) -> bool:
    return any(i.category == category for i in scene.instances)


@pytest.mark.slow  # loads the test models a second time, without a text encoder
def test_without_a_text_encoder_texts_are_failed_precondition(settings):
    from service.runners.factory import load_runner

    plain = settings.replace(text_encoder="none")
    srv = ServerThread(plain, lambda: load_runner(plain))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
            stub = pb_grpc.SegmentationServiceStub(channel)
            assert pb.PROMPT_KIND_TEXTS not in stub.ListModels(pb.ListModelsRequest(), timeout=30).prompt_kinds
            with pytest.raises(grpc.RpcError) as err:
                stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=BUS), texts=["car"]), timeout=60)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "texts:" in err.value.details() and "text_encoder=minilm" in err.value.details()
            answer = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=BUS), classes=["car"]), timeout=60)
            assert np.all([i.source == pb.INSTANCE_SOURCE_DETECTOR for i in answer.instances])
    finally:
        srv.stop()
