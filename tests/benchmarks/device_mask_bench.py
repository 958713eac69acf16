"""The mask stage on a device-resident runner's logits: every mask at once vs mask by mask (one run, not a test).

    python -m tests.benchmarks.device_mask_bench --device cuda [--out benchmarks] [--repeats 3]

The stage is the server's ``encode_masks`` (``Masks.finish``) with the server's refinement defaults and COCO RLE, on
the mask pool as ``service.app`` sizes it. Three ways to run it on the same logits, in one process:

- **at once**: ``Masks.finish`` given the logits as a tensor on ``--device`` (what a device-resident runner gives
  it): every mask's window upsampled there in a few passes (``_Grid.every_window``), one copy of the crops to the
  host, then refinement and encoding per mask on the pool;
- **mask by mask**: the loop the device path ran before (until 2026-12-04): each mask's own ``postprocess`` call on
  the pool (its summary, its window and its copy to the host: dozens of kernels and a few synchronisations each);
- **host**: ``Masks.finish`` given the logits on the host (numpy, what the CPU runners give it).

Inputs (synthetic, seeded; 12 MP × 200 masks and 1 MP × 50): **blobs**, shaped like a trained SAM's logits
(``mask_bench.blob_logits``: windows hug the objects) and **noise**, smooth noise in about [-0.5, 0.5] as SAM with
seeded random weights gives (every window is the box + margin, masks fragmented: the benchmarks' models). All three
outputs are compared byte for byte (RLE, review stats). Writes ``<out>/device-masks.json`` and prints each row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from service.models.tensors import SegmenterSpec
from service.pipeline.masking import FinalMasks, Masks
from service.processing.masks import RLE
from service.processing.segmentation import SegmenterProcessing
from tests.benchmarks.mask_bench import MASK_THREADS, REFINEMENT, SAM_SIZE, blob_logits, boxes_for, prompts_for

POINTS = ((12.0, 200), (1.0, 50))  # (megapixels, masks)


class MaskByMask(Masks):
    """``Masks.finish`` as the device path ran it before: each mask's own ``postprocess`` call on the pool."""

    _all_at_once = Masks._each_alone


def noise_logits(n: int, seed: int = 0) -> np.ndarray:
    """(n, 256, 256) smooth noise in about [-0.5, 0.5]: the spread of SAM's logits with seeded random weights."""
    rng = np.random.default_rng(seed)
    side = SAM_SIZE // 4
    out = np.stack(
        [cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), 1.5) for _ in range(n)]
    )
    return out * np.float32(0.5 / np.abs(out).max())


def timed(run: Callable[[], FinalMasks], device: torch.device, repeats: int) -> tuple[list[float], FinalMasks]:
    """``repeats`` runs after one unmeasured: wall seconds of each (the device synchronised), the last result."""
    run()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        final = run()
        seconds.append(time.perf_counter() - start)
    return seconds, final


def outputs(final: FinalMasks) -> list[tuple[bytes, Any]]:
    return [(e.rle_counts, s) for e, s in zip(final.encoded, final.stats, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    processing = SegmenterProcessing(SegmenterSpec(image_size=SAM_SIZE))
    at_once, by_mask = Masks(None, processing, MASK_THREADS), MaskByMask(None, processing, MASK_THREADS)  # type: ignore[arg-type]
    plan = types.SimpleNamespace(refinement=REFINEMENT, mask_encoding=RLE)
    rows = []
    for megapixels, count in POINTS:
        h = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
        hw = (h, int(round(h * 4 / 3)))
        image = types.SimpleNamespace(height=hw[0], width=hw[1])
        boxes = boxes_for(count, hw[1], hw[0])
        prompts = prompts_for(boxes)
        for kind, logits in (("blobs", blob_logits(boxes, hw)), ("noise", noise_logits(count))):
            there = torch.from_numpy(logits).to(device)
            runs: dict[str, Callable[[], FinalMasks]] = {
                "at_once": lambda: at_once.finish(there, image, plan, prompts),  # noqa: B023
                "mask_by_mask": lambda: by_mask.finish(there, image, plan, prompts),  # noqa: B023
                "host": lambda: at_once.finish(logits, image, plan, prompts),  # noqa: B023
            }
            row: dict[str, Any] = {"input": kind, "height": hw[0], "width": hw[1], "masks": count}
            results = {}
            for name, run in runs.items():
                seconds, results[name] = timed(run, device, args.repeats)
                row[f"{name}_s"] = statistics.median(seconds)
                row[f"{name}_runs_s"] = seconds
            reference = outputs(results["host"])
            row["same_as_host"] = {name: outputs(r) == reference for name, r in results.items()}
            row["mask_by_mask_vs_at_once"] = row["mask_by_mask_s"] / row["at_once_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    result = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "gpu": gpu, "torch": torch.__version__,
              "mask_threads": MASK_THREADS, "repeats": args.repeats, "points": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device-masks.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'device-masks.json'}")


if __name__ == "__main__":
    main()
