"""Admission control, deadlines and cancellation on a real server whose detector is slowed down on purpose
(the one injected fault: slowness cannot be produced on demand for real)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import time

import grpc
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, wait_serving
from tests.helpers import encode


class Slow:
    """Wraps a runner's detect with an adjustable delay (0 while the server warms up), counts the calls and keeps
    the time each call had left (``service.runners.base.time_left``: what admission and Triton are told)."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.calls = 0
        self.time_left: list[float | None] = []

    def factory(self, settings):
        from service.runners.factory import load_runner

        def load():
            runner = load_runner(settings)
            detect = runner.detect

            async def slow_detect(*args, **kwargs):
                from service.runners.base import time_left

                self.calls += 1
                self.time_left.append(time_left())
                await asyncio.sleep(self.delay)
                return await detect(*args, **kwargs)

            runner.detect = slow_detect
            return runner

        return load


@pytest.fixture
def slow_server(settings):
    started = []

    def start(**limits):
        slow = Slow()
        s = settings.replace(**limits)
        srv = ServerThread(s, slow.factory(s))
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
        started.append(srv)
        return srv, slow

    yield start
    for srv in started:
        srv.stop()


def _request() -> pb.SegmentRequest:
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return pb.SegmentRequest(image=pb.Image(encoded=encode(image)))


def _admission(srv):
    return srv.served.servicer.admission


def test_beyond_in_flight_and_queue_requests_are_refused_at_once(slow_server):
    srv, slow = slow_server(max_in_flight=2, max_queue=2)
    slow.delay = 1.0
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        start = time.monotonic()
        done: dict[int, float] = {}
        futures = [stub.Segment.future(_request(), timeout=30) for _ in range(8)]
        for n, f in enumerate(futures):
            f.add_done_callback(lambda _, n=n: done.setdefault(n, time.monotonic() - start))
        codes = [f.code() for f in futures]  # waits for each
    refused = [done[n] for n, c in enumerate(codes) if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    answered = [done[n] for n, c in enumerate(codes) if c == grpc.StatusCode.OK]
    assert len(answered) == 4 and len(refused) == 4, codes
    # refused without waiting for the slow ones (each takes >= 1 s: a bound in seconds failed on a busy machine)
    assert max(refused) < min(answered), (refused, answered)


def test_a_streams_own_items_wait_their_turn_and_are_not_refused(slow_server):
    """With max_in_flight + max_queue below max_stream_in_flight, a lone stream's items all asked for admission at
    once and the stream refused its own items RESOURCE_EXHAUSTED; the same items in a BatchSegment waited their
    turn."""
    srv, slow = slow_server(max_in_flight=1, max_queue=1, max_stream_in_flight=4)
    slow.delay = 0.3
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        results = list(stub.StreamSegment(iter([_request() for _ in range(4)]), timeout=60))
    assert [r.WhichOneof("result") for r in results] == ["response"] * 4, [r.error.message for r in results]


def test_a_deadline_is_honoured_and_the_slot_freed(slow_server):
    srv, slow = slow_server(max_in_flight=1, max_queue=4)
    slow.delay = 2.0
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(_request(), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 0.3
    _wait_idle(srv)


def test_a_request_whose_deadline_passes_in_the_queue_is_never_started(slow_server):
    srv, slow = slow_server(max_in_flight=1, max_queue=4)
    slow.delay = 1.0
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        first = stub.Segment.future(_request(), timeout=30)
        time.sleep(0.2)
        calls = slow.calls
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(_request(), timeout=0.3)  # waits behind the first, expires in the queue
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first.result()
    assert slow.calls == calls  # the expired request never reached the detector
    _wait_idle(srv)


def test_the_server_default_deadline_caps_calls_without_one(slow_server):
    srv, slow = slow_server(default_deadline_seconds=0.3)
    slow.delay = 2.0
    with grpc.insecure_channel(srv.target) as channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SegmentationServiceStub(channel).Segment(_request())  # no deadline from the caller
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 1.0
        assert "deadline" in err.value.details()


def test_cancelling_fifty_requests_returns_the_counters_to_zero(slow_server, figures):
    srv, slow = slow_server(max_in_flight=2, max_queue=48)
    slow.delay = 0.5
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        futures = [stub.Segment.future(_request(), timeout=60) for _ in range(50)]
        deadline = time.monotonic() + 10
        while _admission(srv).in_flight + _admission(srv).queued < 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        peak = (_admission(srv).in_flight, _admission(srv).queued)
        cancelled = sum(f.cancel() for f in futures)  # False for the few that finished meanwhile
        for f in futures:
            if f.cancelled():
                with pytest.raises((grpc.FutureCancelledError, concurrent.futures.CancelledError, grpc.RpcError)):
                    f.result()
        assert cancelled >= 45
    seconds = _wait_idle(srv)
    figures["cancel 50 requests (2 running + 48 queued): counters back to zero after"] = f"{seconds:.2f} s"
    assert peak == (2, 48)


def _wait_idle(srv, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        a = _admission(srv)
        if a.in_flight == 0 and a.queued == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    a = _admission(srv)
    raise AssertionError(f"still {a.in_flight} in flight and {a.queued} queued after {timeout} s")


def test_sigterm_drains_twenty_requests_in_flight_refuses_new_ones_and_exits_zero(settings, figures):
    """A real `detseg serve` process: 20 requests sent, SIGTERM while (at least 15 of) them run, every one answered
    OK, a request after the signal refused, exit status 0 within the grace period."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import ultralytics_asset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DETSEG_CACHE_DIR": str(settings.cache_dir), "DETSEG_THREADS": "2",
           "DETSEG_GRACE_SECONDS": "60", "DETSEG_MAX_QUEUE": "32"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", "test", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    image = ultralytics_asset("bus.jpg").read_bytes()  # 810x1080: each request takes a while on CPU
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
            wait_serving(channel)
            stub = pb_grpc.SegmentationServiceStub(channel)
            # New bytes each (JPEG ignores trailing bytes): no request shares another's cached encoding.
            futures = [stub.Segment.future(pb.SegmentRequest(image=pb.Image(encoded=image + b"\0" * k)), timeout=120)
                       for k in range(20)]  # fmt: skip
            time.sleep(0.2)  # sent; a request of these models can be answered within 0.5 s when the machine is quick
            in_flight = sum(not f.done() for f in futures)
            assert in_flight >= 15, in_flight  # the signal comes while (nearly) all of them run
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(target) as fresh, pytest.raises(grpc.RpcError) as err:
                pb_grpc.SegmentationServiceStub(fresh).Segment(
                    pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            codes = [f.code() for f in futures]
        out, _ = proc.communicate(timeout=90)
        drained = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert codes == [grpc.StatusCode.OK] * 20, codes
    assert proc.returncode == 0, out[-2000:]
    figures["SIGTERM with 20 requests sent: in flight at the signal, all OK, drained and exited after"] = (
        f"{in_flight}, {drained:.1f} s"
    )


def test_a_server_with_small_image_limits_warms_up_and_serves(settings):
    """The warm-up sent a 96x64 image whatever the limits: with max_image_pixels under 6,144 it was refused, the
    load failed and the server never served."""
    srv = ServerThread(settings.replace(max_image_pixels=500, max_image_side=30))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
            rgb = bytes(range(256)) * 5  # 20 x 20 x 3 = 1,200 bytes
            request = pb.SegmentRequest(
                image=pb.Image(raw=pb.RawImage(data=rgb[:1200], width=20, height=20)),
                regions=[pb.RegionPrompt(box=pb.BoundingBox(x_min=2, y_min=2, x_max=15, y_max=18))],
            )
            assert len(pb_grpc.SegmentationServiceStub(channel).Segment(request, timeout=60).instances) == 1
    finally:
        srv.stop()


def test_bad_input_is_refused_as_such_however_busy_the_server(slow_server):
    """Checks that need no pixels ran inside the admission slot: with the server busy, a request for an unknown class
    or a score threshold of 5 got RESOURCE_EXHAUSTED, which a client retries with backoff, for good."""
    srv, slow = slow_server(max_in_flight=1, max_queue=0)
    slow.delay = 2.0
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        busy = stub.Segment.future(_request(), timeout=30)
        time.sleep(0.5)  # it holds the one slot
        bad = [_request(), _request()]
        bad[0].classes.append("zebra")
        bad[1].options.score_threshold = 5
        for request in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.Segment(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert busy.code() == grpc.StatusCode.OK


def test_a_batch_is_not_refused_by_its_own_items(slow_server):
    """Each item took its own admission place at once: with max_in_flight 1 and max_queue 1, a batch of four on an
    idle server had two good items refused as 'server busy' by the batch's other items."""
    srv, slow = slow_server(max_in_flight=1, max_queue=1, max_batch_items=4)
    slow.delay = 0.2
    items = [_request() for _ in range(4)]
    items[1].classes.append("zebra")
    with grpc.insecure_channel(srv.target) as channel:
        response = pb_grpc.SegmentationServiceStub(channel).BatchSegment(
            pb.BatchSegmentRequest(requests=items), timeout=60
        )
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["response", "error", "response", "response"], [r.error.message for r in response.results]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_wait_serving_ends_at_once_when_the_models_fail_to_load(settings):
    """A failed load sends no new health status, so wait_serving (detseg eval and label without --target) waited its
    whole timeout and then blamed the deadline."""
    from service.app import InProcessServer
    from service.errors import ModelUnavailable

    def broken():
        time.sleep(1.0)  # fails once the watch is open, as a real load does
        raise ModelUnavailable("no such weights")

    with InProcessServer(settings, broken) as srv:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="models failed to load: no such weights"):
            srv.wait_serving(timeout=60)
        assert time.monotonic() - start < 10


def _access(caplog, method: str) -> list[str]:
    return [r.status for r in caplog.records if r.name == "detseg.access" and r.method.endswith(method)]


def test_a_cancelled_stream_starts_no_queued_item_and_is_logged_cancelled(slow_server, caplog):
    """Python 3.11's wait_for handed a queued item the slot a cancelled item freed and swallowed its cancellation:
    it ran the whole pipeline for a client that was gone."""
    srv, slow = slow_server(max_in_flight=2, max_queue=8, max_stream_in_flight=4)
    slow.delay, before = 1.5, slow.calls  # (the warm-up's)
    caplog.set_level(logging.INFO, logger="detseg.access")
    with grpc.insecure_channel(srv.target) as channel:
        call = pb_grpc.SegmentationServiceStub(channel).StreamSegment(iter([_request()] * 4))
        time.sleep(0.6)
        started = slow.calls
        call.cancel()
        time.sleep(2.5)
    assert started - before == 2 and slow.calls == started  # two admitted; none started after the cancel
    assert (_admission(srv).in_flight, _admission(srv).queued) == (0, 0)
    assert _access(caplog, "StreamSegment") == ["CANCELLED"]


def test_a_stream_past_its_deadline_is_logged_deadline_exceeded_as_its_client_sees(slow_server, caplog):
    """gRPC cancels a stream at its deadline: the access log and metrics said CANCELLED, the client saw
    DEADLINE_EXCEEDED. Its frame runs within the call's deadline too."""
    srv, slow = slow_server()
    slow.delay = 3.0
    caplog.set_level(logging.INFO, logger="detseg.access")
    start = pb.TrackRequest(start=pb.TrackStart(classes=["person"]))
    frame = pb.TrackRequest(frame=pb.TrackFrame(image=_request().image, frame_index=0))
    with grpc.insecure_channel(srv.target) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            list(pb_grpc.SegmentationServiceStub(channel).Track(iter([start, frame]), timeout=1.0))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(2.5)
    assert _access(caplog, "Track") == ["DEADLINE_EXCEEDED"]
    assert slow.time_left[-1] is not None and slow.time_left[-1] <= 1.0  # the frame's deadline was a fresh 30 s


def test_a_client_gone_while_a_stream_answer_waits_to_be_sent_is_a_cancellation_and_no_error(slow_server, caplog):
    """The answers were yielded to gRPC, which sent them outside our handler: the client gone while a send waited
    (flow control), the handler's generators were closed later by the event loop, in another task: status UNKNOWN,
    gRPC's ExecuteBatchError and OpenTelemetry's "Failed to detach context" logged at ERROR."""
    import io

    import numpy as np
    from PIL import Image

    gc.collect()  # what earlier tests' stopped servers left (their pending tasks log as they are collected)
    srv, _ = slow_server(max_stream_in_flight=4)
    caplog.set_level(logging.INFO)
    caplog.clear()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, format="PNG")
    boxes = [
        pb.RegionPrompt(box=pb.BoundingBox(x_min=i, y_min=i, x_max=511 - i, y_max=511 - i)) for i in range(0, 128, 16)
    ]
    big = pb.SegmentRequest(
        image=pb.Image(encoded=buf.getvalue()),
        regions=boxes,
        options=pb.SegmentOptions(mask_encoding=pb.MASK_ENCODING_PNG),
    )  # about 94 KB an answer
    with grpc.insecure_channel(srv.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = pb_grpc.SegmentationServiceStub(channel).StreamSegment(iter([big] * 30))  # none of it read
        time.sleep(4)
        call.cancel()
        time.sleep(1.5)
    gc.collect()
    time.sleep(0.5)
    assert _access(caplog, "StreamSegment") == ["CANCELLED"]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (_admission(srv).in_flight, _admission(srv).queued) == (0, 0)
