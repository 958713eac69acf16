"""Process-wide state, set deliberately once at start-up: third-party switches and logging.

Third-party libraries read some of their behaviour from the environment at import time, or keep it in module
globals. detseg sets them here, from Settings, before serving, so that no request can change them or be changed
by them:

- **ultralytics** would pip-install missing packages (``YOLO_AUTOINSTALL``, on by default), resolve DNS at
  import to decide whether it is online (``YOLO_OFFLINE``), and write its settings file under ``$HOME``
  (``YOLO_CONFIG_DIR``). detseg turns auto-install off and marks it offline for the whole process, always: a
  serving process must never install, download or start a subprocess. Its settings live under
  ``<cache_dir>/ultralytics``. Its INFO lines (on stdout, by its own handler) are off unless ``YOLO_VERBOSE`` is
  set. If ultralytics was imported before this runs (its env vars are read at import), the same switches are set
  on its modules.
- **Hugging Face** libraries (the text encoder's sentence-transformers) are kept offline (``HF_HUB_OFFLINE``).
- **NNCF** (the openvino backend's int8 quantisation) and OpenVINO's converter would send usage telemetry (and
  fork to do it): ``block_telemetry`` makes their telemetry package unimportable, so both use their stubs.
- **ONNX Runtime** (1.32) starts its OneDS telemetry sender when it is imported: it resolves
  ``mobile.events.data.microsoft.com`` ~9 s later and again every few seconds, requests or not (measured under
  strace). ``ORT_DISABLE_TELEMETRY=1`` stops it, but only when set before the import: ``block_telemetry`` sets
  it. Set afterwards it does nothing, and neither does ``onnxruntime.disable_telemetry_events()`` for the sender
  (it still stops the events), so entry points call ``block_telemetry`` first: ``detseg``'s ``main`` (serve,
  export, triton, eval, label), the server factory (in-process servers), the tests' conftest.
- **Pillow** ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept False (a library could set it for its own reasons), so
  truncated JPEG/PNG data fails to decode instead of being padded; detseg checks PNG completeness itself too
  (``service.pipeline.image``).

Memory allocator: glibc malloc returns large freed blocks to the OS at once (mmap'd blocks are unmapped, the heap
top is trimmed), so every forward pass page-faults its activations back in (575 k minor faults per request
measured on CPU). ``allocator = "tuned"`` runs the server with glibc tunables that keep freed memory for the next
pass (``ALLOCATORS``); glibc reads them at process start only, so ``detseg serve`` re-executes itself with them
(``reexec_for_allocator``) and the Triton it starts gets them in its environment. jemalloc and tcmalloc were
measured too: jemalloc was slower, and OpenVINO's ``compile_model`` aborts under either when LD_PRELOADed.

Logging: ``text`` (one line per record, caller-supplied text escaped so a request cannot forge log lines) or
``json`` (one JSON object per line; ``request_id`` and other ``extra`` fields as keys).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

from service.config import LOG_FORMATS, Settings

# Environment variables per ``Settings.allocator``. "tuned": no mmap'd blocks (large buffers come from the heap and
# are reused), no trimming below 1 TiB, 256 MiB extra when the heap grows. glibc's MALLOC_*_ names, not
# GLIBC_TUNABLES: glibc 2.36 cuts GLIBC_TUNABLES at its first ':' in the environment children inherit (seen in
# /proc/PID/environ). The Dockerfile sets the same (tests/unit/test_startup.py keeps them equal).
ALLOCATORS: dict[str, dict[str, str]] = {
    "tuned": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(256 << 20)},
    "system": {},
}


def allocator_environment(allocator: str, environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to run under for ``allocator`` (see ALLOCATORS), or None when ``environ`` needs no change:
    the allocator is "system", or any MALLOC_*_ variable or glibc.malloc tunable is set already (an operator's own
    choice wins, and a re-executed process does not re-execute again). "system" under exactly the tuned variables
    (the image sets them, to start without a re-exec) drops them: else allocator=system did nothing in the image.
    Raises ValueError for an unknown allocator."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    tuned = ALLOCATORS["tuned"]
    if allocator == "system" and tuned.items() <= environ.items():
        return {k: v for k, v in environ.items() if k not in tuned}
    wanted = ALLOCATORS[allocator]
    own = any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
    if not wanted or own:
        return None
    return {**environ, **wanted}


def reexec_for_allocator(allocator: str, argv: list[str]) -> None:
    """Replaces this process by ``python *argv`` (e.g. ["-m", "service.cli", "serve"]) under ``allocator``'s
    environment, when it differs from the current one; returns when nothing is to change. Call before loading
    anything big (start-up only)."""
    env = allocator_environment(allocator, dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


# Record attributes that every LogRecord has; anything else was passed as ``extra=`` and is a structured field.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def block_telemetry() -> None:
    """Third-party usage telemetry off, for this process and its children (a server sends nothing anywhere):

    - NNCF and OpenVINO's converter report usage through ``openvino_telemetry`` (Google Analytics, on unless a
      consent file in $HOME says no), from a thread that forks a process: in a server with gRPC's threads that
      fork crashed the process (seen in CI). Both fall back to a stub when the package cannot be imported, so it
      is made unimportable here (``sys.modules[name] = None``), before either is imported.
    - ONNX Runtime reads ``ORT_DISABLE_TELEMETRY`` when it is imported. When it was imported already, its events
      are turned off (``disable_telemetry_events``) and a WARNING says that its sender runs: call this first."""
    if "openvino_telemetry" not in sys.modules or sys.modules["openvino_telemetry"] is None:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    os.environ["NNCF_CI"] = "1"  # NNCF's own switch, for any process that imported it first
    ort_was_told = os.environ.get("ORT_DISABLE_TELEMETRY") == "1"  # by an earlier call, or by the operator
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    ort = sys.modules.get("onnxruntime")
    if ort is not None and not ort_was_told:  # imported with telemetry on (reported once: the variable is set now)
        ort.disable_telemetry_events()
        logging.getLogger(__name__).warning(
            "onnxruntime was imported before detseg's start-up: its telemetry sender runs in this process (it "
            "resolves mobile.events.data.microsoft.com); call service.startup.block_telemetry() before importing it"
        )


def configure_process(settings: Settings) -> None:
    """Sets the third-party switches above and Python's GIL switch interval (``gil_switch_interval_ms``).
    Idempotent; call before serving (the server factory does)."""
    config_dir = settings.cache_dir / "ultralytics"
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the text encoder loads from its package's folder, never the Hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ["YOLO_OFFLINE"] = "True"
    # ultralytics' INFO lines go to stdout (its own handler), e.g. "Creating new Ultralytics Settings ... file" on the
    # first run with a cache folder: they were the first line of `detseg eval`'s output. Errors only, unless set.
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # Progress bars are terminal text on stderr, not log records (they broke JSON logs): transformers' "Loading
    # weights" when the text encoder loads. Modules imported already read the variable then: switch them too.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name, switch in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
    ):
        module = sys.modules.get(name)
        if module is not None:
            getattr(module, switch)()
    block_telemetry()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    utils = sys.modules.get("ultralytics.utils")
    if utils is not None:  # imported already: its env vars were read, so set what it derived from them
        for module in (utils, sys.modules.get("ultralytics.utils.checks")):
            if module is not None:
                module.AUTOINSTALL = False  # type: ignore[attr-defined]
                module.ONLINE = False  # type: ignore[attr-defined]
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)  # benchmarks/GIL.md


def configure_logging(level: str, fmt: str) -> None:
    """Root logging to stderr: ``fmt`` "text" or "json"."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else SafeTextFormatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings as records (logger py.warnings), not raw lines on stderr


def _escape(text: str) -> str:
    """Control characters (newlines above all) as escapes, so one record is one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SafeTextFormatter(logging.Formatter):
    """One line per record: the message is escaped; a traceback follows on lines of its own, indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's name
        extras = _extras(record)
        escaped = logging.makeLogRecord(record.__dict__)  # a copy: other handlers see the record unchanged
        escaped.message = _escape(record.message)
        line = super().formatMessage(escaped)
        if extras:
            line += " " + " ".join(f"{k}={_escape(str(v))}" for k, v in extras.items())
        return line

    def formatException(self, ei: Any) -> str:  # logging's name
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the trace id of the current span (when traced),
    the ``extra`` fields (e.g. request_id), and exc_info if any."""

    def format(self, record: logging.LogRecord) -> str:
        from service.telemetry import current_trace_id

        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        trace_id = current_trace_id()
        if trace_id is not None:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
