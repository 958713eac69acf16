"""The README's examples run against live servers: the Python client snippet against a demo-profile server, and the
quick start's `detseg segment` sessions against what `make serve` serves (default settings, offline), text for text."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.models.cpu import cpu_has_int8_dot_products
from tests.conftest import wait_serving

README = Path(__file__).resolve().parents[2] / "README.md"
ROOT = README.parent
DETSEG = [sys.executable, "-m", "service.cli"]


def test_readme_python_client_example_runs(demo_server):
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "TARGET" in s)
    code = snippet.replace('TARGET = "127.0.0.1:50051"', f'TARGET = "{demo_server.target}"')
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=README.parent
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(tuple("0123456789abcdef")) and "shapes-yolo11n" in lines[-1]
    assert lines[-1].endswith(f"{len(lines) - 1} detections, 1 region")
    labels = [line.split()[0] for line in lines[:-1]]
    assert "circle" in labels and "star" in labels and set(labels) <= {"circle", "star"}
    assert any(line.split()[-2:] == ["round", "shape"] for line in lines[:-1])  # the text's answer says so
    # the lines the README shows are what it prints (it showed others, in another order and with other areas)
    text = " ".join(README.read_text().split())
    shown = re.search(r"It prints one line per instance, highest score first \(`(.*?)`, then `(.*?)`\)", text)
    assert shown is not None and [" ".join(line.split()) for line in lines[:2]] == list(shown.groups())


def readme_sessions() -> list[tuple[str, str]]:
    """The README's shell sessions: (command after "$ ", the output lines below it up to the next "$ "), from every
    ``` block that holds "$ .venv/bin/detseg segment"."""
    sessions = []
    for block in re.findall(r"^```\w*\n(.*?)^```$", README.read_text(), flags=re.S | re.M):
        if "$ .venv/bin/detseg segment" not in block:
            continue
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            sessions.append((command, output.rstrip("\n")))
    return sessions


@pytest.fixture(scope="module")
def make_serve(settings) -> Iterator[str]:
    """What `make serve` runs (`detseg serve --models auto`, every other setting its default) on a machine without
    the official weights and offline: the open-vocabulary demo on the default backend. Its target."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No DETSEG_* setting but the session's cache folder (exports are keyed by the weights: reusing them changes no
    # answer) and offline, as a machine without network is.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETSEG_")}
    env |= {"DETSEG_CACHE_DIR": str(settings.cache_dir), "DETSEG_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*DETSEG, "serve", "--models", "auto", "--port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
            wait_serving(channel, timeout=600)
        yield target
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow  # loads the demo on the default backend (an int8 build and its gate on a fresh cache)
def test_readme_quick_start_outputs_are_what_make_serve_answers(make_serve, figures):
    """Every `$ .venv/bin/detseg segment ...` of the quick start, run against the default server, prints exactly the
    README's lines below it (mask pixels and scores included: the served precision shows in them)."""
    from service.proto.detseg.v1 import detseg_pb2 as pb
    from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc

    sessions = readme_sessions()
    assert len(sessions) >= 4
    answered = []
    for command, _ in sessions:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/detseg", command
        result = subprocess.run(
            [*DETSEG, *argv[1:], "--target", make_serve], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr[-2000:]
        answered.append((command, result.stdout.rstrip("\n")))
    block = "".join(f"$ {command}\n{output}\n" for command, output in answered)
    assert answered == sessions, f"the README's block should read:\n{block}"
    with grpc.insecure_channel(make_serve) as channel:
        listing = pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert (listing.profile, listing.backend) == ("demo-open", "openvino")
    (segmenter,) = [m for m in listing.models if m.role == pb.MODEL_ROLE_SEGMENTER]
    gate = segmenter.precision_gate
    # precision auto: the int8 encoder is built and gated where the CPU has int8 dot products, and served exactly
    # when the demo SAM's gate passed.
    assert segmenter.HasField("precision_gate") == cpu_has_int8_dot_products()
    assert segmenter.precision == ("int8-encoder" if gate.passed else "fp32")
    figures["demo-open int8 encoder gate (make serve's default)"] = (
        f"{gate.prompts} box prompts on {gate.images} held-out images ({gate.held_out_set}): min mask IoU "
        f"{gate.min_mask_iou:.4f}, median {gate.median_mask_iou:.4f}, required {gate.required_min_mask_iou:.2f}: "
        f"{'passed, serves int8' if gate.passed else 'failed, serves fp32'}"
        if segmenter.HasField("precision_gate")
        else "not built: this CPU has no int8 dot products (VNNI, AMX), fp32 serves"
    )
