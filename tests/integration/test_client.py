"""service.client against real servers: typed results equal to the raw stubs' answers, every image kind, the
asyncio client, streams, cached handles, deadlines, and retries of UNAVAILABLE while a server loads."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import AsyncClient, Client, Exemplar, ImageHandle, Point, Region, RequestFailed, RetryPolicy
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread
from tests.helpers import rle_mask

SAMPLE = Path(__file__).resolve().parents[2] / "service" / "models" / "demo" / "sample.jpg"


def test_three_lines_segment_an_image_and_agree_with_the_raw_stub(demo_server, demo_stub):
    with Client(demo_server.target) as detseg:
        result = detseg.segment(SAMPLE, classes=["circle", "star"])
    raw = demo_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=SAMPLE.read_bytes()), classes=["circle", "star"]))
    assert len(result) == len(raw.instances) > 0
    assert result.labels == [i.label for i in raw.instances]
    assert (result.width, result.height, result.sha256) == (raw.image.width, raw.image.height, raw.image.sha256)
    assert result.profile == "demo" and {m.role for m in result.models} >= {"detector", "segmenter"}
    masks = result.masks()
    assert masks.shape == (len(raw.instances), raw.image.height, raw.image.width) and masks.dtype == bool
    for mine, theirs, mask in zip(result.instances, raw.instances, masks, strict=True):
        assert mine.box == (theirs.box.x_min, theirs.box.y_min, theirs.box.x_max, theirs.box.y_max)
        assert mine.score == theirs.score and mine.source == "detector"
        assert np.array_equal(mask, rle_mask(theirs.mask)) and mine.area == int(mask.sum())


def test_results_convert_to_supervision_detections(demo_server):
    import supervision as sv

    with Client(demo_server.target) as detseg:
        result = detseg.segment(SAMPLE, classes=["circle", "star"])
    detections = result.to_supervision()
    assert isinstance(detections, sv.Detections) and len(detections) == len(result)
    assert np.allclose(detections.xyxy, result.boxes) and np.array_equal(detections.mask, result.masks())
    assert list(detections.data["class_name"]) == result.labels
    assert np.allclose(detections.confidence, result.scores)
    # supervision's own tools work on it: its box areas are ours
    assert np.allclose(detections.box_area, [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in result.boxes])


def test_every_image_kind_gives_the_same_answer(demo_server):
    pixels = np.asarray(Image.open(SAMPLE).convert("RGB"))
    with Client(demo_server.target) as detseg:
        answers = [
            detseg.segment(image, classes=["circle", "star"])
            for image in (SAMPLE, str(SAMPLE), SAMPLE.read_bytes(), pixels, Image.fromarray(pixels))
        ]
    reference = answers[0]
    for other in answers[1:]:
        assert other.labels == reference.labels
        assert np.allclose(other.boxes, reference.boxes, atol=1e-3)


def test_region_boxes_and_clicks_reach_the_server(demo_server):
    with Client(demo_server.target) as detseg:
        result = detseg.segment(
            SAMPLE, regions=[Region(box=(10, 10, 120, 120), label="thing"), (30, 30, 90, 90)], classes=["star"]
        )
        clicked = detseg.segment(SAMPLE, regions=[Region(points=(Point(60, 60), Point(5, 5, positive=False)))])
    regions = [i for i in result if i.source == "region_prompt"]
    assert [i.label for i in regions] == ["thing", "object"] and [i.region_index for i in regions] == [0, 1]
    assert len(clicked) == 1 and clicked.instances[0].source == "region_prompt"


def test_a_cached_handle_answers_like_the_image(demo_server):
    with Client(demo_server.target) as detseg:
        handle = detseg.encode_image(SAMPLE)
        by_handle = detseg.segment(handle, classes=["circle"])
        by_bytes = detseg.segment(SAMPLE, classes=["circle"])
    assert isinstance(handle, ImageHandle) and handle.handle
    assert by_handle.labels == by_bytes.labels and np.allclose(by_handle.boxes, by_bytes.boxes)


def test_segment_many_streams_results_in_order_and_reports_bad_items(demo_server):
    from service.client import segment_request

    good = segment_request(SAMPLE, classes=["circle"])
    bad = pb.SegmentRequest(image=pb.Image(encoded=b"not an image"))
    with Client(demo_server.target) as detseg:
        items = list(detseg.segment_many([good, bad, good]))
    assert [i.index for i in items] == [0, 1, 2]
    assert items[0].result is not None and items[2].result is not None and items[1].result is None
    assert items[1].error is not None and items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert items[0].result.labels == items[2].result.labels


def _requests_then_a_missing_file(folder: Path):
    from service.client import segment_request

    yield segment_request(SAMPLE, classes=["circle"])
    yield segment_request(folder / "missing.jpg")


def test_segment_many_raises_a_failed_items_own_error_after_the_answers_before_it(demo_server, tmp_path):
    answered = []
    with Client(demo_server.target) as detseg:
        with pytest.raises(FileNotFoundError, match="missing.jpg"):
            for item in detseg.segment_many(_requests_then_a_missing_file(tmp_path)):
                answered.append(item)
        with pytest.raises(TypeError, match=r"item 1 is a ndarray, not a SegmentRequest"):
            list(detseg.segment_many([pb.SegmentRequest(image=pb.Image(encoded=SAMPLE.read_bytes())), np.zeros(3)]))
        assert detseg.segment(SAMPLE, classes=["circle"]).labels == answered[0].result.labels
    assert [i.index for i in answered] == [0] and answered[0].result is not None and len(answered[0].result) > 0


def test_the_asyncio_segment_many_raises_the_same_error_not_a_cancellation(demo_server, tmp_path):
    async def main() -> list:
        answered = []
        async with AsyncClient(demo_server.target) as detseg:
            with pytest.raises(FileNotFoundError, match="missing.jpg"):
                async for item in detseg.segment_many(_requests_then_a_missing_file(tmp_path)):
                    answered.append(item)
        return answered

    answered = asyncio.run(main())
    assert [i.index for i in answered] == [0] and answered[0].result is not None


def test_the_asyncio_client_made_outside_an_event_loop_says_where_to_make_it():
    """(Made there, its first call failed with "... attached to a different loop".)"""
    with pytest.raises(RuntimeError, match="AsyncClient: create it inside a running event loop"):
        AsyncClient("127.0.0.1:1")


def test_the_asyncio_client_answers_concurrent_calls(demo_server):
    async def main() -> list:
        async with AsyncClient(demo_server.target) as detseg:
            models = await detseg.list_models()
            assert models.profile == "demo"
            return await asyncio.gather(*(detseg.segment(SAMPLE, classes=["circle", "star"]) for _ in range(3)))

    results = asyncio.run(main())
    assert len({tuple(r.labels) for r in results}) == 1 and len(results[0]) > 0


def test_bad_requests_fail_at_once_with_the_servers_message(demo_server):
    with Client(demo_server.target) as detseg, pytest.raises(RequestFailed) as err:
        detseg.segment(SAMPLE, classes=["unicorn"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1
    assert "unicorn" in err.value.message


def test_the_deadline_bounds_the_call(demo_server):
    with Client(demo_server.target, timeout=0.001) as detseg, pytest.raises(RequestFailed) as err:
        detseg.segment(SAMPLE, classes=["circle"])
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_timeout_of_zero_is_a_deadline_already_passed_not_the_default(demo_server):
    with Client(demo_server.target, timeout=60) as detseg, pytest.raises(RequestFailed) as err:
        detseg.segment(SAMPLE, classes=["circle"], timeout=0)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_timeout_must_be_finite_and_the_backoff_never_overflows(demo_server):
    """An infinite timeout was sent on to gRPC, which answered DEADLINE_EXCEEDED at once (`--timeout inf` too, which
    the command line took); past retry 1024 the backoff's growth overflowed (OverflowError, not a retry)."""
    import argparse
    import random

    from service.cli.common import number

    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="timeout: .* finite number of seconds, 0 or more"):
            Client(demo_server.target, timeout=bad)
        with Client(demo_server.target) as detseg, pytest.raises(ValueError, match="timeout: "):
            detseg.segment(SAMPLE, classes=["circle"], timeout=bad)
    with pytest.raises(argparse.ArgumentTypeError, match="inf is outside"):
        number(float, 0, open_low=True)("inf")
    waits = [RetryPolicy().backoff(retry, random.Random(0)) for retry in (1, 30, 1025, 10**6)]
    assert all(0 <= w <= 5.0 for w in waits)


def test_unavailable_while_the_server_loads_is_retried_until_it_answers(settings):
    """A real server whose models are still loading answers UNAVAILABLE (a bare stub sees it); the client keeps
    retrying with backoff and gets the answer once loading ends."""
    from service.runners.factory import load_runner

    runner = load_runner(settings)  # this server's own runner (runners bind to their server's event loop)
    release = threading.Event()
    srv = ServerThread(settings, lambda: runner if release.wait(60) else runner)
    try:
        with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        threading.Timer(1.0, release.set).start()
        start = time.monotonic()
        with Client(srv.target, timeout=60, retry=RetryPolicy(max_attempts=200, initial_backoff_s=0.05,
                                                              max_backoff_s=0.2)) as detseg:  # fmt: skip
            models = detseg.list_models()
        assert models.profile == "test" and time.monotonic() - start >= 0.9
    finally:
        release.set()
        srv.stop()


def test_retries_stop_after_max_attempts(settings):
    from service.errors import ModelUnavailable

    release = threading.Event()

    def never_loads():
        release.wait(60)
        raise ModelUnavailable("loading abandoned by the test")

    srv = ServerThread(settings, never_loads)
    try:
        policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
        with Client(srv.target, retry=policy) as detseg, pytest.raises(RequestFailed) as err:
            detseg.list_models()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3
    finally:
        release.set()
        srv.stop()


def test_exemplar_objects_carry_reference_images(open_stub):
    """Exemplar(image=...) sends the reference image with the box (open-vocabulary server)."""
    from service.client import segment_request

    request = segment_request(SAMPLE, exemplars=[Exemplar((10, 10, 60, 60), "sku", image=SAMPLE.read_bytes())])
    assert request.exemplars[0].image.encoded == SAMPLE.read_bytes() and request.exemplars[0].label == "sku"
    response = open_stub.Segment(request, timeout=120)
    assert all(i.label == "sku" and i.source == pb.INSTANCE_SOURCE_EXEMPLAR for i in response.instances)


# Retries are bounded by the call's deadline, not by a count: the client used to give up after 5 attempts, i.e. at
# most 0.2 + 0.4 + 0.8 + 1.6 = 3.0 s of backoff, long before a deadline of minutes (issue 20, finding 6).
OLD_RETRY_BUDGET_S = 3.0
CLIENT_KINDS = ("sync", "asyncio")


def _list_models(kind: str, target: str, timeout: float) -> tuple[pb.ListModelsResponse | RequestFailed, float]:
    """ListModels through ``Client`` or ``AsyncClient`` with the default RetryPolicy: (answer or error, seconds)."""
    start = time.monotonic()
    try:
        if kind == "sync":
            with Client(target, timeout=timeout) as detseg:
                return detseg.list_models(), time.monotonic() - start

        async def main() -> pb.ListModelsResponse:
            async with AsyncClient(target, timeout=timeout) as detseg:
                return await detseg.list_models()

        return asyncio.run(main()), time.monotonic() - start
    except RequestFailed as e:
        return e, time.monotonic() - start


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_call_made_before_the_server_starts_is_answered_once_it_has_loaded(settings, kind):
    """The call starts while nothing listens on the port (connection refused); a real server starts there later
    than the old attempt budget and loads its models (UNAVAILABLE meanwhile); the call gets their answer."""
    from concurrent.futures import ThreadPoolExecutor

    from service.runners.factory import load_runner

    port = _free_port()
    srv = None
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(_list_models, kind, f"127.0.0.1:{port}", 300)
        try:
            time.sleep(OLD_RETRY_BUDGET_S + 1.0)
            assert not call.done(), f"the call gave up before any server started: {call.result()}"
            serving_settings = settings.replace(port=port)
            srv = ServerThread(serving_settings, lambda: load_runner(serving_settings))
            answer, seconds = call.result(timeout=300)
        finally:
            if srv is not None:
                srv.stop()
    assert isinstance(answer, pb.ListModelsResponse), answer
    assert answer.profile == "test" and seconds > OLD_RETRY_BUDGET_S + 1.0


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_call_made_while_the_models_load_is_answered_once_they_are_ready(settings, kind):
    """The server's port answers UNAVAILABLE ("loading") for longer than the old attempt budget; the call, made
    during that time, is answered once loading ends."""
    from service.runners.factory import load_runner

    release = threading.Event()

    def slow_load():
        release.wait(120)
        return load_runner(settings)

    srv = ServerThread(settings, slow_load)
    try:
        with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        threading.Timer(OLD_RETRY_BUDGET_S + 1.0, release.set).start()
        answer, seconds = _list_models(kind, srv.target, 300)
    finally:
        release.set()
        srv.stop()
    assert isinstance(answer, pb.ListModelsResponse), answer
    assert answer.profile == "test" and seconds > OLD_RETRY_BUDGET_S + 1.0


@pytest.mark.parametrize("kind", CLIENT_KINDS)
def test_a_call_to_no_server_fails_at_its_deadline_not_before(kind):
    """Nothing ever listens: the call retries until its deadline, then fails DEADLINE_EXCEEDED."""
    timeout = 6.0
    answer, seconds = _list_models(kind, f"127.0.0.1:{_free_port()}", timeout)
    assert isinstance(answer, RequestFailed), answer
    assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED and answer.attempts > 1
    assert timeout - 0.05 <= seconds <= timeout + 2.0, seconds
