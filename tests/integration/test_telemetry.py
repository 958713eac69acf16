"""Telemetry with the OpenTelemetry SDK's in-memory exporters (tests/conftest.py), and one real Prometheus
scrape of a `detseg serve` process."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.telemetry import DURATION_BUCKETS_S
from tests.conftest import SPANS, metric_points, wait_serving

SAMPLE = Path(__file__).resolve().parents[2] / "service" / "models" / "demo" / "sample.jpg"
STAGES = {"decode_image", "detect", "encode", "decode_masks", "encode_masks"}


def _finished(name_suffix: str, timeout: float = 5.0) -> list:
    """The finished spans once one named ``...name_suffix`` is among them (the server ends an RPC's span just
    after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = SPANS.get_finished_spans()
        if any(s.name.endswith(name_suffix) for s in spans):
            return list(spans)
        time.sleep(0.01)
    raise AssertionError(f"no span {name_suffix} finished within {timeout} s")


def test_a_request_is_one_trace_rpc_span_with_a_child_per_stage(demo_stub):
    from service.shapes.world import render_scene
    from tests.helpers import encode

    SPANS.clear()
    image = encode(render_scene(7_654_321).image)  # bytes no other test sends: not in the embedding cache
    response = demo_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)))
    spans = _finished("/Segment")
    (rpc,) = [s for s in spans if s.name == "detseg.v1.SegmentationService/Segment"]
    assert rpc.attributes["rpc.method"] == "Segment" and rpc.attributes["rpc.grpc.status_code"] == "OK"
    by_id = {s.context.span_id: s for s in spans}

    def root(span):
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
        return span

    stages = {s.name.removeprefix("detseg."): s for s in spans if s.context.trace_id == rpc.context.trace_id}
    assert set(stages) >= STAGES, set(stages)
    assert all(root(stages[n]) is rpc for n in STAGES)
    assert stages["detect"].attributes["cache_hit"] is False and stages["detect"].attributes["detections"] >= 1
    assert stages["decode_image"].attributes["image.width"] == response.image.width
    # one mechanism: the provenance timings are the stage spans' own
    timed = {t.stage for t in response.provenance.timings} - {"total"}
    assert timed <= set(stages)


def test_an_rpc_span_joins_the_callers_trace_and_carries_no_traceback(demo_stub):
    """The caller's W3C traceparent was ignored (every RPC a new root trace), and a failed RPC's span carried an
    exception event with the server's traceback and the caller's text."""
    SPANS.clear()
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = [("traceparent", f"00-{caller}-00f067aa0ba902b7-01")]
    demo_stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    (rpc,) = [s for s in _finished("/ListModels") if s.name.endswith("/ListModels")]
    assert f"{rpc.context.trace_id:032x}" == caller and rpc.parent.span_id == 0x00F067AA0BA902B7
    SPANS.clear()
    with pytest.raises(grpc.RpcError):
        demo_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=b"not an image")), metadata=metadata)
    (rpc,) = [s for s in _finished("/Segment") if s.name.endswith("/Segment")]
    assert rpc.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert not [e for e in rpc.events if e.name == "exception"]


def test_rpc_latency_errors_in_flight_and_cache_metrics(demo_stub):
    def count(name, method, code):
        return sum(
            getattr(p, "count", getattr(p, "value", 0))
            for p in metric_points(name)
            if p.attributes.get("rpc.method") == method and p.attributes.get("rpc.grpc.status_code") == code
        )

    ok, bad = count("detseg.rpc.duration", "Segment", "OK"), count("detseg.rpc.errors", "Segment", "INVALID_ARGUMENT")
    handle = demo_stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=SAMPLE.read_bytes()))).handle
    hits = sum(p.value for p in metric_points("detseg.cache.hits"))
    demo_stub.Segment(pb.SegmentRequest(image=pb.Image(handle=handle), classes=["circle"]))
    with pytest.raises(grpc.RpcError):
        demo_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=b"junk")))
    time.sleep(0.2)  # the server records an RPC just after the client has its answer
    assert count("detseg.rpc.duration", "Segment", "OK") == ok + 1
    assert count("detseg.rpc.duration", "Segment", "INVALID_ARGUMENT") >= 1
    assert count("detseg.rpc.errors", "Segment", "INVALID_ARGUMENT") == bad + 1
    assert sum(p.value for p in metric_points("detseg.cache.hits")) > hits
    assert sum(p.value for p in metric_points("detseg.requests.in_flight")) == 0
    assert sum(p.value for p in metric_points("detseg.requests.queued")) == 0


def test_json_logs_carry_the_request_id_and_the_trace_id(demo_stub):
    from service.startup import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service.api.errors")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    SPANS.clear()
    try:
        with pytest.raises(grpc.RpcError):
            demo_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=b"junk"), request_id="req-telemetry-1"))
    finally:
        logger.removeHandler(handler)
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines() if "req-telemetry-1" in x]
    (rpc,) = [s for s in _finished("/Segment") if s.name.endswith("/Segment")]
    assert line["request_id"] == "req-telemetry-1" and line["trace_id"] == format(rpc.context.trace_id, "032x")


def test_a_micro_batched_pass_links_every_request_it_served(runner):
    import asyncio

    import numpy as np
    from opentelemetry import trace

    from service.runners.batching import BatchPolicy, MicroBatcher

    async def run(stacked, context):
        await asyncio.sleep(0.05)
        return (stacked * 2,)

    async def main():
        batcher = MicroBatcher("probe", run, BatchPolicy(max_batch=8, max_wait=0.02, max_queue=8))
        tracer = trace.get_tracer("test")

        async def one(n):
            with tracer.start_as_current_span(f"request-{n}") as span:
                await batcher.submit(np.ones((1, 2)))
                return span.get_span_context()

        return await asyncio.gather(*(one(n) for n in range(3)))

    SPANS.clear()
    callers = asyncio.run(main())
    (batch,) = [s for s in SPANS.get_finished_spans() if s.name == "detseg.batch.probe"]
    assert batch.attributes["batch.requests"] == 3 and batch.parent is None
    assert {link.context.span_id for link in batch.links} == {c.span_id for c in callers}


def test_a_prometheus_scrape_of_a_real_server(settings):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    grpc_port, metrics_port = ports
    env = {**os.environ, "DETSEG_CACHE_DIR": str(settings.cache_dir), "DETSEG_THREADS": "2",
           "DETSEG_METRICS_EXPORTER": "prometheus", "DETSEG_METRICS_PORT": str(metrics_port)}  # fmt: skip
    command = [sys.executable, "-m", "service.cli", "serve", "--models", "test", "--port", str(grpc_port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        target = f"127.0.0.1:{grpc_port}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
            wait_serving(channel)
            image = pb.Image(encoded=SAMPLE.read_bytes())
            stub = pb_grpc.SegmentationServiceStub(channel)
            stub.Segment(pb.SegmentRequest(image=image), timeout=60)
            box = pb.RegionPrompt(box=pb.BoundingBox(x_min=10, y_min=10, x_max=200, y_max=200))
            frames = [
                pb.TrackRequest(start=pb.TrackStart()),
                pb.TrackRequest(frame=pb.TrackFrame(image=image, frame_index=0, prompts=[pb.TrackPrompt(region=box)])),
                pb.TrackRequest(frame=pb.TrackFrame(image=image, frame_index=1)),
            ]
            assert len(list(stub.Track(iter(frames), timeout=120))) == 2
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
            text = page.read().decode()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    lines = [line for line in text.splitlines() if line.startswith("detseg_")]
    assert any(
        line.startswith("detseg_rpc_duration_seconds_count{") and 'rpc_method="Segment"' in line
        and 'rpc_grpc_status_code="OK"' in line and line.endswith(" 1.0") for line in lines
    ), lines  # fmt: skip
    # Latency buckets in seconds (the SDK's default bounds are for milliseconds: every call fell in le="5.0").
    segment_ok = [
        line for line in lines if line.startswith("detseg_rpc_duration_seconds_bucket{")
        and 'rpc_method="Segment"' in line and 'rpc_grpc_status_code="OK"' in line
    ]  # fmt: skip
    bounds = [line.split('le="', 1)[1].split('"', 1)[0] for line in segment_ok]
    assert bounds == [str(b) for b in DURATION_BUCKETS_S] + ["+Inf"], bounds
    assert segment_ok[bounds.index("5.0")].endswith(" 1.0") and segment_ok[0].endswith(" 0.0")  # 5 ms < it <= 5 s
    assert any(line.startswith("detseg_requests_in_flight") for line in lines)
    assert any(line.startswith("detseg_cache_misses_total") for line in lines)
    # Requests per micro-batched pass, one request each here: the detector ran for the start-up warm-up and the
    # Segment, the encoder for those and each of the two Track frames.
    for model, passes in (("detector", 2), ("encoder", 4)):
        for series in ("count", "sum"):
            assert any(
                line.startswith(f"detseg_batch_requests_{series}{{") and f'model="{model}"' in line
                and line.endswith(f" {passes}.0") for line in lines
            ), lines  # fmt: skip
    assert any(line.startswith("detseg_track_frames_total") and line.endswith(" 2.0") for line in lines), lines
    assert any(line.startswith("detseg_track_sessions") and line.endswith(" 0.0") for line in lines), lines
