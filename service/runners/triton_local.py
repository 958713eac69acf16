"""A local Triton Inference Server: the ``tritonserver`` that the nvidia-pytriton wheel bundles.

``detseg triton up|down|status`` and the tests use this. The bundled server runs the repository's python
backend models; three things make it work outside NVIDIA's images (measured, see ENVIRONMENT.md):

- a backend folder holding the python backend plus the stub built for *this* Python (copied, once, into
  ``<state_dir>/backends/python``; the wheel's own folder is left untouched);
- ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs``;
- this interpreter's ``bin`` first on ``PATH``: the stub imports numpy/onnxruntime from the Python it finds
  there, and that environment must have numpy<2 (this project's venv pins it).

Every endpoint binds 127.0.0.1. Production runs NVIDIA's Triton images on the same repository instead
(see model_repository/README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.config import Settings
from service.errors import ConfigurationError, ModelUnavailable
from service.models.roles import MODEL_ROLES
from service.startup import allocator_environment


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the local Triton server needs the nvidia-pytriton package (pip install nvidia-pytriton)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def backend_directory(state_dir: Path) -> Path:
    """A Triton backend folder with the python backend and this Python's stub (created on first use)."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ModelUnavailable(f"nvidia-pytriton has no python-backend stub for Python {version}")
    target = state_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        dest = target / source.name
        if not dest.exists() or dest.stat().st_size != source.stat().st_size:
            shutil.copy2(source, dest)
    return target.parent


@dataclasses.dataclass
class LocalTriton:
    """One tritonserver process serving ``repository`` on 127.0.0.1."""

    repository: Path
    state_dir: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    config_name: str = ""  # --model-config-name (e.g. "onnxruntime" for the native configs; not runnable here)
    allocator: str = Settings.allocator  # malloc of the server and its python-backend stubs (startup.ALLOCATORS)
    process: subprocess.Popen[bytes] | None = None
    log_start: int = 0  # where this process's output begins in ``log_path`` (the log is appended to)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"tritonserver-{self.grpc_port}.log"

    def command(self) -> list[str]:
        binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_directory(self.state_dir)}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env = allocator_environment(self.allocator, env) or env  # inherited by the python-backend stubs
        libs = _pytriton_root().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def start(self) -> None:
        """Starts the process (output to ``log_path``) in a session of its own, so that it outlives this
        Python when detached (the CLI) and so that it and its python-backend stubs can be signalled together.
        ConfigurationError, before anything starts, when another program listens on one of its ports (its answers
        were taken for this server's: ``wait_ready`` passed while this one still loaded, or had already failed)."""
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    raise ConfigurationError(
                        f"Triton's {name} port {port} is in use on 127.0.0.1 (another Triton? `detseg triton status`); "
                        "stop it or choose other ports"
                    ) from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL to the server and its stub processes at once (a crash, for fault tests)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def wait_ready(self, timeout: float = 180.0, models: tuple[str, ...] = MODEL_ROLES) -> None:
        """Blocks until the server and ``models`` are ready; raises ModelUnavailable with the log's tail if not."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        with contextlib.closing(grpcclient.InferenceServerClient(self.url)) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    break
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2) and all(
                        client.is_model_ready(m, client_timeout=2) for m in models
                    ):
                        return
                time.sleep(0.25)
        raise ModelUnavailable(
            f"tritonserver did not become ready at {self.url} (log: {self.log_path}):\n{self.log_errors()}"
        )

    def log_tail(self, lines: int = 25) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_errors(self, lines: int = 10, width: int = 400) -> str:
        """This process's error lines in the log (``E...`` and ``error: ...``; a model that failed to load says why
        there), each cut to ``width`` characters, at most ``lines`` of them; the log's tail when there is none."""
        if not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as log:
            log.seek(self.log_start)
            text = log.read().decode(errors="replace")
        errors = [
            line if len(line) <= width else line[:width] + " ..."
            for line in text.splitlines()
            if re.match(r"E\d{4} |error: ", line)
        ]
        return "\n".join(errors[:lines]) if errors else self.log_tail()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL to its process group after ``timeout`` seconds or once it has exited."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group: the server, stubs
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    # The CLI's detached server is remembered in a small state file.
    def state_file(self) -> Path:
        return self.state_dir / "local.json"

    def save_state(self) -> None:
        assert self.process is not None
        state = {
            "pid": self.process.pid,
            "started": process_start(self.process.pid),  # with the pid, names this process and no later one
            "repository": str(self.repository.resolve()),
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "metrics_port": self.metrics_port,
        }
        self.state_file().write_text(json.dumps(state))


@dataclasses.dataclass(frozen=True)
class ModelState:
    """One model of a Triton server: its name, and whether the server answered that it is ready."""

    name: str
    ready: bool


@dataclasses.dataclass(frozen=True)
class ServerStatus:
    """What a Triton server answered: is it ready, and is each model asked about."""

    server_ready: bool
    models: tuple[ModelState, ...]


def server_status(url: str, models: tuple[str, ...] = MODEL_ROLES, timeout: float = 2.0) -> ServerStatus | None:
    """Asks the Triton server at ``url`` (gRPC) whether each of ``models`` and the server itself are ready, each
    question within ``timeout`` seconds; None when it does not answer (not running, or not yet listening)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        states = tuple(ModelState(m, client.is_model_ready(m, client_timeout=timeout)) for m in models)
        server_ready = client.is_server_ready(client_timeout=timeout)
    except Exception:
        return None
    finally:
        client.close()
    return ServerStatus(server_ready, states)


def read_state(state_dir: Path) -> dict | None:
    """The state ``triton up`` saved, or None: none saved, or a stale one (removed): unreadable, or its process gone
    (a reboot or a crash left the file; its pid may be another process's now, which must not be signalled)."""
    path = state_dir / "local.json"
    try:
        state = json.loads(path.read_text())
        pid, started = int(state["pid"]), state.get("started")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        path.unlink(missing_ok=True)
        return None
    if process_start(pid) is None or (started is not None and process_start(pid) != started):
        path.unlink(missing_ok=True)
        return None
    return state


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat's 22nd field), None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])  # fields[0] is the 3rd field (state)


def stop_detached(state_dir: Path, timeout: float = 30.0) -> bool:
    """Stops the server ``triton up`` started; True if one was running."""
    state = read_state(state_dir)
    if state is None:
        return False
    (state_dir / "local.json").unlink()
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):  # the server if it hung, and any stub left in its group
        os.killpg(pid, signal.SIGKILL)
    return True
