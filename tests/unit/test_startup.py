"""Process start-up: ultralytics can never auto-install, whenever it is imported; logs are one line per record."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.startup import JsonFormatter, SafeTextFormatter

# Runs in a fresh interpreter: ultralytics' switches are read when it is first imported.
_PROBE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from service.config import Settings
    from service.startup import configure_process
    calls, recording = [], []
    watched = ("subprocess.Popen", "os.system", "os.posix_spawn", "urllib.Request")
    sys.addaudithook(lambda event, args: calls.append(event) if recording and event in watched else None)
    if sys.argv[1] == "before":
        import ultralytics.utils.checks  # imported first, with the environment's default (auto-install on)
    configure_process(Settings(cache_dir=Path(sys.argv[2])))
    from ultralytics.utils import checks  # (importing torch runs ldconfig once: start-up, not a request)
    recording.append(True)
    installed = checks.check_requirements("detseg-no-such-package-xyz")
    print(checks.AUTOINSTALL, checks.ONLINE, installed, calls)
    """
)


@pytest.mark.parametrize("order", ["before", "after"])
def test_ultralytics_auto_install_is_off_whether_imported_before_or_after_start_up(tmp_path: Path, order):
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}  # ultralytics' defaults
    env["YOLO_CONFIG_DIR"] = str(tmp_path / "yolo")
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, order, str(tmp_path / "cache")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "False False False []", result.stdout + result.stderr
    if order == "before":  # ultralytics read its verbose default (on): it says that it refused
        assert "AutoUpdate disabled" in result.stderr + result.stdout
    else:  # quiet: nothing of ultralytics on stdout (a new config folder's "Creating new Ultralytics Settings")
        assert result.stdout == "False False False []\n", result.stdout


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("service.api.errors", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_the_request_id_as_a_field():
    line = JsonFormatter().format(_record("request %s: %s", "abc", "line one\nline two", request_id="abc"))
    entry = json.loads(line)
    assert "\n" not in line and entry["request_id"] == "abc" and entry["level"] == "INFO"
    assert entry["message"] == "request abc: line one\nline two"


def test_text_log_lines_escape_control_characters_and_append_fields():
    line = SafeTextFormatter("%(levelname)s %(message)s").format(_record("x %s", "a\r\nb", request_id="r1"))
    assert line == "INFO x a\\r\\nb request_id=r1"


def test_allocator_environment_tuned_system_and_the_operators_own():
    from service.startup import ALLOCATORS, allocator_environment

    tuned = allocator_environment("tuned", {"PATH": "/bin"})
    assert tuned == {"PATH": "/bin", **ALLOCATORS["tuned"]}
    assert tuned["MALLOC_MMAP_MAX_"] == "0"
    assert allocator_environment("tuned", tuned) is None  # already running under it: no re-exec loop
    assert allocator_environment("tuned", {"MALLOC_ARENA_MAX": "2"}) is None
    assert allocator_environment("tuned", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert allocator_environment("system", {"PATH": "/bin"}) is None
    # In the image (its ENV holds the tuned variables), system drops them: it did nothing there.
    assert allocator_environment("system", {"PATH": "/bin", **ALLOCATORS["tuned"]}) == {"PATH": "/bin"}
    assert allocator_environment("system", {"MALLOC_ARENA_MAX": "2"}) is None  # an operator's own stays
    with pytest.raises(ValueError, match="allocator must be one of tuned, system"):
        allocator_environment("jemalloc", {})


def test_the_container_and_triton_run_under_the_tuned_allocator(tmp_path, monkeypatch):
    """The Dockerfile sets the same variables (no re-exec in the image); a local Triton and its stubs inherit them."""
    from service.runners.triton_local import LocalTriton
    from service.startup import ALLOCATORS

    dockerfile = (Path(__file__).parents[2] / "Dockerfile").read_text()
    for name, value in ALLOCATORS["tuned"].items():
        assert f"    {name}={value}" in dockerfile
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            monkeypatch.delenv(name)
    assert ALLOCATORS["tuned"].items() <= LocalTriton(tmp_path, tmp_path).environment().items()
    assert not any(k.startswith("MALLOC_") for k in LocalTriton(tmp_path, tmp_path, allocator="system").environment())


# Imports onnxruntime after start-up, as a server does, and lives past the ~9 s after which ONNX Runtime 1.32's
# telemetry sender first resolves its collector's name (then again every few seconds; measured under strace).
_ORT_PROBE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from service.config import Settings
    from service.startup import configure_process
    configure_process(Settings(cache_dir=Path(sys.argv[1])))
    import onnxruntime
    time.sleep(float(sys.argv[2]))
    """
)
ORT_TELEMETRY_FIRST_LOOKUP_S = 9.0


def test_onnxruntime_resolves_and_connects_to_nothing_after_start_up(tmp_path: Path):
    from tests.network_trace import outbound_connects, traced

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # the variable comes from start-up
    trace = tmp_path / "connect.strace"
    command = [sys.executable, "-c", _ORT_PROBE, str(tmp_path / "cache"), str(ORT_TELEMETRY_FIRST_LOOKUP_S + 3)]
    result = subprocess.run(traced(command, trace), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert outbound_connects(trace) == []


def test_start_up_sets_the_gil_switch_interval_and_serve_refuses_none(tmp_path: Path):
    """A runner thread gives the GIL up at every torch op: the interval bounds its wait (benchmarks/GIL.md)."""
    probe = (
        "import sys; from pathlib import Path; from service.config import Settings; "
        "from service.startup import configure_process; before = sys.getswitchinterval(); "
        "configure_process(Settings(cache_dir=Path(sys.argv[1]))); default = sys.getswitchinterval(); "
        "configure_process(Settings(cache_dir=Path(sys.argv[1]), gil_switch_interval_ms=0.25)); "
        "print(before, default, sys.getswitchinterval())"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["0.005", "0.0005", "0.00025"], result.stdout + result.stderr
    env = {**os.environ, "DETSEG_GIL_SWITCH_INTERVAL_MS": "0", "DETSEG_CACHE_DIR": str(tmp_path)}
    serve = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--models", "test", "--port", "0", "--allocator", "system"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert serve.returncode == 2
    says = "detseg: setting gil_switch_interval_ms: 0.0 is less than or equal to the minimum of 0"
    assert serve.stderr.strip().endswith(says), serve.stderr


def test_the_command_line_and_its_client_commands_start_without_torch():
    """`detseg --help` and the client commands (`segment`, `track`, ...): the server's modules (torch, ~5 s here) load
    only in the handlers that need them (service/cli/__init__.py)."""
    probe = (
        "import sys; from service.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ultralytics', 'sam2', 'service.app') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "service.cli", "segment", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "--target" in helped.stdout, helped.stdout + helped.stderr
