"""Helpers for tests and benchmarks that run a real tritonserver and a detseg server in front of it."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import grpc

from service.config import Settings
from service.models.roles import MODEL_ROLES
from service.runners.factory import load_runner
from service.runners.triton_local import LocalTriton
from tests.conftest import ServerThread, wait_serving

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_triton(repo: Path, state_dir: Path, models: tuple[str, ...] = MODEL_ROLES) -> LocalTriton:
    """A tritonserver on free ports, serving ``repo``, once ``models`` are ready."""
    grpc_port, http_port, metrics_port = free_ports(3)
    server = LocalTriton(repo, state_dir, grpc_port, http_port, metrics_port)
    server.start()
    server.wait_ready(300, models=models)
    return server


def start_detseg(settings: Settings, timeout: float = 900.0) -> ServerThread:
    """An in-process server for ``settings``, SERVING. ``timeout``: for loading, which on the openvino backend's
    first start includes quantising SAM's encoder (~2 min for SAM 2.1-T at 1024² on 2 cores)."""
    srv = ServerThread(settings, lambda: load_runner(settings))
    with grpc.insecure_channel(srv.target) as channel:
        wait_serving(channel, timeout)
    return srv


def metric(server: LocalTriton, name: str, **labels: str) -> float:
    """Sum of a Prometheus counter from Triton's metrics endpoint over series matching ``labels``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class DetsegWorkers:
    """`detseg serve --workers N` as a process of its own, for ``settings`` (written to a YAML config file), on a
    free port, SERVING; ``stop`` sends SIGTERM and waits for a clean exit."""

    def __init__(self, settings: Settings, workers: int, folder: Path, timeout: float = 900.0) -> None:
        import dataclasses
        import os
        import subprocess
        import sys

        import yaml

        self.workers = workers
        (self.port,) = free_ports(1)
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        config = folder / f"workers-{self.port}.yaml"
        config.write_text(yaml.safe_dump({**values, "port": self.port, "workers": workers}))
        self.log = folder / f"workers-{self.port}.log"
        command = [sys.executable, "-m", "service.cli", "serve", "--config", str(config)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            # Polled, so that a server that exits while starting (say, no redis-server on PATH) fails at once.
            while True:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    break
                except grpc.FutureTimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"detseg serve --workers exited {self.proc.returncode} before serving: "
                            f"{self.log.read_text()[-2000:]}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise
            wait_serving(channel, max(1.0, deadline - time.monotonic()))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        if self.proc.wait(120) != 0:
            raise RuntimeError(f"detseg serve --workers exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
