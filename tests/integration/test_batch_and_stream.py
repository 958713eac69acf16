"""BatchSegment and StreamSegment through the real gRPC server: order, per-item errors, mixed prompts."""

from __future__ import annotations

import grpc
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from tests.helpers import encode, synthetic_rgb

INVALID_ARGUMENT, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0]


def image(seed: int, h: int = 96, w: int = 128) -> pb.Image:
    return pb.Image(encoded=encode(synthetic_rgb(h, w, seed=seed)))


def box_regions(n: int) -> list[pb.RegionPrompt]:
    return [pb.RegionPrompt(box=pb.BoundingBox(x_min=4 + i, y_min=4, x_max=60 + i, y_max=50)) for i in range(n)]


def test_batch_with_mixed_prompt_counts_and_a_bad_item(stub):
    requests = [
        pb.SegmentRequest(image=image(201), regions=box_regions(1), request_id="a"),
        pb.SegmentRequest(image=image(202, 80, 100), regions=box_regions(5), request_id="b"),
        pb.SegmentRequest(image=pb.Image(encoded=b"not an image"), request_id="bad"),
        pb.SegmentRequest(image=image(203), classes=["person", "bus"], options=pb.SegmentOptions(score_threshold=0.01)),
        pb.SegmentRequest(image=pb.Image(handle="sha256:" + "f" * 64)),
    ]
    response = stub.BatchSegment(pb.BatchSegmentRequest(requests=requests), timeout=120)
    assert [r.index for r in response.results] == [0, 1, 2, 3, 4]
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["response", "response", "error", "response", "error"]
    first, second, bad, classes, missing = response.results
    assert len(first.response.instances) == 1 and first.response.provenance.request_id == "a"
    assert len(second.response.instances) == 5 and second.response.image.width == 100
    assert bad.error.code == INVALID_ARGUMENT and "image" in bad.error.message
    assert {i.label for i in classes.response.instances} <= {"person", "bus"}
    assert missing.error.code == NOT_FOUND


def test_batch_limits(stub, settings):
    with pytest.raises(grpc.RpcError) as info:
        stub.BatchSegment(pb.BatchSegmentRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests" in info.value.details()
    too_many = [pb.SegmentRequest(image=image(1)) for _ in range(settings.max_batch_items + 1)]
    with pytest.raises(grpc.RpcError) as info:
        stub.BatchSegment(pb.BatchSegmentRequest(requests=too_many), timeout=30)
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(settings.max_batch_items) in info.value.details()
    )


def test_stream_answers_in_order_and_survives_bad_items(stub):
    def requests():
        for i in range(10):
            if i == 3:
                yield pb.SegmentRequest(image=pb.Image(encoded=b"\x89PNG broken"), request_id=f"r{i}")
            elif i == 6:
                yield pb.SegmentRequest(image=image(300 + i), regions=box_regions(1), options=pb.SegmentOptions(
                    score_threshold=2.0), request_id=f"r{i}")  # fmt: skip
            else:
                # Small and large items interleaved: later items may finish first, order must hold anyway.
                size = (64, 64) if i % 2 else (240, 320)
                yield pb.SegmentRequest(image=image(300 + i, *size), regions=box_regions(1 + i % 3), request_id=f"r{i}")

    results = list(stub.StreamSegment(requests(), timeout=300))
    assert [r.index for r in results] == list(range(10))
    for i, r in enumerate(results):
        if i in (3, 6):
            assert r.error.code == INVALID_ARGUMENT
        else:
            assert r.response.provenance.request_id == f"r{i}" and len(r.response.instances) == 1 + i % 3
    assert "score_threshold" in results[6].error.message


def test_stream_holds_the_client_back_when_items_are_in_flight(stub, settings, figures):
    """Flow control: the server reads at most max_stream_in_flight (+1) items ahead of its answers, so a fast
    client's sends block instead of piling 16 x 4 MB into the server."""
    n, side = 16, 1200
    pixels = synthetic_rgb(side, side, seed=500).tobytes()  # 4.3 MB raw: a few fill gRPC's transport window
    sent = [0]

    def requests():
        for i in range(n):
            sent[0] += 1
            yield pb.SegmentRequest(
                image=pb.Image(raw=pb.RawImage(data=pixels, width=side, height=side)),
                regions=box_regions(1),
                request_id=f"r{i}",
            )

    ahead = []
    for received, result in enumerate(stub.StreamSegment(requests(), timeout=300), start=1):
        assert result.index == received - 1 and result.response.instances
        ahead.append(sent[0] - received)
    # Without flow control the client would have sent all 16 before the first answer (ahead = 15).
    line = f"{max(ahead)} of {n} (in-flight limit {settings.max_stream_in_flight})"
    figures["StreamSegment: most 4 MB requests sent ahead of answers"] = line
    assert max(ahead) < n - 4, line


def test_a_stream_message_that_does_not_parse_ends_the_stream_with_its_error(stub, channel):
    """The reader task died on the message without telling the stream: the call hung (holding its RPC) until the
    client's deadline. Now the items before it are answered, then INVALID_ARGUMENT."""
    good = pb.SegmentRequest(image=image(5)).SerializeToString()
    raw = channel.stream_stream(  # bytes as sent, not a message
        "/detseg.v1.SegmentationService/StreamSegment",
        request_serializer=lambda b: b,
        response_deserializer=pb.SegmentResult.FromString,
    )
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for result in raw(iter([good, b"\xff\xff\xff\xff", good]), timeout=60):
            answers.append(result.index)
    assert answers == [0]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.value.details()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("Segment", "detseg.v1.SegmentRequest"),
        ("EncodeImage", "detseg.v1.EncodeImageRequest"),
        ("BatchSegment", "detseg.v1.BatchSegmentRequest"),
        ("ListModels", "detseg.v1.ListModelsRequest"),
    ],
)
def test_a_unary_request_that_does_not_parse_is_invalid_argument(stub, channel, method, message):
    """gRPC's own deserialization answered UNKNOWN naming protobuf's exception class ("Unexpected <class
    'google.protobuf.message.DecodeError'>") and logged a traceback; the stream RPCs said INVALID_ARGUMENT."""
    raw = channel.unary_unary(f"/detseg.v1.SegmentationService/{method}", request_serializer=lambda b: b)
    for payload in (b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab"):  # a length past the end; a field cut short
        with pytest.raises(grpc.RpcError) as err:
            raw(payload, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details() == f"the request does not parse as a {message}"
    assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models  # still serving


def test_a_track_message_that_does_not_parse_ends_the_call_with_invalid_argument(stub, channel):
    """The Track call ended INTERNAL (a fault of the server's) on a frame whose bytes do not parse."""
    start = pb.TrackRequest(start=pb.TrackStart()).SerializeToString()
    raw = channel.stream_stream(
        "/detseg.v1.SegmentationService/Track",
        request_serializer=lambda b: b,
        response_deserializer=pb.TrackResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([start, b"\x12\x01\xff"]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == "a stream message does not parse as a detseg.v1.TrackRequest"
    assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
