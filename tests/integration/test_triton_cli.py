"""`detseg triton up | status | down` and `detseg serve --backend triton` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from service.models.demo.profile import DEMO_DIR
from tests.conftest import wait_serving
from tests.triton_helpers import free_ports

pytestmark = [pytest.mark.triton, pytest.mark.slow]  # starts a real tritonserver

DETSEG = [sys.executable, "-m", "service.cli"]


def run(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DETSEG, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_triton_up_serve_segment_down(settings, tmp_path):
    env = {**os.environ, "DETSEG_CACHE_DIR": str(tmp_path / "cache"), "DETSEG_THREADS": "2"}
    repo = tmp_path / "model_repository"  # empty: `triton up` writes all it needs (the python backend's code too)
    grpc_port, http_port, metrics_port, detseg_port = free_ports(4)
    ports = ["--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    up = run("triton", "up", "--models", "demo", "--repository", str(repo), *ports, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    serve = None
    try:
        assert f"detseg serve --backend triton --triton-url 127.0.0.1:{grpc_port}" in up.stdout
        assert (repo / "detector" / "1" / "model.onnx").exists()
        status = run("triton", "status", env=env, timeout=60)
        assert (
            status.returncode == 0 and "NOT" not in status.stdout and status.stdout.count(" ready") == 4
        ), status.stdout
        again = run("triton", "up", "--models", "demo", "--repository", str(repo), *ports, env=env, timeout=60)
        assert again.returncode == 1 and "already up" in again.stderr

        serve = subprocess.Popen(
            [*DETSEG, "serve", "--backend", "triton", "--triton-url", f"127.0.0.1:{grpc_port}", "--port",
             str(detseg_port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        target = f"127.0.0.1:{detseg_port}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            wait_serving(channel)
        answer = run("segment", str(DEMO_DIR / "sample.jpg"), "--classes", "circle,star", "--target", target,
                     "--json", env=env, timeout=120)  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        result = json.loads(answer.stdout)
        assert result["image"]["profile"] == "demo"
        assert result["instances"] and {i["label"] for i in result["instances"]} <= {"circle", "star"}
    finally:
        if serve is not None:
            serve.terminate()
            out, _ = serve.communicate(timeout=60)
            assert serve.returncode == 0, out[-2000:]
        down = run("triton", "down", env=env, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert run("triton", "status", env=env, timeout=60).returncode == 1
