"""How detseg's cost grows with the work: image size, box prompts, concurrent clients (one run, not a test).

    python -m tests.benchmarks.scaling_bench [--out benchmarks] [--quick] [--device cpu|cuda] [--backend torch]

One in-process detseg server with pipeline_bench's models (YOLO11n at 640² and SAM 2.1 hiera-tiny at 1024²,
official architectures with seeded random weights; ``--models official`` for the cached official checkpoints),
end-to-end client latency through gRPC (generated stubs), every request with new bytes (no cache hits):

- image size: bus.jpg resized (aspect kept) to 0.3 / 1 / 4 / 12 megapixels, JPEG, with 10 fixed box prompts
  (regions only, so the detector does not run and the mask count is fixed): p50 and the server's stages;
- box prompts: 1 / 10 / 50 / 200 boxes on the 1 MP image (the 1 MP, 10-box point is shared with the above);
- concurrent clients: 1 / 4 / 16 clients, each on its own channel sending N requests (bus.jpg with new bytes,
  detector prompts, as pipeline_bench's throughput part): img/s, p50 and p99; then the same against
  `detseg serve --workers N` for each N of ``--workers`` above 1 (the workers axis; RSS summed over its processes);
- the corner of the first two: 12 MP with 200 boxes, one request (not with ``--quick`` or ``--no-corner``).

Also the process's peak RSS during each point (the server runs in this process; peak GPU memory with cuda).
``--quick``: one repeat, a smaller grid. Writes ``<out>/SCALING.md``, ``<out>/scaling.json``, ``<out>/scaling.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from PIL import Image

from service.config import Settings
from service.models import testing
from service.models.profiles import resolve_models
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.benchmarks.pipeline_bench import (
    THREADS,
    jpeg,
    machine,
    own_channels,
    photo,
    segment_request,
    server_total,
    stage_means,
    summary,
    timed_call,
)
from tests.triton_helpers import DetsegWorkers, start_detseg

MEGAPIXELS = (0.3, 1.0, 4.0, 12.0)
BOXES = (1, 10, 50, 200)
CLIENTS = (1, 4, 16)
QUICK_MEGAPIXELS = (0.3, 1.0, 12.0)
QUICK_BOXES = (1, 10, 50)
QUICK_CLIENTS = (1, 4)
SIZE_BOXES = 10  # box prompts of every image-size point
BOX_MEGAPIXELS = 1.0  # image of every box-count point
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
STAGES = ("decode_image", "detect", "encode", "decode_masks", "encode_masks")


def settings_for(root: Path, models: str, device: str, backend: str) -> Settings:
    """pipeline_bench's settings: seeded SAM 2.1 hiera-tiny at 1024² + test-yolo11n, or the official weights."""
    if models == "official":
        return Settings(models="official", cache_dir=Path("~/.cache/detseg").expanduser(), port=0,
                        threads=THREADS, offline=True, device=device, backend=backend, text_encoder="none")  # fmt: skip
    sam_path = root / "weights" / "sam2.1_hiera_tiny.pt"  # named as the official file: its architecture
    sam_path.parent.mkdir(parents=True)
    testing.write_segmenter(sam_path, seed=0, image_size=1024)
    return Settings(models="test", segmenter=str(sam_path), cache_dir=root / "cache", port=0, threads=THREADS,
                    offline=True, device=device, backend=backend, text_encoder="none")  # fmt: skip


class Fresh:
    """New bytes for every request (JPEG ignores trailing bytes): nothing is served from the embedding cache."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> bytes:
        with self._lock:
            self._n += 1
            return data + b"\0" * self._n


def resized_jpeg(rgb: np.ndarray, megapixels: float) -> tuple[bytes, int, int]:
    """``rgb`` resized to about ``megapixels`` (aspect kept), JPEG at pipeline_bench's quality; bytes, W, H."""
    h, w = rgb.shape[:2]
    scale = math.sqrt(megapixels * 1e6 / (w * h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return jpeg(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))), *size


def box_prompts(count: int, width: int, height: int, seed: int = 0) -> list[pb.RegionPrompt]:
    """``count`` boxes at the same relative places on any image size (the first n of one seeded draw): sides 5-40 %
    of the image's, inside it."""
    pool = Settings.max_region_prompts  # one draw of the most a request may carry, whatever the grid
    if count > pool:
        raise ValueError(f"{count} box prompts: a request takes at most {pool}")
    rng = np.random.default_rng(seed)
    sides = rng.uniform(0.05, 0.4, (pool, 2))
    corners = rng.uniform(0, 1, (pool, 2)) * (1 - sides)
    prompts = []
    for (x, y), (bw, bh) in zip(corners[:count], sides[:count], strict=True):
        box = pb.BoundingBox(x_min=x * width, y_min=y * height, x_max=(x + bw) * width, y_max=(y + bh) * height)
        prompts.append(pb.RegionPrompt(box=box))
    return prompts


def rss_mb(tree: int | None = None) -> float:
    """RSS of this process, or (``tree``) of that process and all its descendants, MB."""
    if tree is not None:
        import psutil

        root = psutil.Process(tree)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_memory(device: str, tree: int | None = None) -> Iterator[dict[str, float]]:
    """Peak RSS of this process (the server runs in it), or of the process ``tree`` (a `detseg serve --workers N`
    and its workers), sampled every 10 ms over the block, and its RSS before; peak torch GPU memory allocated too
    when ``device`` is cuda."""
    out = {"rss_before_mb": rss_mb(tree), "rss_peak_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while True:
            out["rss_peak_mb"] = max(out["rss_peak_mb"], rss_mb(tree))
            if stop.wait(0.01):
                return

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out["rss_peak_mb"] = max(out["rss_peak_mb"], rss_mb(tree))
        if cuda:
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def measure(stub: Any, make: Callable[[], pb.SegmentRequest], repeats: int, warmup: int, device: str) -> dict[str, Any]:
    """``warmup`` then ``repeats`` single-client requests: e2e latency summary, server total and stage medians,
    instances and response size of the last, peak memory over the measured ones."""
    for _ in range(warmup):
        timed_call(stub, make())
    latencies, responses = [], []
    with peak_memory(device) as memory:
        for _ in range(repeats):
            seconds, response = timed_call(stub, make())
            latencies.append(seconds)
            responses.append(response)
    return {
        **summary(latencies),
        "server_total_p50_s": statistics.median(server_total(r) for r in responses),
        "stages": stage_means(responses),
        "instances": len(responses[-1].instances),
        "response_mb": responses[-1].ByteSize() / 2**20,
        **memory,
    }


def concurrency(
    target: str, image: bytes, fresh: Fresh, clients: int, per_client: int, device: str, workers: Any = None
) -> dict[str, Any]:
    """``clients`` threads, each with its own channel (its own connection), sending ``per_client`` requests back
    to back. ``workers``: the `detseg serve --workers N` (DetsegWorkers) serving ``target``, None for the
    in-process server."""
    latencies: list[float] = []
    detections: list[int] = []

    def client(channel: grpc.Channel) -> None:
        stub = pb_grpc.SegmentationServiceStub(channel)
        for _ in range(per_client):
            seconds, response = timed_call(stub, segment_request(fresh(image)))
            latencies.append(seconds)
            detections.append(len(response.instances))

    tree = workers.proc.pid if workers is not None else None
    with (
        own_channels(target, clients, CHANNEL_OPTIONS) as channels,
        peak_memory(device, tree) as memory,
        concurrent.futures.ThreadPoolExecutor(clients) as pool,
    ):
        start = time.perf_counter()
        list(pool.map(client, channels))
        wall = time.perf_counter() - start
    requests = clients * per_client
    n = workers.workers if workers is not None else 1
    return {"workers": n, "clients": clients, "requests": requests, "wall_s": wall, "img_per_s": requests / wall,
            **summary(latencies), "instances_median": statistics.median(detections), **memory}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--models", default="bench", help="bench (seeded official architectures) | official")
    parser.add_argument("--device", default="cpu", help="torch device of the server (Settings.device)")
    parser.add_argument("--backend", default=Settings.backend, help="Settings.backend (default: the default, resolved)")
    parser.add_argument("--repeats", type=int, default=3, help="measured requests per point (1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per point (0 with --quick)")
    parser.add_argument("--per-client", type=int, default=3, help="requests each client sends (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, a smaller grid: for trying the script")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1, 2],
        help="worker counts of the concurrency axis (`detseg serve --workers N`; 1 = the in-process server)",
    )
    parser.add_argument(
        "--corner", action=argparse.BooleanOptionalAction, default=True,
        help="the 12 MP x 200 boxes request (never with --quick; over a minute on CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    from service.runners.factory import resolve_backend
    from service.startup import reexec_for_allocator

    # Under detseg's allocator, as `detseg serve` runs (the server is in this process).
    reexec_for_allocator(Settings.allocator, ["-m", "tests.benchmarks.scaling_bench", *sys.argv[1:]])
    args.backend = resolve_backend(Settings(backend=args.backend, device=args.device))
    repeats, warmup, per_client = (1, 0, 1) if args.quick else (args.repeats, args.warmup, args.per_client)
    megapixels, boxes, clients = (
        (QUICK_MEGAPIXELS, QUICK_BOXES, QUICK_CLIENTS) if args.quick else (MEGAPIXELS, BOXES, CLIENTS)
    )
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(args.device), "backend": args.backend,
        "quick": args.quick, "repeats": repeats, "warmup": warmup, "per_client": per_client,
    }  # fmt: skip
    bus_rgb = photo("bus.jpg")
    bus = jpeg(bus_rgb)
    fresh = Fresh()
    with tempfile.TemporaryDirectory(prefix="detseg-scaling-") as tmp:
        settings = settings_for(Path(tmp), args.models, args.device, args.backend)
        models = resolve_models(settings)
        result["models"] = {"detector": models.detector.name, "segmenter": f"{models.segmenter.name} "
                            f"({models.segmenter.architecture})", "kind": args.models}  # fmt: skip
        server = start_detseg(settings)
        channel = grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS)
        stub = pb_grpc.SegmentationServiceStub(channel)
        try:
            timed_call(stub, segment_request(fresh(bus)))  # first request: lazy initialisation
            images = {mp: resized_jpeg(bus_rgb, mp) for mp in sorted({*megapixels, BOX_MEGAPIXELS})}
            points: dict[tuple[float, int], dict[str, Any]] = {}

            def point(mp: float, n: int) -> dict[str, Any]:
                if (mp, n) not in points:
                    data, w, h = images[mp]
                    prompts = box_prompts(n, w, h)
                    points[mp, n] = {
                        "megapixels": w * h / 1e6, "width": w, "height": h, "jpeg_mb": len(data) / 2**20, "boxes": n,
                        **measure(stub, lambda: segment_request(fresh(data), regions=prompts), repeats, warmup,
                                  args.device),
                    }  # fmt: skip
                    print(json.dumps(points[mp, n]), flush=True)  # the whole row: a run stopped early keeps it
                return points[mp, n]

            result["image_size"] = [point(mp, SIZE_BOXES) for mp in megapixels]
            result["box_count"] = [point(BOX_MEGAPIXELS, n) for n in boxes]
            # The largest image with the most boxes: one request, no warm-up (over a minute on CPU).
            if args.corner and not args.quick:
                data, w, h = resized_jpeg(bus_rgb, max(MEGAPIXELS))
                prompts = box_prompts(max(BOXES), w, h)
                result["corner"] = {
                    "megapixels": w * h / 1e6, "width": w, "height": h, "jpeg_mb": len(data) / 2**20,
                    "boxes": max(BOXES),
                    **measure(stub, lambda: segment_request(fresh(data), regions=prompts), 1, 0, args.device),
                }  # fmt: skip
                print(json.dumps(result["corner"]), flush=True)
            if warmup:  # one micro-batch of detector prompts, unmeasured: the batched shapes' first run
                concurrency(server.target, bus, fresh, settings.batch_max_size, 1, args.device)
            else:
                timed_call(stub, segment_request(fresh(bus)))  # back to detector prompts at bus.jpg's size
            result["clients"] = []
            for c in clients:
                result["clients"].append(concurrency(server.target, bus, fresh, c, per_client, args.device))
                print(json.dumps(result["clients"][-1]), flush=True)
        finally:
            channel.close()
            server.stop()
        for n in (n for n in args.workers if n > 1):  # the workers axis: `detseg serve --workers N`
            workers = DetsegWorkers(settings, n, Path(tmp))
            try:
                concurrency(workers.target, bus, fresh, n * 2, 1, args.device, workers)  # each worker's first calls
                for c in clients:
                    result["clients"].append(
                        concurrency(workers.target, bus, fresh, c, per_client, args.device, workers)
                    )
                    print(json.dumps(result["clients"][-1]), flush=True)
            finally:
                workers.stop()
    result["wall_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=1))
    (args.out / "SCALING.md").write_text(report(result))
    plot(result, args.out / "scaling.png")
    print(f"wrote {args.out / 'SCALING.md'}, scaling.json, scaling.png in {result['wall_s']:.0f} s")


def header(r: dict[str, Any]) -> list[str]:
    """The machine and models, as pipeline_bench's RESULTS.md says them."""
    m = r["machine"]
    return [
        f"Measured {r['date']} with `python -m tests.benchmarks.scaling_bench{' --quick' if r['quick'] else ''}` on "
        f"{m['cpu']} ({m['cores']} cores, {m['gpu']}; torch device `{m['device']}`, backend `{r['backend']}`);",
        f"torch {m['torch']}, ultralytics {m['ultralytics']}, sam2 {m['sam2']}, onnxruntime {m['onnxruntime']}.",
        f"Models: {r['models']['detector']} (640²) + {r['models']['segmenter']} at 1024², "
        + (
            "seeded random weights (official architectures and FLOPs)."
            if r["models"]["kind"] == "bench"
            else "official weights."
        ),
    ]


def _stage_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen = {s for row in rows for s in row["stages"] if s != "total"}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def _point_table(rows: list[dict[str, Any]], first: str, key: Callable[[dict[str, Any]], str]) -> list[str]:
    stages = _stage_columns(rows)
    lines = [
        f"| {first} | p50 (s) | p99 (s) | server total (s) | " + " | ".join(stages) + " | masks | response (MB) | peak RSS (MB) |",
        "|---|---|---|---|" + "---|" * len(stages) + "---|---|---|",
    ]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row['stages'].get(s, float('nan')):.3f}" for s in stages)
        memory = f"{row['rss_peak_mb']:.0f}" + (f" (GPU {row['gpu_peak_mb']:.0f})" if "gpu_peak_mb" in row else "")
        lines.append(
            f"| {key(row)} | {row['p50_s']:.3f} | {row['p99_s']:.3f} | {row['server_total_p50_s']:.3f} | {cells} | "
            f"{row['instances']} | {row['response_mb']:.2f} | {memory} |"
        )
    return lines


def report(r: dict[str, Any]) -> str:
    rows = [
        "# detseg: cost as the work grows",
        "",
        *header(r),
        f"One in-process server; client latency end to end through gRPC, {r['repeats']} measured request(s) per "
        f"point after {r['warmup']} warm-up; new bytes every request (no cache hits). Stage columns: the server's "
        "per-stage medians (seconds). Peak RSS: this process (client and server) while the point's measured "
        "requests ran, sampled every 10 ms; the RSS before them is in scaling.json.",
        "",
        f"## Image size ({SIZE_BOXES} box prompts, no detector; bus.jpg resized, JPEG)",
        "",
        *_point_table(r["image_size"], "megapixels (W×H)", lambda p: f"{p['megapixels']:.2f} ({p['width']}×{p['height']})"),
        "",
        f"## Box prompts (bus.jpg at {BOX_MEGAPIXELS:g} MP, no detector)",
        "",
        *_point_table(r["box_count"], "boxes", lambda p: str(p["boxes"])),
        "",
        *(
            [
                f"## Both at once: {r['corner']['megapixels']:.1f} MP with {r['corner']['boxes']} boxes (one request)",
                "",
                *_point_table([r["corner"]], "megapixels, boxes", lambda p: f"{p['megapixels']:.1f}, {p['boxes']}"),
                "",
            ]
            if "corner" in r
            else []
        ),
        f"## Concurrent clients (bus.jpg with new bytes, detector prompts; each client its own channel, "
        f"{r['per_client']} request(s) back to back)",
        "",
        "| workers | clients | requests | img/s | p50 (s) | p99 (s) | detections (median) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for t in r["clients"]:
        memory = f"{t['rss_peak_mb']:.0f}" + (f" (GPU {t['gpu_peak_mb']:.0f})" if "gpu_peak_mb" in t else "")
        rows.append(
            f"| {t.get('workers', 1)} | {t['clients']} | {t['requests']} | {t['img_per_s']:.3f} | {t['p50_s']:.3f} | {t['p99_s']:.3f} | "
            f"{t['instances_median']:g} | {memory} |"
        )
    rows += ["", f"Whole run: {r['wall_s']:.0f} s. Figure: `scaling.png`."]
    return "\n".join(rows) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, rows, x_key, xlabel, title in (
        (a, r["image_size"], "megapixels", "image size (megapixels)", f"Image size ({SIZE_BOXES} box prompts)"),
        (b, r["box_count"], "boxes", "box prompts", f"Box prompts ({BOX_MEGAPIXELS:g} MP image)"),
    ):
        x = [p[x_key] for p in rows]
        ax.plot(x, [p["p50_s"] for p in rows], "o-", color="black", lw=2, label="end to end p50")
        for xi, p in zip(x, rows, strict=True):  # memory the point added: the decoder holds every box's activations
            grew = (p["rss_peak_mb"] - p["rss_before_mb"]) / 1024
            ax.annotate(f"RSS +{grew:.1f} GB", (xi, p["p50_s"]), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=7, color="dimgray")  # fmt: skip
        if x_key == "boxes" and "corner" in r:
            corner = r["corner"]
            ax.plot([corner["boxes"]], [corner["p50_s"]], "*", color="black", ms=11, mfc="white",
                    label=f"{corner['megapixels']:.0f} MP, end to end")  # fmt: skip
        for stage in _stage_columns(rows):
            y = [p["stages"].get(stage, float("nan")) for p in rows]
            if max(y) >= 1e-3:  # below a millisecond everywhere: not worth a line on a log axis
                ax.plot(x, y, ".--", label=stage)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(x=0.1)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 2.5)  # room for the RSS labels above the top line
        ax.set_xticks(x, [f"{v:g}" if x_key == "boxes" else f"{v:.1f}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    rows = [t for t in r["clients"] if t.get("workers", 1) == 1]
    x = [t["clients"] for t in rows]
    c.plot(x, [t["img_per_s"] for t in rows], "s-", color="tab:blue", lw=2, label="img/s")
    for n in sorted({t.get("workers", 1) for t in r["clients"]} - {1}):
        more = [t for t in r["clients"] if t.get("workers", 1) == n]
        c.plot([t["clients"] for t in more], [t["img_per_s"] for t in more], "s-", lw=2, label=f"img/s, {n} workers")
    c.set_xscale("log", base=2)
    c.set_xticks(x, [str(v) for v in x])
    c.minorticks_off()
    c.set_xlabel("concurrent clients")
    c.set_ylabel("throughput (img/s)", color="tab:blue")
    c.set_ylim(0, max(t["img_per_s"] for t in r["clients"]) * 1.25)
    c.grid(True, alpha=0.3)
    lat = c.twinx()
    lat.plot(x, [t["p50_s"] for t in rows], "o--", color="tab:red", label="p50 latency")
    lat.plot(x, [t["p99_s"] for t in rows], "^:", color="tab:red", label="p99 latency")
    lat.set_ylabel("latency (s)", color="tab:red")
    lat.set_ylim(0, max(t["p99_s"] for t in rows) * 1.15)
    handles = c.get_legend_handles_labels()[0] + lat.get_legend_handles_labels()[0]
    c.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    c.set_title("Concurrent clients (detector prompts, bus.jpg)")
    m = r["machine"]
    fig.suptitle(
        f"detseg scaling — {r['models']['detector']} + {r['models']['segmenter'].split(' ')[0]}, backend "
        f"{r['backend']}, {m['device']} ({m['cores']} cores, {m['gpu']}), {r['date']}"
        + (" [--quick]" if r["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
