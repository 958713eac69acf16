"""Triton benchmark (not a test): the SAM 2 encoder under load, and embedded vs Triton latency.

    python -m tests.benchmarks.triton_bench [--image-size 1024] [--out benchmarks]

1. The ``sam2_image_encoder`` model alone, through tritonclient (gRPC aio), at 1 / 4 / 8 concurrent clients,
   with Triton's dynamic batching on and off: throughput and p50 / p99 latency. SAM 2.1 hiera-tiny
   architecture at ``--image-size`` with seeded random weights (the FLOPs of the official checkpoint;
   no official weights can be downloaded here). perf_analyzer has no usable wheel, hence this script.
2. One image, end to end through detseg's gRPC API, embedded (torch) vs ``--backend triton`` on the same
   models, requests interleaved in one run: medians and the ratio, for the demo and test profiles.

Writes ``<out>/TRITON.md`` and ``<out>/triton.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.config import Settings
from service.models import export, triton_repo
from service.models.profiles import resolve_models
from tests.triton_helpers import start_detseg, start_triton

ENCODER = "sam2_image_encoder"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def encoder_repository(root: Path, image_size: int, batching: bool) -> Path:
    """A repository holding only the encoder (hiera-t, seeded) with dynamic batching on or off."""
    import torch
    from sam2.build_sam import build_sam2

    repo = root / ("batching" if batching else "no-batching")
    onnx_path = repo / ENCODER / "1" / "model.onnx"
    shared = root / "encoder.onnx"
    if not shared.exists():
        torch.manual_seed(0)
        sam = build_sam2(
            "configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval",
            hydra_overrides_extra=[f"++model.image_size={image_size}"],
        )  # fmt: skip
        export.export_encoder(sam, shared)
    triton_repo.write_backend_code(repo, [ENCODER])
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    if not onnx_path.exists():
        onnx_path.symlink_to(shared)
    defaults = triton_repo.RepositoryOptions.from_settings(Settings())
    options = dataclasses.replace(defaults, dynamic_batching=batching, max_queue_size=64)
    params = {"detseg_input_size": str(image_size)}
    config = triton_repo.build_config(ENCODER, onnx_path, params, options, native=False)
    (repo / ENCODER / "config.pbtxt").write_text(triton_repo.config_text(config))
    return repo


async def load_encoder(url: str, image_size: int, clients: int, requests: int) -> dict[str, float]:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aio

    image = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    limit = 256 << 20
    client = aio.InferenceServerClient(
        url, channel_args=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    )
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            tensor = grpcclient.InferInput("images", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            start = time.perf_counter()
            await client.infer(ENCODER, [tensor])
            latencies.append(time.perf_counter() - start)

    tensor = grpcclient.InferInput("images", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    await client.infer(ENCODER, [tensor])  # warm-up
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "clients": clients,
        "requests": requests,
        "throughput_img_s": requests / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }


def bench_encoder(root: Path, image_size: int, per_client: int) -> list[dict[str, Any]]:
    rows = []
    for batching in (False, True):
        repo = encoder_repository(root, image_size, batching)
        server = start_triton(repo, root / "state", models=(ENCODER,))
        try:
            for clients in (1, 4, 8):
                result = asyncio.run(load_encoder(server.url, image_size, clients, max(4, per_client * clients)))
                result["dynamic_batching"] = batching
                rows.append(result)
                print(json.dumps(result), flush=True)
        finally:
            server.stop()
    return rows


def bench_end_to_end(root: Path, profile: str, repeats: int) -> dict[str, Any]:
    """Same image, same models: embedded detseg vs detseg → Triton, interleaved requests."""
    from service.models.demo.profile import DEMO_DIR
    from service.proto.detseg.v1 import detseg_pb2 as pb
    from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc

    # No embedding cache: every request of the same image runs the whole pipeline.
    settings = Settings(models=profile, cache_dir=root / "cache", port=0, offline=True, cache_max_bytes=0)
    repo = root / f"repo-{profile}"
    triton_repo.write_repository(resolve_models(settings), settings, repo)
    server = start_triton(repo, root / "state")
    embedded = start_detseg(settings)
    remote = start_detseg(settings.replace(backend="triton", triton_url=server.url))
    request = pb.SegmentRequest(image=pb.Image(encoded=(DEMO_DIR / "sample.jpg").read_bytes()))
    times: dict[str, list[float]] = {"embedded": [], "triton": []}
    try:
        channels = {k: grpc.insecure_channel(s.target) for k, s in (("embedded", embedded), ("triton", remote))}
        stubs = {k: pb_grpc.SegmentationServiceStub(c) for k, c in channels.items()}
        for stub in stubs.values():
            stub.Segment(request, timeout=300)
        for _ in range(repeats):
            for name, stub in stubs.items():
                start = time.perf_counter()
                stub.Segment(request, timeout=300)
                times[name].append(time.perf_counter() - start)
        for c in channels.values():
            c.close()
    finally:
        remote.stop()
        embedded.stop()
        server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "profile": profile,
        "repeats": repeats,
        "embedded_p50_s": med["embedded"],
        "triton_p50_s": med["triton"],
        "embedded_p99_s": percentile(times["embedded"], 99),
        "triton_p99_s": percentile(times["triton"], 99),
        "triton_over_embedded": med["triton"] / med["embedded"],
    }


def machine() -> dict[str, str]:
    import onnxruntime
    import torch
    import tritonclient

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tritonclient": tritonclient.__version__ if hasattr(tritonclient, "__version__") else "2.73",
        "tritonserver": "2.51 (nvidia-pytriton 0.7.0 bundle), python backend + ONNX Runtime CPU",
    }


def write_report(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    lines = [
        "# Triton benchmark",
        "",
        f"Measured {result['date']} by `python -m tests.benchmarks.triton_bench` on {m['cpu']} ({m['cores']} cores,",
        f"no GPU); torch {m['torch']}, onnxruntime {m['onnxruntime']}, tritonserver {m['tritonserver']}.",
        "",
        f"## SAM 2 image encoder on Triton (hiera-tiny architecture, {result['image_size']}² input, seeded weights)",
        "",
        "| dynamic batching | clients | requests | throughput (img/s) | p50 (s) | p99 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["encoder"]:
        lines.append(
            f"| {'on' if r['dynamic_batching'] else 'off'} | {r['clients']} | {r['requests']} | "
            f"{r['throughput_img_s']:.3f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |"
        )
    lines += [
        "",
        "## One image end to end through detseg: embedded vs Triton (same models, interleaved requests, embedding cache off)",
        "",
        "| profile | requests each | embedded p50 (s) | Triton p50 (s) | embedded p99 (s) | Triton p99 (s) "
        "| Triton / embedded |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["end_to_end"]:
        lines.append(
            f"| {r['profile']} | {r['repeats']} | {r['embedded_p50_s']:.4f} | {r['triton_p50_s']:.4f} | "
            f"{r['embedded_p99_s']:.4f} | {r['triton_p99_s']:.4f} | {r['triton_over_embedded']:.2f} |"
        )
    lines += ["", result.get("notes", "")]
    (out / "TRITON.md").write_text("\n".join(lines).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--per-client", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--repeats", type=int, default=20, help="end-to-end requests per path")
    parser.add_argument("--profiles", default="demo,test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--notes", default="", help="free text appended to the report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="detseg-bench-") as tmp:
        root = Path(tmp)
        e2e = [bench_end_to_end(root, p, args.repeats) for p in args.profiles.split(",") if p]
        for r in e2e:
            print(json.dumps(r), flush=True)
        encoder = bench_encoder(root, args.image_size, args.per_client)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "image_size": args.image_size,
        "encoder": encoder,
        "end_to_end": e2e,
        "notes": args.notes,
    }
    write_report(args.out, result)
    print(f"wrote {args.out / 'TRITON.md'}")


if __name__ == "__main__":
    main()
