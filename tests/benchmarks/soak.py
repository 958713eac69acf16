"""Soak test (not part of `make test`): a real `detseg serve` process under a fixed load for a fixed time.

    python -m tests.benchmarks.soak --minutes 10 [--models demo] [--fraction 0.7] [--out benchmarks/SOAK.md]

1. Capacity: closed loop, ``--clients`` concurrent clients sending requests back to back for ``--probe`` seconds;
   capacity = completed requests per second.
2. Soak: open loop at ``--fraction`` of capacity (Poisson arrivals, each request on its own thread from a pool),
   for ``--minutes``. Requests cycle through 64 shapes-world scenes with the demo profile's class names; the
   server runs with its embedding cache off (``DETSEG_CACHE_MAX_BYTES=0``), so every request is a full pass.
3. Report: requests sent, the count of each status (their sum must equal the sent count: nothing lost), latency
   p50 / p99 / max of the OK ones, and the server's RSS at the start and end of the soak and its drift per minute
   (from /proc), plus the achieved rate. Markdown to ``--out`` and JSON beside it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.world import render_scene
from tests.helpers import encode

CLASSES = ["circle", "square", "triangle", "star", "hexagon"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Images:
    """Pre-encoded scenes, cycled (``count`` distinct ones)."""

    def __init__(self, count: int) -> None:
        self.data = [encode(render_scene(50_000_000 + i).image) for i in range(count)]
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> bytes:
        with self._lock:
            self._next += 1
            return self.data[self._next % len(self.data)]


def call(stub: pb_grpc.SegmentationServiceStub, image: bytes, timeout: float) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image), classes=CLASSES), timeout=timeout)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    return code, time.perf_counter() - start


def capacity(stub: pb_grpc.SegmentationServiceStub, images: Images, clients: int, seconds: float) -> float:
    done = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            code, _ = call(stub, images.next(), 60)
            if code == "OK":
                with lock:
                    done += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done / (time.monotonic() - start)


def soak(stub, images: Images, rate: float, seconds: float, timeout: float, pid: int) -> dict:
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    rng = random.Random(0)
    sent = 0
    rss = [(0.0, rss_mb(pid))]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        futures = []
        next_at = start
        last_rss = start
        while (now := time.monotonic()) < start + seconds:
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            next_at += rng.expovariate(rate)
            futures.append(pool.submit(call, stub, images.next(), timeout))
            sent += 1
            if now - last_rss >= 10:
                rss.append((now - start, rss_mb(pid)))
                last_rss = now
        for f in concurrent.futures.as_completed(futures):
            code, seconds_taken = f.result()
            with lock:
                statuses[code] += 1
                if code == "OK":
                    latencies.append(seconds_taken)
    elapsed = time.monotonic() - start
    rss.append((elapsed, rss_mb(pid)))
    ok = np.array(latencies) if latencies else np.array([np.nan])
    tail = [v for t, v in rss if t >= elapsed / 2]  # drift over the second half (after warm-up growth)
    return {
        "sent": sent, "statuses": dict(statuses), "sum_statuses": sum(statuses.values()),
        "achieved_rate": sent / elapsed, "seconds": elapsed,
        "p50_s": float(np.percentile(ok, 50)), "p99_s": float(np.percentile(ok, 99)), "max_s": float(ok.max()),
        "rss_start_mb": rss[0][1], "rss_end_mb": rss[-1][1],
        "rss_drift_mb_per_min_second_half": (tail[-1] - tail[0]) / max(1e-9, elapsed / 2 / 60),
        "rss_samples": rss,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--models", default="demo")
    parser.add_argument("--fraction", type=float, default=0.7, help="share of measured capacity to offer")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients for the capacity probe")
    parser.add_argument("--probe", type=float, default=30.0, help="capacity probe seconds")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/SOAK.md"))
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "DETSEG_OFFLINE": "1", "DETSEG_CACHE_MAX_BYTES": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", args.models, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=300)
            stub = pb_grpc.SegmentationServiceStub(channel)
            while True:  # until the models are loaded
                try:
                    stub.ListModels(pb.ListModelsRequest(), timeout=10)
                    break
                except grpc.RpcError:
                    time.sleep(1)
            images = Images(64)
            cap = capacity(stub, images, args.clients, args.probe)
            result = soak(stub, images, cap * args.fraction, args.minutes * 60, args.timeout, server.pid)
    finally:
        server.terminate()
        server.wait(60)
    result.update(capacity_rps=cap, fraction=args.fraction, models=args.models, clients=args.clients)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Soak test", "",
        f"`python -m tests.benchmarks.soak --minutes {args.minutes:g} --models {args.models}` on this machine "
        f"({os.cpu_count()} CPU cores, embedding cache off): capacity {cap:.2f} requests/s (closed loop, {args.clients} clients), then "
        f"{args.fraction:.0%} of it open loop (Poisson arrivals) for {result['seconds'] / 60:.1f} min.", "",
        "| figure | value |", "|---|---|",
        f"| requests sent | {result['sent']} |",
        f"| statuses | {', '.join(f'{k} {v}' for k, v in sorted(result['statuses'].items()))} (sum {result['sum_statuses']}) |",
        f"| offered / achieved rate | {cap * args.fraction:.2f} / {result['achieved_rate']:.2f} requests/s |",
        f"| latency of OK requests p50 / p99 / max | {result['p50_s']:.3f} / {result['p99_s']:.3f} / {result['max_s']:.3f} s |",
        f"| server RSS start / end | {result['rss_start_mb']:.0f} / {result['rss_end_mb']:.0f} MB |",
        f"| RSS drift, second half | {result['rss_drift_mb_per_min_second_half']:+.2f} MB/min |",
    ]  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
