"""The cost of text prompts: detseg's open-vocabulary detection vs ultralytics' YOLOE after set_classes, one run.

    python -m tests.benchmarks.text_bench [--out benchmarks] [--rounds 5]

Model: the seeded open-vocabulary test detector (YOLOE-11n at 640², text features from all-MiniLM-L6-v2
projected to 512: ``make serve MODELS=test-open``); same weights, image and texts on both sides.

- naive baseline, per request: encode the texts, ``YOLOE.set_classes(names, embeddings)``, ``YOLOE.predict``
  (what a user of ultralytics does when each request brings its own vocabulary; the model is mutated per call);
- detseg: a Segment request through gRPC with ``texts`` (the detector's stages only: ``embed_classes`` +
  ``detect`` from provenance, since the baseline does not segment), with the texts' features uncached (new
  strings every round) and cached (the same strings again). The image cache is off, so the detector runs on
  every request (with it on, a repeated image and vocabulary skips the detector: ~0.002 s).

1, 10 and 100 texts; medians over ``--rounds``, interleaved. Writes ``<out>/TEXT.md`` and ``<out>/text.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from service.config import Settings
from service.models import testing
from service.models.text import ClassTextEncoder, SentenceEncoder
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, ultralytics_asset, wait_serving
from tests.helpers import load_rgb

COUNTS = (1, 10, 100)
WORDS = ("red", "blue", "large", "small", "old", "shiny", "wooden", "striped", "round", "tall")
THINGS = ("bus", "person", "shoe", "window", "bag", "car", "sign", "wheel", "door", "lamp")


def _texts(n: int, round_: int) -> list[str]:
    """n distinct phrases; a different set every round (uncached)."""
    return [f"{WORDS[(i + round_) % 10]} {THINGS[i % 10]} {round_}-{i // 10}" for i in range(n)]


def _stages(response: pb.SegmentResponse) -> float:
    seconds = {t.stage: t.duration.ToNanoseconds() / 1e9 for t in response.provenance.timings}
    return seconds.get("embed_classes", 0.0) + seconds["detect"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    threads = os.cpu_count() or 2
    cache = Path(tempfile.mkdtemp(prefix="detseg-text-bench-"))
    settings = Settings(
        models="test-open",
        cache_dir=cache,
        port=0,
        threads=threads,
        offline=True,
        max_text_prompts=len(THINGS) * 10,  # 100 texts (the default limit is 64)
        cache_max_bytes=0,  # no image cache: "cached" means the texts' features only, the detector always runs
    )

    from ultralytics import YOLOE

    from service.runners.factory import load_runner

    path = testing.make_test_open_detector(cache / "test-models")
    encoder = ClassTextEncoder.for_detector("minilm-512:seed0", SentenceEncoder.load())
    naive_model = YOLOE(str(path))
    head = naive_model.model.model[-1]
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    data = ultralytics_asset("bus.jpg").read_bytes()

    def naive(texts: list[str]) -> float:
        start = time.perf_counter()
        features = torch.from_numpy(encoder.encode(texts))[None].to(next(head.parameters()).dtype)
        with torch.no_grad():
            naive_model.set_classes(texts, head.get_tpe(features).float())
        naive_model.predict(bgr, imgsz=640, conf=0.25, rect=False, agnostic_nms=False, verbose=False)
        torch.set_num_threads(threads)  # ultralytics lowers it; give the baseline its best case
        return time.perf_counter() - start

    server = ServerThread(settings, lambda: load_runner(settings))
    results: dict[str, dict[str, float]] = {}
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        wait_serving(ch)
        stub = pb_grpc.SegmentationServiceStub(ch)

        def ours(texts: list[str]) -> float:
            options = pb.SegmentOptions(max_instances=1)  # one mask: the detector's stages are what is compared
            request = pb.SegmentRequest(image=pb.Image(encoded=data), texts=texts, options=options)
            return _stages(stub.Segment(request, timeout=600))

        for n in COUNTS:
            naive(_texts(n, -1))
            ours(_texts(n, -1))  # warm-up of both
            samples: dict[str, list[float]] = {"naive": [], "uncached": [], "cached": []}
            for r in range(args.rounds):
                texts = _texts(n, r)
                samples["naive"].append(naive(texts))
                samples["uncached"].append(ours(texts))
                samples["cached"].append(ours(texts))
            results[str(n)] = {k: statistics.median(v) for k, v in samples.items()}
    server.stop()

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
    }
    (args.out / "text.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        "# The cost of text prompts: detseg open vocabulary vs YOLOE after set_classes",
        "",
        f"`python -m tests.benchmarks.text_bench`, {meta['date']}, {meta['machine']}, medians of {args.rounds} "
        "interleaved rounds. Seeded YOLOE-11n at 640² (test-open profile), bus.jpg, text features from "
        "all-MiniLM-L6-v2 projected to 512. Seconds per request for the detector's stages (text features + "
        "detection; detseg's from provenance, the baseline's wall time).",
        "",
        "| texts | naive: encode + set_classes + predict | detseg, new texts | detseg, cached texts | "
        "new / naive | cached / naive |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        lines.append(
            f"| {n} | {r['naive']:.3f} | {r['uncached']:.3f} | {r['cached']:.3f} | "
            f"{r['uncached'] / r['naive']:.2f} | {r['cached'] / r['naive']:.2f} |"
        )
    (args.out / "TEXT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
