"""Regenerates the demo detector: ultralytics YOLO11n trained from scratch on the shapes world.

    python -m service.training.train_detector --work /tmp/shapes-yolo [--recipe timed|staged]

``timed`` (default; how the shipped ``shapes-yolo11n.pt`` is made, in under 30 minutes on 2 CPU cores):
  one run from the yolo11n.yaml architecture (random init) at 320² for ``--hours`` of training wall time
  (ultralytics' ``time`` mode re-plans epochs and the schedule after each epoch); SGD at lr 0.01 with
  ``nbs`` = batch, i.e. one optimizer step per batch (ultralytics' default nominal batch of 64 would
  accumulate 4 batches per step: 4x fewer steps, which a short schedule cannot afford); mosaic off for the
  last 3 epochs; validated only after the last epoch (last weights kept). How the recipe was chosen: SHAPES_YOLO.md.
``staged``: the earlier 65-minute recipe (three runs at 256², 256², 320²; see SHAPES_YOLO.md).
Ultralytics' ``select_device`` sets torch to cpu_count - 1 threads (one on a 2-core machine); a callback
sets ``--threads`` (default: all cores) back when training starts.
Writes ``shapes-yolo11n.pt`` (fp16, optimizer stripped, as ultralytics ships weights) beside this file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TRAIN_IMAGES, VAL_IMAGES = 1200, 100
SEED = 0
COMMON: dict[str, Any] = dict(
    batch=16,
    workers=0,
    cache="ram",
    device="cpu",
    seed=SEED,
    deterministic=True,
    plots=False,
    amp=False,
    exist_ok=True,
    verbose=False,
)
STAGES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("stage1", "yolo11n.yaml", dict(imgsz=256, epochs=15, val=False, close_mosaic=3)),
    ("stage2", "stage1/weights/last.pt", dict(imgsz=256, epochs=8, val=True, close_mosaic=3, warmup_epochs=0)),
    ("stage3", "stage2/weights/best.pt", dict(imgsz=320, epochs=8, val=True, close_mosaic=4, warmup_epochs=0)),
)
TIMED: dict[str, Any] = dict(
    imgsz=320, epochs=100, val=False, close_mosaic=3, optimizer="SGD", lr0=0.01, nbs=COMMON["batch"]
)  # epochs: re-planned by `time`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch dir for the dataset and runs")
    parser.add_argument("--recipe", choices=("timed", "staged"), default="timed")
    parser.add_argument("--hours", type=float, default=0.42, help="timed recipe: training wall-time budget")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads while training")
    parser.add_argument("--out", type=Path, default=HERE / "shapes-yolo11n.pt")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")

    import torch
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    from service.shapes.dataset import write_yolo_dataset

    start = time.time()
    data = args.work / "data" / "data.yaml"
    if not data.exists():  # deterministic, so a previous run's copy is the same dataset
        data = write_yolo_dataset(args.work / "data", {"train": TRAIN_IMAGES, "val": VAL_IMAGES}, workers=args.threads)
    print(f"dataset ready in {time.time() - start:.0f}s", flush=True)
    runs = args.work / "runs"

    def train(source: str, name: str, **options: Any) -> None:
        t = time.time()
        model = YOLO(source)
        if args.threads:
            model.add_callback("on_train_start", lambda trainer: torch.set_num_threads(args.threads))
        model.train(data=str(data), project=str(runs), name=name, **COMMON, **options)
        print(f"{name}: {time.time() - t:.0f}s", flush=True)

    if args.recipe == "staged":
        for name, source, options in STAGES:
            train(source if source.endswith(".yaml") else str(runs / source), name, **options)
        weights = runs / STAGES[-1][0] / "weights" / "best.pt"
    else:
        train("yolo11n.yaml", "timed", time=args.hours, **TIMED)
        weights = runs / "timed" / "weights" / "last.pt"
    strip_optimizer(str(weights))
    shutil.copyfile(weights, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
