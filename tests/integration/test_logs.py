"""Logs as an operator reads them: with ``--log-format json`` every stderr line of a serving process is one JSON
object (no progress bars or raw warnings in between) and each RPC leaves one access record; building the int8
encoder says when it starts and ends, and nothing else."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import grpc
import pytest

from service.config import Settings
from service.models.openvino_ir import encoder_ir  # blocks openvino_telemetry before nncf is imported
from service.models.roles import Role
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.runners.base import Runner
from tests.conftest import serving, wait_serving

pytestmark = pytest.mark.slow  # starts servers, exports and quantises

# Imported here, not under a test's capfd: NNCF's log handler keeps the sys.stdout it finds at import.
import nncf  # noqa: E402, F401

SAMPLE = Path(__file__).resolve().parents[2] / "service" / "models" / "demo" / "sample.jpg"
SEGMENT = "detseg.v1.SegmentationService/Segment"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_json_logs_of_a_serving_process_hold_only_json_and_one_access_record_per_rpc(settings: Settings):
    """`detseg serve --log-format json` with the text encoder (sentence-transformers) answering a free-text prompt:
    stderr is JSON objects only, one per line; the access log has a record per RPC (OK and an error), health
    checks excepted."""
    port = _free_port()
    env = {**os.environ, "DETSEG_CACHE_DIR": str(settings.cache_dir), "DETSEG_THREADS": "2", "DETSEG_BACKEND": "torch"}
    command = [sys.executable, "-m", "service.cli", "serve", "--models", "test", "--port", str(port)]
    command += ["--log-format", "json", "--log-level", "INFO"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=300)
            wait_serving(channel, timeout=600)
            stub = pb_grpc.SegmentationServiceStub(channel)
            image = pb.Image(encoded=SAMPLE.read_bytes())
            stub.Segment(pb.SegmentRequest(image=image, texts=["automobile"], request_id="req-json-ok"), timeout=120)
            with pytest.raises(grpc.RpcError) as bad:
                stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=b"junk"), request_id="req-json-bad"), timeout=60)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.ListModels(pb.ListModelsRequest(), metadata=[("x-request-id", "hdr-json-1")], timeout=60)
            for metadata in ([("x-request-id", "hdr-json-2")], []):  # the id from metadata, and none at all
                with pytest.raises(grpc.RpcError):
                    stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=b"junk")), metadata=metadata, timeout=60)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    lines = stderr.splitlines()
    not_json = []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            not_json.append(line)
    assert not not_json, f"{len(not_json)} of {len(lines)} stderr lines are not JSON: {not_json[:5]}"
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records)

    access = [r for r in records if r["logger"] == "detseg.access"]
    by_id = {r.get("request_id"): r for r in access}
    ok, failed = by_id["req-json-ok"], by_id["req-json-bad"]
    assert (ok["method"], ok["status"]) == (SEGMENT, "OK")
    assert (failed["method"], failed["status"]) == (SEGMENT, "INVALID_ARGUMENT")
    assert by_id["hdr-json-1"]["method"] == "detseg.v1.SegmentationService/ListModels"
    for record in (ok, failed, by_id["hdr-json-1"]):
        assert record["level"] == "INFO" and record["duration_ms"] > 0
        assert re.fullmatch(r"ipv[46]:.+:\d+", record["peer"]), record["peer"]
    assert ok["duration_ms"] > failed["duration_ms"], "the segmented request ran the models; the junk one did not"
    assert len(access) == 5, f"one record per RPC, health checks not logged: {access}"
    # One id per call in every record of it: the servicer took x-request-id too (its error record had a fresh id
    # while the access record had the header's), and a call without any id is logged under the one it was given
    # (the access record had none).
    errors = [r for r in records if r["logger"] == "service.api.errors"]
    assert "hdr-json-2" in by_id and "hdr-json-2" in {r.get("request_id") for r in errors}
    made = access[-1]["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and made in {r.get("request_id") for r in errors}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_access_records_cover_streams_and_are_off_when_disabled(settings: Settings, runner: Runner):
    """StreamSegment is one record for the whole stream (its id from x-request-id metadata); access_log=false
    writes none."""
    handler = _Records()
    logger = logging.getLogger("detseg.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    junk = pb.SegmentRequest(image=pb.Image(encoded=b"junk"))
    try:
        for enabled in (True, False):
            with serving(settings.replace(access_log=enabled), lambda: runner) as stub:
                results = list(stub.StreamSegment(iter([junk, junk]), metadata=[("x-request-id", "stream-1")]))
                assert [r.index for r in results] == [0, 1]
            if enabled:
                (record,) = handler.records
                assert record.method == "detseg.v1.SegmentationService/StreamSegment"  # type: ignore[attr-defined]
                assert record.status == "OK" and record.request_id == "stream-1"  # type: ignore[attr-defined]
                handler.records.clear()
        assert handler.records == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_building_the_int8_encoder_logs_one_line_before_and_one_after_and_nothing_else(
    settings: Settings, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    """NNCF logs INFO per layer through its own stdout handler and draws progress bars; torch and the calibration
    warn. None of it may reach the service's output: the log says "building ... ~N s" and "built ... in N s"."""
    import openvino as ov

    from service.models.profiles import resolve_models
    from service.runners.exported import load_export
    from service.runners.openvino import calibration_images

    export = load_export(resolve_models(settings), settings)
    source = export.graph(Role.SAM2_IMAGE_ENCODER)
    graph = tmp_path / "export" / source.parent.name / source.name  # a copy: its int8 IR is built anew here
    shutil.copytree(source.parent, graph.parent)
    image_size = export.graphs.image_size
    images = calibration_images(image_size)[:2]
    nncf_records = _Records()
    logging.getLogger("nncf").addHandler(nncf_records)
    caplog.set_level(logging.INFO, logger="service.models.openvino_ir")
    capfd.readouterr()  # what the export printed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ir = encoder_ir(ov.Core(), graph, image_size, "int8", lambda: images, "two", weights_name="test-sam")
    finally:
        logging.getLogger("nncf").removeHandler(nncf_records)
    out, err = capfd.readouterr()
    assert ir.built
    lines = [r.getMessage() for r in caplog.records if r.name == "service.models.openvino_ir"]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"building the int8 OpenVINO image encoder for test-sam once, ~\d+ s \(.+\)", lines[0])
    assert re.match(r"built the int8 OpenVINO image encoder in \d+ s: ", lines[1])
    assert [r.getMessage() for r in nncf_records.records] == []
    assert (out, err) == ("", ""), "third-party output during the build"
    assert [str(w.message) for w in caught] == []
    assert logging.getLogger("nncf").level == logging.INFO and logging.getLogger("torch").level == logging.WARNING
