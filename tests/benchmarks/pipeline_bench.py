"""detseg vs the naive pipeline a user would write, same weights and images, one run (not a test).

    python -m tests.benchmarks.pipeline_bench [--out benchmarks] [--quick]

Models: the official architectures with seeded random weights (no official weights can be downloaded here;
FLOPs are the same): YOLO11n at 640² (6 classes, BatchNorm calibrated so it detects) and SAM 2.1 hiera-tiny
at 1024². With ``--models official`` the cached official checkpoints are used instead.

- naive baseline: ``ultralytics.YOLO.predict`` then ``SAM2ImagePredictor.set_image`` + ``predict(box=...)``
  with all boxes, sequential, per image (torch threads restored after each predict, which ultralytics
  lowers: the baseline gets its best case);
- detseg embedded (torch, the default; and ONNX Runtime in-process) and detseg → Triton (python backend +
  ONNX Runtime), through gRPC, single-client latency;
- throughput at 1 / 4 / 8 concurrent clients (distinct images, so no cache hits), also against
  `detseg serve --workers N` for each N of ``--workers`` (the embedded backend);
- re-prompt on a cached handle (one region: the box and a new click, as an annotator's next click; until
  2026-12 it was the box and the click as two regions, two decoder calls) vs a full request; decoder time for 1 / 10 / 50 boxes in one call vs 50
  single-box calls; per-stage timings and gRPC + serialisation overhead (client latency − server total);
- steady-state RSS of a ``detseg serve`` process over 500 requests (demo profile, 256² SAM, for speed).

Writes ``<out>/RESULTS.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from PIL import Image

from service.config import Settings
from service.models import testing, triton_repo
from service.models.cpu import cpu_has_int8_dot_products, cpu_has_native_bf16
from service.models.loading import load_detector_module
from service.models.profiles import resolve_models
from service.models.tensors import PromptBatch
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.dataset import scenes
from tests.triton_helpers import DetsegWorkers, free_ports, start_detseg, start_triton

THREADS = os.cpu_count() or 2
SCORE = 0.25
# detseg's default in-process backend (Settings.backend, resolved for the device), torch and ONNX Runtime in-process,
# and -> Triton.
BACKENDS = ("embedded", "torch", "onnx", "triton")
CACHE_BYTES_RSS = 32 << 20


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": statistics.median(values),
        "p99_s": p(values, 99),
        "mean_s": float(np.mean(values)),
    }


def photo(name: str) -> np.ndarray:
    from ultralytics.utils import ASSETS

    return np.asarray(Image.open(Path(ASSETS) / name).convert("RGB"))


def jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Naive:
    """What a user writes: YOLO.predict, then SAM2ImagePredictor per image."""

    def __init__(self, settings: Settings) -> None:
        self.device = settings.device
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
        from ultralytics import YOLO

        models = resolve_models(settings)
        self.yolo = YOLO(str(models.detector.path))
        seg = models.segmenter
        sam = build_sam2(seg.architecture, str(seg.path), device=self.device, hydra_overrides_extra=list(seg.overrides))
        self.predictor = SAM2ImagePredictor(sam)
        size = int(sam.image_size)
        self.predictor._bb_feat_sizes = [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]
        self.imgsz = load_detector_module(models.detector.path).input_size()

    def __call__(self, rgb: np.ndarray, rect: bool = True) -> int:
        """``rect`` False: the square letterbox detseg uses, so both segment the same boxes (with seeded random
        weights the two letterboxes detect different objects; trained weights barely differ)."""
        result = self.yolo.predict(
            rgb[..., ::-1], imgsz=self.imgsz, conf=SCORE, verbose=False, device=self.device, rect=rect
        )[0]
        torch.set_num_threads(THREADS)  # ultralytics lowered it for the whole process
        boxes = result.boxes.xyxy.cpu().numpy()
        with torch.inference_mode():
            self.predictor.set_image(rgb)
            if len(boxes):
                self.predictor.predict(box=boxes, multimask_output=False)
        return len(boxes)


class NaiveProcess:
    """The naive pipeline in a process of its own, under a chosen malloc: a user's script runs under glibc's
    defaults ("system"), while `detseg serve` tunes its allocator (service.startup.ALLOCATORS). Timed inside the
    worker, so the pipe costs the naive pipeline nothing."""

    def __init__(self, settings: Settings, allocator: str) -> None:
        import multiprocessing

        from service.startup import ALLOCATORS

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: glibc reads MALLOC_* at its start
        self._conn, child = ctx.Pipe()
        saved = dict(os.environ)
        for name in [n for n in os.environ if n.startswith("MALLOC_")]:
            del os.environ[name]
        os.environ.update(ALLOCATORS[allocator])
        try:
            self._proc = ctx.Process(target=_naive_worker, args=(settings, child), daemon=True)
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._conn.recv()  # loaded

    def __call__(self, rgb: np.ndarray, rect: bool = True) -> tuple[float, int]:
        """→ (seconds, boxes) of one naive run (see ``Naive.__call__``)."""
        self._conn.send((rgb, rect))
        return self._conn.recv()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(30)


def _naive_worker(settings: Settings, conn: Any) -> None:
    torch.set_num_threads(THREADS)
    naive = Naive(settings)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        rgb, rect = message
        start = time.perf_counter()
        boxes = naive(rgb, rect)
        conn.send((time.perf_counter() - start, boxes))


def precision_gate(fast: Any, exact: Any) -> dict[str, Any]:
    """Final masks of the served precision (``fast``) vs fp32 of the same weights (``exact``), through gRPC, on the
    two real photos: each photo's detections plus a 5 x 5 grid of boxes a third of the image wide, raw SAM masks."""
    from pycocotools import mask as mask_utils

    ious: list[float] = []
    for name in ("bus.jpg", "zidane.jpg"):
        rgb = photo(name)
        data = jpeg(rgb)
        h, w = rgb.shape[:2]
        detected = exact.Segment(segment_request(data), timeout=600)
        boxes = [i.box for i in detected.instances]
        for gy in range(5):
            for gx in range(5):
                x0, y0 = gx * w / 7.5, gy * h / 7.5
                boxes.append(pb.BoundingBox(x_min=x0, y_min=y0, x_max=x0 + w / 3, y_max=y0 + h / 3))
        raw = pb.SegmentOptions(refinement=pb.MaskRefinement(disabled=True))
        request = pb.SegmentRequest(image=pb.Image(encoded=data), regions=[pb.RegionPrompt(box=b) for b in boxes],
                                    options=raw)  # fmt: skip
        a, b = fast.Segment(request, timeout=600), exact.Segment(request, timeout=600)
        for x, y in zip(a.instances, b.instances, strict=True):
            rles = [{"size": list(m.mask.coco_rle.size), "counts": m.mask.coco_rle.counts} for m in (x, y)]
            ious.append(float(mask_utils.iou([rles[0]], [rles[1]], [0])[0, 0]))
    return {"prompts": len(ious), "min_iou": min(ious), "mean_iou": float(np.mean(ious)),
            "precision": [m.precision for m in fast.ListModels(pb.ListModelsRequest(), timeout=60).models]}  # fmt: skip


def on_own_thread(fn: Callable[[], Any]) -> None:
    """``fn()`` on a thread that ends with it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(fn).result()


def segment_request(data: bytes, **kwargs: Any) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=pb.Image(encoded=data), options=pb.SegmentOptions(score_threshold=SCORE), **kwargs)


def timed_call(stub: Any, request: pb.SegmentRequest) -> tuple[float, pb.SegmentResponse]:
    start = time.perf_counter()
    response = stub.Segment(request, timeout=600)
    return time.perf_counter() - start, response


def server_total(response: pb.SegmentResponse) -> float:
    for t in response.provenance.timings:
        if t.stage == "total":
            return t.duration.seconds + t.duration.nanos / 1e9
    return float("nan")


def stage_means(responses: list[pb.SegmentResponse]) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for r in responses:
        for t in r.provenance.timings:
            stages.setdefault(t.stage, []).append(t.duration.seconds + t.duration.nanos / 1e9)
    return {k: float(np.median(v)) for k, v in stages.items()}


@contextlib.contextmanager
def own_channels(target: str, count: int, options: list[tuple[str, Any]]) -> Iterator[list[grpc.Channel]]:
    """``count`` ready channels to ``target``, each its own connection (a local subchannel pool): `detseg serve
    --workers N` spreads connections, not calls, over its workers. Closed on exit."""
    channels = [grpc.insecure_channel(target, options=[*options, ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(count)]  # fmt: skip
    try:
        for c in channels:
            grpc.channel_ready_future(c).result(timeout=60)
        yield channels
    finally:
        for c in channels:
            c.close()


def throughput(target: str, images: list[bytes], clients: int) -> dict[str, float]:
    """``clients`` threads sharing out ``images``, each on its own channel (``own_channels``; until 2026-12-04 every
    client shared one channel, so the workers rows measured one worker)."""
    latencies: list[float] = []
    with own_channels(target, clients, [("grpc.max_receive_message_length", 64 << 20)]) as channels:
        stubs = [pb_grpc.SegmentationServiceStub(c) for c in channels]

        def one(client: int) -> None:
            for data in images[client::clients]:
                latencies.append(timed_call(stubs[client], segment_request(data))[0])

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(images), "img_per_s": len(images) / wall, **summary(latencies)}


def warm_batches(target: str, image: bytes, max_batch: int) -> None:
    """Every micro-batch size the server forms, run once before anything is measured (a first-seen batch shape
    costs kernel selection on a GPU: GPU-H200.md's rows were short enough for it to show): k + 1 requests at once on
    an idle server run as 1, then k together (``batch_max_wait_ms`` 0: the first goes alone)."""
    for k in range(1, max_batch + 1):
        throughput(target, [image + b"\0" * (50_000 + 100 * k + i) for i in range(k + 1)], k + 1)


def batch_counts(server: Any) -> dict[str, tuple[int, int]]:
    """An in-process server's micro-batchers (none on Triton): name → (passes, requests) so far."""
    runner = server.served.servicer.pipeline.runner
    batchers = [getattr(runner, name, None) for name in ("detect_batcher", "encode_batcher")]
    return {b.name: (b.batches, b.items) for b in batchers if b is not None}


def requests_per_pass(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Mean requests per forward pass between two ``batch_counts``, per batcher."""
    return {
        f"{name}_requests_per_pass": (after[name][1] - before[name][1]) / max(1, after[name][0] - before[name][0])
        for name in after
    }


def distinct_images(count: int, start: int) -> list[bytes]:
    """Held-out shapes scenes, re-encoded as JPEG: distinct bytes, so nothing is served from the cache."""
    return [jpeg(s.image) for s in scenes("test", count, start=start)]


def decoder_costs(settings: Settings) -> dict[str, float]:
    """Runner-level decoder time: one call with N boxes, and 50 one-box calls."""
    from service.runners.factory import load_runner

    runner = load_runner(settings)
    s = runner.segmenter.image_size
    rng = np.random.default_rng(0)

    async def run() -> dict[str, float]:
        feats = await runner.encode(rng.standard_normal((1, 3, s, s), dtype=np.float32))

        def boxes(n: int) -> PromptBatch:
            xy0 = rng.uniform(0, s * 0.6, (n, 1, 2))
            coords = np.concatenate([xy0, xy0 + rng.uniform(20, s * 0.4, (n, 1, 2))], axis=1).astype(np.float32)
            return PromptBatch(coords, np.tile(np.array([[2, 3]], np.int32), (n, 1)))

        out: dict[str, float] = {}
        for n in (1, 10, 50):
            batch = boxes(n)
            await runner.decode(feats, batch)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                await runner.decode(feats, batch)
                times.append(time.perf_counter() - t)
            out[f"decode_{n}_boxes_one_call_s"] = statistics.median(times)
        singles = [boxes(1) for _ in range(50)]
        t = time.perf_counter()
        for b in singles:
            await runner.decode(feats, b)
        out["decode_50_single_box_calls_s"] = time.perf_counter() - t
        await runner.close()
        return out

    return asyncio.run(run())


def rss_over_requests(cache_dir: Path, requests: int) -> dict[str, float]:
    """RSS of a `detseg serve` process (demo profile) after warm-up and after ``requests`` more."""
    (port,) = free_ports(1)
    # A 32 MiB embedding cache fills during the warm-up, so growth after it is not the cache reaching its bound.
    env = {**os.environ, "DETSEG_CACHE_DIR": str(cache_dir), "DETSEG_THREADS": str(THREADS),
           "DETSEG_CACHE_MAX_BYTES": str(CACHE_BYTES_RSS)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", "demo", "--port", str(port), "--offline"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def rss_mb() -> float:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            from tests.conftest import wait_serving

            grpc.channel_ready_future(channel).result(timeout=300)
            wait_serving(channel, 300)
            stub = pb_grpc.SegmentationServiceStub(channel)
            images = distinct_images(50, start=1000)
            for data in images:  # 50 distinct scenes (~1.3 MB cached each): the cache is at its bound
                stub.Segment(segment_request(data), timeout=300)
            after_warmup = rss_mb()
            samples = []
            for k in range(requests):  # distinct bytes each time: the cache fills to its bound, then evicts
                data = images[k % len(images)] + b"\0" * (1 + k // len(images))  # JPEG ignores trailing bytes
                stub.Segment(segment_request(data), timeout=300)
                if k % 50 == 49:
                    samples.append(rss_mb())
    finally:
        proc.terminate()
        proc.wait(60)
    return {"after_warmup_mb": after_warmup, "after_requests_mb": samples[-1], "growth_mb": samples[-1] - after_warmup,
            "requests": requests, "samples_mb": samples}  # fmt: skip


def machine(device: str) -> dict[str, str]:
    import onnxruntime
    import sam2  # noqa: F401
    import ultralytics

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "no GPU"
    dots = [name for name, has in (("int8", cpu_has_int8_dot_products()), ("bf16", cpu_has_native_bf16())) if has]
    return {"cpu": cpu, "cores": str(os.cpu_count()), "gpu": gpu, "device": device,
            "dot_products": f"{' + '.join(dots)} dot products" if dots else "no int8 or bf16 dot products",
            "python": platform.python_version(), "torch": torch.__version__,
            "ultralytics": ultralytics.__version__, "onnxruntime": onnxruntime.__version__, "sam2": "1.1.0",
            "tritonserver": "2.51 (nvidia-pytriton 0.7.0), python backend + ONNX Runtime CPU"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--models", default="bench", help="bench (seeded official architectures) | official")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-requests", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for trying the script")
    parser.add_argument("--device", default="cpu", help="torch device of the naive pipeline and detseg embedded")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="detseg backends to run, of " + ",".join(BACKENDS)
    )
    parser.add_argument("--embedded-backend", default=Settings.backend, help="backend of detseg embedded")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[2],
        help="worker counts (`detseg serve --workers N`) whose throughput is measured too, e.g. 2,4 ('' = none)",
    )
    parser.add_argument(
        "--allocator", default=Settings.allocator, help="this process's malloc, as `detseg serve` sets its own"
    )
    args = parser.parse_args()
    from service.startup import reexec_for_allocator

    reexec_for_allocator(args.allocator, ["-m", "tests.benchmarks.pipeline_bench", *sys.argv[1:]])
    from service.runners.factory import resolve_backend

    args.embedded_backend = resolve_backend(Settings(backend=args.embedded_backend, device=args.device))
    LABELS["embedded"] = f"embedded ({args.embedded_backend})"
    # embedded always runs: the re-prompt and per-stage sections are measured on it.
    backends = [b for b in BACKENDS if b == "embedded" or b in args.backends.split(",")]
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(THREADS)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args.device), "backends": backends,
                              "embedded_backend": args.embedded_backend, "allocator": args.allocator}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="detseg-bench-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        if args.models == "official":
            settings = Settings(models="official", cache_dir=Path("~/.cache/detseg").expanduser(), port=0,
                                threads=THREADS, offline=True, device=args.device, text_encoder="none")  # fmt: skip
        else:
            sam_path = root / "weights" / "sam2.1_hiera_tiny.pt"  # named as the official file: its architecture
            sam_path.parent.mkdir(parents=True)
            # On a thread that ends: torch work on a thread that lives on keeps a team of OpenMP threads, and a second
            # team slows the servers' decoder (service.runners.local.torch_thread); `detseg serve` has none.
            on_own_thread(lambda: testing.write_segmenter(sam_path, seed=0, image_size=1024))
            settings = Settings(models="test", segmenter=str(sam_path), cache_dir=cache, port=0, threads=THREADS,
                                offline=True, device=args.device, text_encoder="none")  # fmt: skip
        models = resolve_models(settings)
        result["models"] = {"detector": models.detector.name, "segmenter": f"{models.segmenter.name} "
                            f"({models.segmenter.architecture})", "kind": args.models}  # fmt: skip
        bus = jpeg(photo("bus.jpg"))
        bus_rgb = np.asarray(Image.open(__import__("io").BytesIO(bus)).convert("RGB"))

        naive = NaiveProcess(settings, "system")
        naive(bus_rgb)  # warm-up
        naive(bus_rgb, rect=False)
        naive_tuned = NaiveProcess(settings, "tuned") if args.device == "cpu" else None
        if naive_tuned is not None:
            naive_tuned(bus_rgb, rect=False)
        triton = None
        if "triton" in backends:
            repo = root / "repo"
            triton_repo.write_repository(models, settings, repo)
            triton = start_triton(repo, root / "triton")
        servers = {
            name: start_detseg(
                settings.replace(
                    backend=args.embedded_backend if name == "embedded" else name,
                    triton_url=triton.url if triton else "",
                )
            )
            for name in backends
        }
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        channels = [grpc.insecure_channel(s.target, options=opts) for s in servers.values()]
        stubs = {name: pb_grpc.SegmentationServiceStub(c) for name, c in zip(servers, channels, strict=True)}
        try:
            # 1. Single image, single client, interleaved; each detseg request gets new bytes (no cache hit).
            lat: dict[str, list[float]] = {"naive": [], "naive_defaults": [], "naive_tuned_malloc": [],
                                           **{n: [] for n in stubs}}  # fmt: skip
            overhead: dict[str, list[float]] = {n: [] for n in stubs}
            responses: dict[str, list[pb.SegmentResponse]] = {n: [] for n in stubs}
            for k in range(repeats + 1):
                naive_defaults_s, default_boxes = naive(bus_rgb)
                naive_s, boxes = naive(bus_rgb, rect=False)
                naive_tuned_s = naive_tuned(bus_rgb, rect=False)[0] if naive_tuned is not None else float("nan")
                for name, stub in stubs.items():
                    seconds, response = timed_call(stub, segment_request(bus + b"\0" * (k + 1 + 100 * len(lat[name]))))
                    if k:
                        lat[name].append(seconds)
                        overhead[name].append(seconds - server_total(response))
                        responses[name].append(response)
                if k:
                    lat["naive"].append(naive_s)
                    lat["naive_defaults"].append(naive_defaults_s)
                    lat["naive_tuned_malloc"].append(naive_tuned_s)
            result["single_image"] = {name: summary(v) for name, v in lat.items()}
            result["single_image"]["boxes"] = boxes
            result["single_image"]["boxes_naive_defaults"] = default_boxes
            result["single_image"]["instances"] = len(responses["embedded"][-1].instances)
            base = result["single_image"]["naive"]["p50_s"]
            result["ratios"] = {f"{n}_latency_vs_naive": result["single_image"][n]["p50_s"] / base for n in stubs}
            result["stages"] = {n: stage_means(r) for n, r in responses.items()}
            result["grpc_overhead"] = {
                n: {"p50_s": statistics.median(v), "share_of_e2e": statistics.median(v) / result["single_image"][n]["p50_s"]}
                for n, v in overhead.items()
            }  # fmt: skip
            print(json.dumps(result["single_image"]), flush=True)
            print("stages", json.dumps(result["stages"]), flush=True)

            # 2. Throughput at 1 / 4 / 8 clients: the naive pipeline's image, new bytes each time (no cache hits).
            result["throughput"] = {"naive": {"clients": 1, "img_per_s": 1 / statistics.mean(lat["naive"])}}
            sent = 0
            for name in stubs:
                rows = []
                warm_batches(servers[name].target, bus, settings.batch_max_size)
                for clients, count in ((1, 3), (4, 8), (8, 8)):
                    images = [bus + b"\0" * (10_000 + sent + k) for k in range(count)]  # JPEG ignores trailing bytes
                    sent += count
                    before = batch_counts(servers[name])
                    rows.append(throughput(servers[name].target, images, clients))
                    rows[-1] |= requests_per_pass(before, batch_counts(servers[name]))
                    print(name, json.dumps(rows[-1]), flush=True)
                result["throughput"][name] = rows
            # The same with N worker processes (`detseg serve --workers N`), the embedded backend.
            for n in args.workers:
                served = DetsegWorkers(settings.replace(backend=args.embedded_backend), n, root)
                try:
                    rows = []
                    for clients, count in ((1, 3), (4, 8), (8, 8)):
                        images = [bus + b"\0" * (10_000 + sent + k) for k in range(count)]
                        sent += count
                        rows.append(throughput(served.target, images, clients))
                        print(f"embedded, {n} workers", json.dumps(rows[-1]), flush=True)
                finally:
                    served.stop()
                result["throughput"][f"embedded_workers_{n}"] = rows
            naive_tp = result["throughput"]["naive"]["img_per_s"]
            for name in [*stubs, *(f"embedded_workers_{n}" for n in args.workers)]:
                result["ratios"][f"{name}_throughput_8_clients_vs_naive"] = (
                    result["throughput"][name][-1]["img_per_s"] / naive_tp
                )

            # 3. Re-prompt on a cached handle vs a full request (embedded).
            stub = stubs["embedded"]
            fresh = jpeg(photo("zidane.jpg"))
            # The full request: the median of 3 (new bytes each, so none is a cache hit; until 2026-12-04 one).
            full_s = statistics.median(timed_call(stub, segment_request(fresh + b"\0" * k))[0] for k in (1, 2, 3))
            handle = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=fresh)), timeout=600).handle
            box = pb.BoundingBox(x_min=100, y_min=50, x_max=600, y_max=700)
            reprompt = []
            for k in range(30):  # an annotator's next click on the object: one region, its box and the click
                region = pb.RegionPrompt(box=box, points=[pb.Point(x=300 + 10 * k, y=400, label=1)])
                request = pb.SegmentRequest(image=pb.Image(handle=handle), regions=[region])
                reprompt.append(timed_call(stub, request)[0])
            result["reprompt"] = {"full_request_s": full_s, "cached_reprompt": summary(reprompt)}
            result["ratios"]["cached_reprompt_vs_full"] = statistics.median(reprompt) / full_s
            print("re-prompt", json.dumps(result["reprompt"]), flush=True)

            # 4. Precision gate: the served variant's final masks vs fp32's, >= 50 box prompts on real photos. The fp32
            # server starts only now: its decoder's OpenMP team would slow the embedded one's re-prompts above.
            servers["fp32"] = start_detseg(settings.replace(backend=args.embedded_backend, precision="fp32"))
            channels.append(grpc.insecure_channel(servers["fp32"].target, options=opts))
            exact = pb_grpc.SegmentationServiceStub(channels[-1])
            result["precision_gate"] = precision_gate(stubs["embedded"], exact)
            print("precision gate", json.dumps(result["precision_gate"]), flush=True)
        finally:
            naive.close()
            if naive_tuned is not None:
                naive_tuned.close()
            for c in channels:
                c.close()
            for server in servers.values():
                server.stop()
            if triton is not None:
                triton.stop()

        # 4. Decoder: N boxes in one call vs one call per box.
        result["decoder"] = decoder_costs(settings)
        d = result["decoder"]
        result["ratios"]["decoder_50_boxes_vs_50_single_calls"] = (
            d["decode_50_boxes_one_call_s"] / d["decode_50_single_box_calls_s"]
        )
        # 5. RSS of a serving process.
        if args.rss_requests:
            result["rss"] = rss_over_requests(cache, 50 if args.quick else args.rss_requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "RESULTS.md").write_text(report(result))
    print(f"wrote {args.out / 'RESULTS.md'}")


LABELS = {"embedded": "embedded", "torch": "torch in-process", "onnx": "ONNX Runtime in-process", "triton": "Triton"}


def label(name: str) -> str:
    """A path's name in the report; ``embedded_workers_<N>``: `detseg serve --workers N`."""
    if name.startswith("embedded_workers_"):
        return f"embedded, {name.removeprefix('embedded_workers_')} workers"
    return LABELS[name]


def report(r: dict[str, Any]) -> str:
    m, s, ratios, backends = r["machine"], r["single_image"], r["ratios"], r["backends"]
    rows = [
        "# detseg vs the naive pipeline",
        "",
        f"Measured {r['date']} with `python -m tests.benchmarks.pipeline_bench` on {m['cpu']} ({m['cores']} cores, "
        f"{m.get('dot_products', 'dot products not recorded')}, {m['gpu']}; torch device `{m['device']}` for the naive pipeline and detseg embedded);",
        f"torch {m['torch']}, ultralytics {m['ultralytics']}, sam2 {m['sam2']}, onnxruntime {m['onnxruntime']}"
        + (f", tritonserver {m['tritonserver']}." if "triton" in backends else "."),
        f"Models: {r['models']['detector']} (640²) + {r['models']['segmenter']} at 1024², "
        + (
            "seeded random weights (official architectures and FLOPs)."
            if r["models"]["kind"] == "bench"
            else "official weights."
        ),
        "",
        "## Targets",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
    ]
    gpu = m["device"].startswith("cuda")
    for name in backends:
        target = "≤ 0.5" if name == "embedded" else "–"
        rows.append(
            f"| single-image latency, {LABELS[name]} / naive | {ratios[name + '_latency_vs_naive']:.2f} | {target} |"
        )
    workers = [name for name in r["throughput"] if name.startswith("embedded_workers_")]
    for name in (*backends, *workers):
        target = "≥ 2" if name == "embedded" or name in workers else "–"
        rows.append(
            f"| throughput at 8 clients, {label(name)} / naive | {ratios[name + '_throughput_8_clients_vs_naive']:.2f} | {target} |"
        )
    gate = r["precision_gate"]
    rows += [
        f"| cached re-prompt / full request | {ratios['cached_reprompt_vs_full']:.3f} | ≤ {0.1 if gpu else 0.05} |",
        f"| gRPC + serialisation overhead, share of end to end (embedded) | {r['grpc_overhead']['embedded']['share_of_e2e']:.1%} | ≤ 3 % |",
        f"| masks IoU, served precision ({', '.join(sorted(set(gate['precision'])))}) vs fp32: min over {gate['prompts']} box prompts (mean) | {gate['min_iou']:.4f} ({gate['mean_iou']:.4f}) | ≥ 0.99 |",
        f"| decoder, 50 boxes in one call / 50 one-box calls | {ratios['decoder_50_boxes_vs_50_single_calls']:.2f} | ≤ 0.5 |",
    ]
    if "rss" in r:
        rows.append(
            f"| RSS growth over {r['rss']['requests']} requests after warm-up | {r['rss']['growth_mb']:+.1f} MB | ≤ 50 MB |"
        )
    rows += [
        "",
        f"## Single image (bus.jpg, {s['boxes']} detections), single client, {s['naive']['n']} requests each, interleaved",
        "",
        "| path | p50 (s) | p99 (s) |",
        "|---|---|---|",
    ]
    labels = {
        "naive": f"naive, square letterbox ({s['boxes']} boxes, the baseline of the ratios)",
        "naive_defaults": f"naive, ultralytics defaults (rect letterbox: {s['boxes_naive_defaults']} boxes)",
        "naive_tuned_malloc": "naive, square letterbox, under detseg's tuned malloc (for reference)",
    }
    shown = [n for n in ("naive", "naive_defaults", "naive_tuned_malloc") if not np.isnan(s[n]["p50_s"])]
    for name in (*shown, *backends):
        rows.append(
            f"| {labels.get(name, 'detseg ' + LABELS.get(name, name))} | {s[name]['p50_s']:.3f} | {s[name]['p99_s']:.3f} |"
        )
    rows += [
        "",
        "Per-stage medians (server side, seconds):",
        "",
        "| stage | " + " | ".join(LABELS[n] for n in backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for stage in r["stages"]["embedded"]:
        cells = " | ".join(f"{r['stages'][n].get(stage, float('nan')):.4f}" for n in backends)
        rows.append(f"| {stage} | {cells} |")
    rows += ["", "## Throughput (bus.jpg with new bytes per request, so no cache hits)", "",
             "Every micro-batch size warmed first; requests per pass: the in-process servers' detector / encoder "
             "batchers over the row (– for workers and Triton).", "",
             "| path | clients | requests | img/s | p50 (s) | p99 (s) | requests per pass (detector / encoder) |",
             "|---|---|---|---|---|---|---|", f"| naive (sequential) | 1 | – | {r['throughput']['naive']['img_per_s']:.3f} | – | – | – |"]  # fmt: skip
    for name in (*backends, *workers):
        for t in r["throughput"][name]:
            per_pass = "–"
            if "encoder_requests_per_pass" in t:
                per_pass = f"{t['detector_requests_per_pass']:.2f} / {t['encoder_requests_per_pass']:.2f}"
            rows.append(
                f"| {label(name)} | {t['clients']} | {t['requests']} | {t['img_per_s']:.3f} | {t['p50_s']:.3f} | {t['p99_s']:.3f} | {per_pass} |"
            )
    d = r["decoder"]
    rows += [
        "",
        "## Embedding reuse and the decoder",
        "",
        f"Full request {r['reprompt']['full_request_s']:.3f} s; re-prompt on a cached handle (one region, box + click) p50 "
        f"{r['reprompt']['cached_reprompt']['p50_s']:.4f} s.",
        "",
        f"Decoder in one call: 1 box {d['decode_1_boxes_one_call_s'] * 1e3:.1f} ms, 10 boxes {d['decode_10_boxes_one_call_s'] * 1e3:.1f} ms, "
        f"50 boxes {d['decode_50_boxes_one_call_s'] * 1e3:.1f} ms; 50 one-box calls {d['decode_50_single_box_calls_s'] * 1e3:.1f} ms.",
    ]
    if "rss" in r:
        rows += [
            "",
            f"RSS of `detseg serve` (demo profile, distinct shapes scenes, embedding cache bounded to {CACHE_BYTES_RSS >> 20} MiB and full "
            f"after the warm-up): {r['rss']['after_warmup_mb']:.0f} MB after warm-up, "
            f"{r['rss']['after_requests_mb']:.0f} MB after {r['rss']['requests']} more requests (samples every 50: "
            + ", ".join(f"{v:.0f}" for v in r["rss"]["samples_mb"])
            + ").",
        ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
