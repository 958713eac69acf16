"""One reader of answers (``service.results``) for all its users: the client's typed results, the JSON a response's
manifest signs (and ``detseg segment --json`` prints), and the labeling records spell every instance source,
review reason and model role the same way: the proto enum value's name, lower case, without the enum's prefix."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from pycocotools import mask as mask_utils

from service import client, results
from service.evaluation.metrics import REVIEW_RULES
from service.labeling.run import labeled_image
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.provenance.response import instance_content as signed_content
from service.provenance.response import manifest_models
from service.results import enum_name, instance_content

# Each enum of the proto and the prefix its values carry (protobuf style: the enum's name in UPPER_SNAKE_CASE).
PREFIXES = {
    "MaskEncoding": "MASK_ENCODING_",
    "ReviewReason": "REVIEW_REASON_",
    "InstanceSource": "INSTANCE_SOURCE_",
    "TextMatchKind": "TEXT_MATCH_KIND_",
    "ModelRole": "MODEL_ROLE_",
    "PromptKind": "PROMPT_KIND_",
    "TrackState": "TRACK_STATE_",
}
OLD_REVIEW_RULES = ("low_score", "low_mask_score", "unstable_mask", "tiny_mask", "fragmented_mask", "weak_text_match")
SOURCES = [v.number for v in pb.InstanceSource.DESCRIPTOR.values]
REASONS = [v.number for v in pb.ReviewReason.DESCRIPTOR.values if v.number != pb.REVIEW_REASON_UNSPECIFIED]


def _all_enums() -> Iterator[EnumDescriptor]:
    def nested(message: Descriptor) -> Iterator[EnumDescriptor]:
        yield from message.enum_types
        for inner in message.nested_types:
            yield from nested(inner)

    yield from pb.DESCRIPTOR.enum_types_by_name.values()
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        yield from nested(message)


def _instance(source: int, reasons: list[int], label: str = "thing") -> pb.Instance:
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:7, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    inst = pb.Instance(label=label, class_id=-1, score=0.75, mask_score=0.5, source=source, region_index=0)
    inst.box.x_min, inst.box.y_min, inst.box.x_max, inst.box.y_max = 3.0, 2.0, 9.0, 7.0
    inst.mask.coco_rle.size.extend([12, 16])
    inst.mask.coco_rle.counts = rle["counts"]
    inst.review.needed = bool(reasons)
    inst.review.reasons.extend(reasons)
    inst.review.stability_score = 0.9
    return inst


def _response(instances: list[pb.Instance]) -> pb.SegmentResponse:
    response = pb.SegmentResponse(instances=instances)
    response.image.width, response.image.height, response.image.sha256 = 16, 12, "ab" * 32
    response.provenance.request_id, response.provenance.profile = "r-1", "demo"
    response.provenance.models.add(role=pb.MODEL_ROLE_SEGMENTER, name="sam2", version="", weights_sha256="cd" * 32)
    return response


def test_the_table_of_prefixes_covers_every_enum_of_the_proto() -> None:
    assert sorted(e.name for e in _all_enums()) == sorted(PREFIXES)


@pytest.mark.parametrize("enum", list(_all_enums()), ids=lambda e: e.name)
def test_enum_name_gives_every_value_its_lower_case_name_without_the_prefix(enum: EnumDescriptor) -> None:
    wrapper = getattr(pb, enum.name)
    for value in enum.values:
        assert value.name.startswith(PREFIXES[enum.name])
        assert enum_name(wrapper, value.number) == value.name[len(PREFIXES[enum.name]) :].lower()


def test_enum_name_examples_and_an_unknown_number() -> None:
    assert enum_name(pb.InstanceSource, pb.INSTANCE_SOURCE_REGION_PROMPT) == "region_prompt"
    assert enum_name(pb.ModelRole, pb.MODEL_ROLE_CONCEPT_SEGMENTER) == "concept_segmenter"
    assert enum_name(pb.TextMatchKind, pb.TEXT_MATCH_KIND_EMBEDDING) == "embedding"
    assert enum_name(pb.MaskEncoding, pb.MASK_ENCODING_COCO_RLE) == "coco_rle"
    assert enum_name(pb.ReviewReason, pb.REVIEW_REASON_WEAK_TEXT_MATCH) == "weak_text_match"
    assert enum_name(pb.TrackState, pb.TRACK_STATE_LOST) == "lost"
    with pytest.raises(ValueError):
        enum_name(pb.InstanceSource, 99)


@pytest.mark.parametrize("source", SOURCES, ids=lambda v: pb.InstanceSource.Name(v))
def test_client_signed_json_and_labeling_agree_on_every_source_and_reason(source: int) -> None:
    expected = pb.InstanceSource.Name(source).removeprefix("INSTANCE_SOURCE_").lower()
    inst = _instance(source, REASONS)
    response = _response([inst])

    typed = client.Instance.from_proto(inst)
    content = instance_content(inst)
    result = client.Result.from_proto(response)
    record = labeled_image("a.png", "ef" * 32, result).instances[0]

    assert typed.source == content["source"] == record.source == result.instances[0].source == expected
    assert typed.review_reasons == tuple(content["review"]["reasons"]) == record.review_reasons == OLD_REVIEW_RULES
    assert record.to_json()["source"] == expected and record.rle == typed.rle == content["rle"]
    assert signed_content is instance_content  # the manifest signs exactly this view


def test_a_region_prompt_is_region_prompt_everywhere() -> None:
    inst = _instance(pb.INSTANCE_SOURCE_REGION_PROMPT, [], label="mine")
    result = client.Result.from_proto(_response([inst]))
    record = labeled_image("a.png", "ef" * 32, result).instances[0]
    assert result.instances[0].source == instance_content(inst)["source"] == record.source == "region_prompt"
    assert list(result.to_supervision().data["source"]) == ["region_prompt"]


def test_the_client_reexports_the_reader_types_and_subclasses_result() -> None:
    assert client.Instance is results.Instance and client.ModelRef is results.ModelRef
    assert client.ImageHandle is results.ImageHandle
    result = client.Result.from_proto(_response([_instance(pb.INSTANCE_SOURCE_DETECTOR, [])]))
    assert isinstance(result, client.Result) and isinstance(result, results.Result)
    assert result.models == (results.ModelRef("segmenter", "sam2", "", "cd" * 32),)
    assert result.width == 16 and result.height == 12 and result.request_id == "r-1" and result.profile == "demo"
    assert result.masks().shape == (1, 12, 16) and result.instances[0].area == 30


def test_manifest_models_read_roles_through_the_reader() -> None:
    models = _response([]).provenance.models
    assert manifest_models(models) == [
        {"role": "segmenter", "name": "sam2", "version": "file", "weights_sha256": "cd" * 32}
    ]


def test_the_review_rules_of_evaluation_are_the_proto_reasons_in_order() -> None:
    assert REVIEW_RULES == OLD_REVIEW_RULES
    assert tuple(enum_name(pb.ReviewReason, r) for r in REASONS) == OLD_REVIEW_RULES


def test_a_tracked_frame_reads_ids_states_masks_and_its_echoes() -> None:
    seen = pb.TrackedInstance(track_id=3, state=pb.TRACK_STATE_TRACKED, first_frame=4)
    seen.instance.CopyFrom(_instance(pb.INSTANCE_SOURCE_DETECTOR, []))
    lost = pb.TrackedInstance(track_id=5, state=pb.TRACK_STATE_LOST, first_frame=6)
    lost.instance.CopyFrom(_instance(pb.INSTANCE_SOURCE_REGION_PROMPT, []))
    lost.instance.mask.coco_rle.counts = mask_utils.encode(np.zeros((12, 16), np.uint8, order="F"))["counts"]
    response = pb.TrackResponse(frame_index=7, instances=[seen, lost], detected=True, request_id="clip")
    response.timestamp.FromNanoseconds(1_250_000_000)
    response.image.width, response.image.height = 16, 12

    frame = client.FrameResult.from_proto(response)
    assert client.FrameResult is results.FrameResult and client.TrackedInstance is results.TrackedInstance
    assert (frame.frame_index, frame.timestamp, frame.detected, frame.request_id) == (7, 1.25, True, "clip")
    assert frame.error is None and (frame.width, frame.height) == (16, 12)
    assert [(t.track_id, t.state, t.first_frame, t.instance.source) for t in frame] == [
        (3, "tracked", 4, "detector"),
        (5, "lost", 6, "region_prompt"),
    ]
    assert frame.instances[0].instance == client.Instance.from_proto(seen.instance)
    assert frame.visible == (frame.instances[0],) and frame.instances[0].instance.area == 30


def test_a_failed_frame_reads_its_error_and_no_timestamp() -> None:
    response = pb.TrackResponse(frame_index=2, request_id="clip", error=pb.ItemError(code=3, message="frame.image: x"))
    frame = results.FrameResult.from_proto(response)
    assert frame.error == results.FrameError(3, "frame.image: x")
    assert frame.timestamp is None and frame.instances == () and len(frame) == 0
