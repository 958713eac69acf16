"""Hostile bytes and ids through the real gRPC server: clean INVALID_ARGUMENT, nothing installed, nothing forged.

Process creation, downloads and name lookups are observed for real with a Python audit hook (PEP 578) while the
requests are served (the server runs in this process); ultralytics' own log shows whether its requirement
checker (the path to ``pip install``) was reached.
"""

from __future__ import annotations

import io
import logging
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.startup import SafeTextFormatter
from tests.helpers import encode, synthetic_rgb

# Audit events that mean a process, a download or a network lookup was started.
_WATCHED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "urllib.Request")
_WATCHED_PREFIXES = ("socket.",)
_events: list[tuple[str, str]] = []
_recording = threading.Event()
_hook_installed = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _recording.is_set() and (event in _WATCHED or event.startswith(_WATCHED_PREFIXES)):
        _events.append((event, repr(args)[:200]))
    if _recording.is_set() and event == "import" and args and str(args[0]).split(".")[0] in ("pi_heif", "pip"):
        _events.append((event, str(args[0])))


@pytest.fixture
def audited() -> Iterator[list[tuple[str, str]]]:
    """Records watched audit events (any thread of this process) during the test; yields the list."""
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: one for the whole run, recording only when asked
        sys.addaudithook(_audit)
        _hook_installed = True
    _events.clear()
    _recording.set()
    try:
        yield _events
    finally:
        _recording.clear()


@pytest.fixture
def ultralytics_log() -> Iterator[list[str]]:
    """What ultralytics logs meanwhile (its requirement checker logs every install attempt or refusal)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("ultralytics")
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_640 = _chunk(b"IHDR", struct.pack(">IIBBBBB", 640, 480, 8, 2, 0, 0, 0))

HOSTILE = {
    "png signature alone": _PNG_SIGNATURE,
    "png signature + IHDR only (33 bytes)": _PNG_SIGNATURE + _IHDR_640,
    "jpeg SOI then zeros": b"\xff\xd8\xff" + b"\x00" * 64,
    "webp RIFF header only": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
    "png with a corrupt zlib stream": _PNG_SIGNATURE
    + _IHDR_640
    + _chunk(b"IDAT", b"\x78\x9c\xff\xff")
    + _chunk(b"IEND", b""),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_unidentifiable_image_bytes_are_invalid_argument_and_never_reach_an_installer(
    stub, runner, audited, ultralytics_log, case
):
    calls_before = dict(runner.calls)
    with pytest.raises(grpc.RpcError) as err:
        stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=HOSTILE[case])), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "image.encoded" in err.value.details()
    assert dict(runner.calls) == calls_before, "no model may run"
    assert audited == [], f"a request started a process, a download or a lookup: {audited}"
    assert ultralytics_log == [], f"the request reached ultralytics' requirement checker: {ultralytics_log}"
    assert "pi_heif" not in sys.modules


def test_the_server_factory_turns_ultralytics_auto_install_off(server):
    import ultralytics.utils
    import ultralytics.utils.checks

    assert ultralytics.utils.checks.AUTOINSTALL is False and ultralytics.utils.AUTOINSTALL is False
    assert ultralytics.utils.checks.ONLINE is False


def _png_declaring_with_rows(width: int, height: int, rows: int) -> bytes:
    """A well-formed PNG (IHDR, one IDAT, IEND) whose zlib stream ends after ``rows`` of the ``height`` rows."""
    data = np.random.default_rng(1).integers(0, 255, (rows, 1 + width * 3), dtype=np.uint8)
    data[:, 0] = 0  # filter type None
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data.tobytes())) + _chunk(b"IEND", b"")
    )


def test_png_whose_data_ends_early_is_rejected_without_decoding_the_declared_size(stub, runner, figures):
    data = _png_declaring_with_rows(6000, 6000, 64)
    calls_before = dict(runner.calls)
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=data)), timeout=60)
    elapsed = time.perf_counter() - start
    figures["truncated 6000x6000 PNG (64 rows): rejected in"] = f"{elapsed * 1000:.1f} ms"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image.encoded" in err.value.details() and "truncated PNG" in err.value.details()
    assert "6000x6000" in err.value.details()
    assert dict(runner.calls) == calls_before


class _Lines(logging.Handler):
    """Formats records as the server's text log does and keeps the output."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(SafeTextFormatter("%(levelname)s %(name)s: %(message)s"))
        self.out = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.out.write(self.format(record) + "\n")

    def lines(self, logger: str, within: float = 0.0) -> list[str]:
        """The lines ``logger`` wrote, waiting up to ``within`` seconds for a first one: the server's access log
        line is written after the reply has reached the client, and a late one of an earlier test may arrive here."""
        deadline = time.monotonic() + within
        while True:
            lines = [line for line in self.out.getvalue().splitlines() if line.split(" ")[1:2] == [f"{logger}:"]]
            if lines or time.monotonic() >= deadline:
                return lines
            time.sleep(0.01)


@pytest.fixture
def server_log() -> Iterator[_Lines]:
    handler = _Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize(
    "request_id",
    ["ok\nERROR service.api.errors: request admin: forged", "trailing-newline\n", "tab\there", "x" * 129, "ünïcode"],
)
def test_malformed_request_ids_are_rejected_and_never_written_to_the_log_raw(stub, server_log, request_id):
    good = encode(synthetic_rgb(64, 64))
    with pytest.raises(grpc.RpcError) as err:
        stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=good), request_id=request_id), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    assert server_log.lines("detseg.access", within=5.0), "the rejection is logged"
    # A Track call's start is held to the same rule (it replaced a malformed id with a fresh one and went on).
    start = pb.TrackRequest(start=pb.TrackStart(request_id=request_id))
    frame = pb.TrackRequest(frame=pb.TrackFrame(image=pb.Image(encoded=good)))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Track(iter([start, frame]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start.request_id" in err.value.details()
    lines = server_log.out.getvalue().splitlines()
    assert not any(line.startswith("ERROR service.api.errors: request admin") for line in lines), lines
    assert all(request_id not in line for line in lines)


def test_text_log_escapes_control_characters_in_any_message(server_log):
    logging.getLogger("detseg.test").warning("class %r then %s", "a\nb", "c\nFORGED line")
    lines = server_log.lines("detseg.test")
    assert len(lines) == 1 and "c\\nFORGED line" in lines[0]
    assert not any(line.startswith("FORGED") for line in server_log.out.getvalue().splitlines())
