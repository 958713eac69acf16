"""Python's GIL switch interval and a server's concurrency (issue 22), in one run (not a test).

    python -m tests.benchmarks.gil_bench [--out benchmarks] [--device cpu] [--backend torch] [--models test]
                                         [--intervals 5,0.5] [--rounds 2]

A thread that runs torch ops releases the GIL at every op and must take it back before the next; while another
thread runs Python code, it gets it back only when that thread is made to drop it, after the switch interval
(Python's default 5 ms). A server's runner thread runs hundreds of ops per forward pass (on a GPU, each is a kernel
launch of microseconds), and under concurrent requests other threads run Python (the mask pool, the event loop,
gRPC), so each op may wait up to an interval: the convoy effect. ``gil_switch_interval_ms`` (Settings) sets it.

1. **Micro**: 500 small-matrix steps (2,000 torch ops) on ``--device``, alone and beside two threads running pure
   Python, at each interval of ``--intervals`` (and 5, Python's default).
2. **Server**: `detseg serve` (``--backend``, ``--device``; ``--models test``: the test profile, ``bench``:
   pipeline_bench's seeded SAM 2.1 hiera-tiny at 1024² + test-yolo11n) started once per interval and round
   (alternating), bus.jpg with new bytes per request from 1, 4 and 8 clients, each on its own channel.

Writes ``<out>/GIL.md`` and ``<out>/gil.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from service.config import Settings
from tests.benchmarks.pipeline_bench import jpeg, photo, throughput, warm_batches
from tests.benchmarks.scaling_bench import settings_for
from tests.triton_helpers import DetsegWorkers

CLIENTS = ((1, 4), (4, 12), (8, 16))  # (clients, requests)


def micro(device: str, interval_ms: float) -> dict[str, float]:
    """Milliseconds per 500-step loop, alone and beside two threads running Python, at ``interval_ms``."""
    x = torch.randn(64, 64, device=device)

    def forward() -> None:
        y = x
        for _ in range(500):
            y = torch.tanh(y @ x) * 0.5 + y * 0.1
        if device != "cpu":
            torch.cuda.synchronize()

    def timed() -> float:
        forward()
        start = time.perf_counter()
        for _ in range(3):
            forward()
        return (time.perf_counter() - start) / 3 * 1000

    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_ms / 1000)
    try:
        alone = timed()
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                sum(range(200))

        threads = [threading.Thread(target=busy) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            beside = timed()
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(previous)
    return {"interval_ms": interval_ms, "alone_ms": alone, "beside_python_ms": beside}


def server_rows(settings: Settings, interval_ms: float, folder: Path, image: bytes, sent: int) -> list[dict[str, Any]]:
    """Throughput of one `detseg serve` process at ``interval_ms``, after every micro-batch size is warmed."""
    served = DetsegWorkers(settings.replace(gil_switch_interval_ms=interval_ms), 1, folder)
    try:
        warm_batches(served.target, image + b"\0" * (70_000 + sent), settings.batch_max_size)
        rows = []
        for clients, count in CLIENTS:
            images = [image + b"\0" * (sent + k) for k in range(count)]
            sent += count
            row = throughput(served.target, images, clients)
            rows.append({"interval_ms": interval_ms, **row})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        served.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--models", choices=("test", "bench"), default="test")
    parser.add_argument("--intervals", default="5,0.5", help="switch intervals to compare, milliseconds")
    parser.add_argument("--rounds", type=int, default=2, help="server starts per interval, alternating")
    args = parser.parse_args()
    intervals = [float(v) for v in args.intervals.split(",")]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "device": args.device,
        "backend": args.backend,
        "models": args.models,
    }
    result["micro"] = [micro(args.device, ms) for ms in dict.fromkeys([5.0, *intervals, 0.1])]
    for row in result["micro"]:
        print(json.dumps(row), flush=True)
    image = jpeg(photo("bus.jpg"))
    with tempfile.TemporaryDirectory(prefix="detseg-gil-") as tmp:
        root = Path(tmp)
        if args.models == "bench":
            settings = settings_for(root, "test", args.device, args.backend)
        else:
            settings = Settings(models="test", cache_dir=root / "cache", port=0, threads=2, device=args.device,
                                backend=args.backend, text_encoder="none")  # fmt: skip
        settings = settings.replace(allocator="system")  # no re-exec: the same process the interval is set in
        rows: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            for ms in intervals if round_ % 2 == 0 else intervals[::-1]:
                rows += [{"round": round_, **r} for r in server_rows(settings, ms, root, image, 1000 * len(rows))]
    result["server"] = rows
    result["summary"] = {
        f"{ms:g} ms, {clients} clients": statistics.mean(
            r["img_per_s"] for r in rows if r["interval_ms"] == ms and r["clients"] == clients
        )
        for ms in intervals
        for clients, _ in CLIENTS
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gil.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "GIL.md").write_text(report(result))


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# The GIL switch interval and concurrency",
        "",
        f"Measured {r['date']} with `python -m tests.benchmarks.gil_bench` on {m['cpu']} ({m['cores']} cores"
        f"{', ' + m['gpu'] if m['gpu'] else ''}); Python {m['python']}, torch {m['torch']}; device `{r['device']}`, "
        f"backend `{r['backend']}`, models `{r['models']}`.",
        "",
        "## Micro: 2,000 small torch ops on one thread, alone and beside two threads running Python",
        "",
        "| switch interval (ms) | alone (ms) | beside Python (ms) | slowdown |",
        "|---|---|---|---|",
    ]
    for row in r["micro"]:
        lines.append(
            f"| {row['interval_ms']:g} | {row['alone_ms']:.1f} | {row['beside_python_ms']:.1f} | "
            f"{row['beside_python_ms'] / row['alone_ms']:.1f}× |"
        )
    lines += [
        "",
        "## Server: throughput of one `detseg serve` process (bus.jpg, new bytes per request, a channel per client)",
        "",
        "Each interval's server started once per round, alternating; every micro-batch size warmed first.",
        "",
        "| switch interval (ms) | round | clients | requests | img/s | p50 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["server"]:
        lines.append(
            f"| {row['interval_ms']:g} | {row['round']} | {row['clients']} | {row['requests']} | "
            f"{row['img_per_s']:.3f} | {row['p50_s']:.3f} |"
        )
    lines += ["", "Mean img/s over the rounds:", ""]
    lines += [f"- {name}: {value:.3f}" for name, value in r["summary"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
