"""The mask stage before and after windowing (issue 22), in one run on the same inputs (not a test).

    python -m tests.benchmarks.mask_bench [--out benchmarks] [--repeats 2] [--quick]

The stage is what the server's ``encode_masks`` stage times (``Pipeline.segment``: ``Masks.finish``): every mask's
low-res logits upsampled to the image and thresholded, SAM's stability score, refinement (clip to box + 10 %, holes
and islands under 100 px: the server's defaults), COCO RLE encoding and review's stats, on the mask pool
(``mask_threads`` as the server sets it). Two implementations run on the same logits:

- **old**: the code before issue 22, kept here verbatim as the reference (``OldMasks``): OpenCV upsamples every
  mask to the whole frame, stability is counted over the frame, refinement clips the frame in place;
- **new**: ``service.pipeline.masking.Masks`` (each mask upsampled only in its window, ``SegmenterProcessing``).

Inputs, each at 12 MP (3000 × 4000) with 200 box prompts and at 1 MP with 13:

- **seeded SAM 2**: real decoder outputs of SAM 2.1 hiera-tiny at 1024² with seeded random weights (the models of
  ``scaling_bench``, whose SCALING.md this stage's 8.1 s comes from) for ``scaling_bench.box_prompts`` boxes on
  bus.jpg resized (aspect kept). Random weights give logits in about [-0.4, 0.5]: no cell reaches ±1, so every
  mask's window is the whole frame and only the box clip narrows it; masks are fragmented noise, the hardest case
  for refinement and RLE.
- **blobs**: synthetic logits shaped like a trained SAM's (an object filling its box, logits from -25 outside to
  +15 inside, crossing ±1 within a cell, low noise): windows hug the objects.

Both implementations' results are compared mask by mask: RLE bytes, review stats, stability scores, and the raw
(unrefined) upsampled masks pixel by pixel (OpenCV's arithmetic vs ours: they may differ only where a logit is
within float rounding of 0). Writes ``<out>/MASKS.md`` and ``<out>/masks.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import statistics
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from service.config import Settings
from service.models import sam_ops, testing
from service.models.tensors import DecoderOutput, ImageFeatures, SegmenterSpec
from service.pipeline.masking import FinalMasks, FinishedMask, Masks
from service.pipeline.refine import Refinement, refine_mask
from service.pipeline.review import mask_stats
from service.processing.masks import RLE, Bounds, EncodedMask, mask_bounds
from service.processing.segmentation import BestMasks, SamPrompt, SegmenterProcessing
from service.processing.upsampling import UpsampledMasks, stability_scores
from service.runners.local import torch_thread
from service.runners.torch import decode_batch
from tests.benchmarks.pipeline_bench import photo
from tests.benchmarks.scaling_bench import box_prompts, peak_memory

POINTS = ((12.0, 200), (1.0, 13))  # (megapixels, box prompts)
QUICK_POINTS = ((4.0, 50), (1.0, 13))
SAM_SIZE = 1024
REFINEMENT = Refinement(min_region_area=Settings.mask_min_region_area, box_margin=Settings.mask_box_margin)
MASK_THREADS = Settings.mask_threads or min(8, len(os.sched_getaffinity(0)))  # as service.app sets the pool


# --- the reference: the mask stage as it was before issue 22 (verbatim but for names) -------------------------------


class OldMasks:
    """``Masks.finish`` before issue 22: chunks of 16 masks upsampled to the whole frame by OpenCV, stability over
    the frame, refinement in place on the frame, RLE from the tight window."""

    CHUNK = 16

    def __init__(self, mask_threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(mask_threads, thread_name_prefix="old-masks")

    def finish(self, low_res: np.ndarray, image: Any, p: Any, prompts: list[SamPrompt]) -> FinalMasks:
        hw = (image.height, image.width)
        final = FinalMasks([], [], [])
        for i in range(0, low_res.shape[0], self.CHUNK):
            up = old_postprocess(low_res[i : i + self.CHUNK], hw)
            chunk = prompts[i : i + self.CHUNK]
            finished = self._pool.map(
                lambda m, q, s: _old_finish_mask(m, q, float(s), p), up.masks, chunk, up.stability
            )
            for mask in finished:
                final.encoded.append(mask.encoded)
                final.boxes.append(mask.box)
                final.stats.append(mask.stats)
        return final


def old_postprocess(low_res_masks: np.ndarray, orig_hw: tuple[int, int]) -> types.SimpleNamespace:
    """``SegmenterProcessing.postprocess`` before issue 22: masks (B, H, W) bool, a view of column-major memory."""
    h, w = orig_hw
    out = np.empty((h, w, low_res_masks.shape[0]), dtype=bool, order="F")
    stability = np.empty(low_res_masks.shape[0], dtype=np.float32)
    for i, logits in enumerate(low_res_masks):
        up = cv2.resize(np.ascontiguousarray(logits.T), (h, w), interpolation=cv2.INTER_LINEAR)
        out[:, :, i] = (up > 0.0).T
        stability[i] = stability_scores(up[None], 0.0)[0]
    return types.SimpleNamespace(masks=out.transpose(2, 0, 1), stability=stability)


def _old_finish_mask(mask: np.ndarray, prompt: SamPrompt, stability: float, p: Any) -> FinishedMask:
    window = refine_mask(mask, prompt.box, p.refinement) if p.refinement.active else None
    bounds = mask_bounds(mask, window)
    encoded = EncodedMask(mask.shape[0], mask.shape[1], RLE, rle_counts=_old_rle_from_window(mask, bounds))
    box = None
    if prompt.box is None and bounds is not None:
        box = np.array([bounds.x0, bounds.y0, bounds.x1, bounds.y1], dtype=np.float32)
    return FinishedMask(encoded, box, mask_stats(mask, stability, bounds))


def _old_rle_from_window(mask: np.ndarray, bounds: Bounds | None) -> bytes:
    h, w = mask.shape
    if bounds is None:
        runs = np.array([h * w], np.int64)
    else:
        window = bounds.crop(mask).T
        padded = np.zeros((window.shape[0], window.shape[1] + 2), np.int8)
        padded[:, 1:-1] = window
        xs, ys = np.nonzero(np.diff(padded, axis=1))
        edges = (bounds.x0 + xs).astype(np.int64) * h + bounds.y0 + ys
        joined = np.flatnonzero(edges[1:-1:2] == edges[2::2]) * 2 + 1
        edges = np.delete(edges, np.concatenate([joined, joined + 1]))
        runs = np.diff(np.concatenate(([0], edges, [h * w])))
        if runs[-1] == 0:
            runs = runs[:-1]
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs.tolist()}, h, w)
    return rle["counts"]  # type: ignore[no-any-return]


# --- inputs ---------------------------------------------------------------------------------------------------------


def resized(rgb: np.ndarray, megapixels: float) -> np.ndarray:
    """``rgb`` resized to about ``megapixels``, aspect kept (``scaling_bench.resized_jpeg``'s size, no JPEG)."""
    h, w = rgb.shape[:2]
    scale = math.sqrt(megapixels * 1e6 / (w * h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def boxes_for(count: int, width: int, height: int) -> np.ndarray:
    """(N, 4) float32 XYXY: ``scaling_bench``'s box prompts."""
    return np.array(
        [[r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max] for r in box_prompts(count, width, height)], np.float32
    )


def prompts_for(boxes: np.ndarray) -> list[SamPrompt]:
    return [SamPrompt(box, np.zeros((0, 2), np.float32), np.zeros(0, np.int32)) for box in boxes]


class SeededSam:
    """SAM 2.1 hiera-tiny at 1024² with seeded random weights (``testing.write_segmenter``'s), run in-process."""

    def __init__(self) -> None:
        from sam2.build_sam import build_sam2

        torch.manual_seed(0)
        self.model = build_sam2(
            testing.TEST_SEGMENTER_CONFIG,
            None,
            device="cpu",
            mode="eval",
            hydra_overrides_extra=[f"++model.image_size={SAM_SIZE}"],
        ).requires_grad_(False)
        self.processing = SegmenterProcessing(SegmenterSpec(image_size=SAM_SIZE))

    def logits(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, 256, 256) float32: the best low-res mask of each box, as ``Masks.decode`` gathers them."""
        hw = (rgb.shape[0], rgb.shape[1])
        with torch.inference_mode():
            embed, hr0, hr1 = sam_ops.image_features(self.model, torch.from_numpy(self.processing.preprocess(rgb)))
        features = ImageFeatures(image_embed=embed.numpy(), high_res_feats=(hr0.numpy(), hr1.numpy()))
        best = BestMasks(len(boxes), SAM_SIZE // 4)
        for indices, batch in self.processing.prompt_batches(prompts_for(boxes), hw, multimask=False):
            with torch.inference_mode():
                masks, iou = decode_batch(self.model, features, batch, torch.from_numpy)
            best.add(indices, DecoderOutput(low_res_masks=masks.numpy(), iou_predictions=iou.numpy()))
        return np.asarray(best.low_res)


def blob_logits(boxes: np.ndarray, hw: tuple[int, int], side: int = SAM_SIZE // 4, seed: int = 0) -> np.ndarray:
    """(N, side, side) float32 logits shaped like a trained SAM's: an ellipse filling each box (radius jittered
    by a few %), 3 logits per low-res cell of signed distance, clipped to [-25, 15], with smooth noise (σ 0.3)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    cy, cx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    out = np.empty((len(boxes), side, side), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ex, ey = (x0 + x1) / 2 * side / w, (y0 + y1) / 2 * side / h
        ax, ay = max((x1 - x0) / 2 * side / w, 0.5), max((y1 - y0) / 2 * side / h, 0.5)
        angle = np.arctan2(cy - ey, cx - ex)
        wobble = 1 + 0.05 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
        d = np.sqrt(((cx - ex) / ax) ** 2 + ((cy - ey) / ay) ** 2) / wobble  # 1 on the outline
        noise = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), 2)
        noise *= 0.3 / noise.std()
        out[i] = np.clip(3 * (1 - d) * min(ax, ay), -25, 15) + noise
    return out


# --- measuring ------------------------------------------------------------------------------------------------------


def timed(
    finish: Callable[[], FinalMasks], repeats: int
) -> tuple[list[float], list[float], FinalMasks, dict[str, float]]:
    """``repeats`` runs of the stage: wall seconds and CPU seconds (this process, all threads) of each, the last
    run's result, the peak RSS over them."""
    seconds: list[float] = []
    cpu: list[float] = []
    with peak_memory("cpu") as memory:
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            final = finish()
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return seconds, cpu, final, memory


def raw_differences(logits: np.ndarray, hw: tuple[int, int], processing: SegmenterProcessing) -> dict[str, Any]:
    """Unrefined masks and stability, old (OpenCV on the frame) vs new (windows), mask by mask: pixels that differ,
    how many of them lie within 1e-5 of the threshold in OpenCV's logits, and stability scores that differ."""
    differing = near = stability = 0
    for i in range(len(logits)):
        old = cv2.resize(np.ascontiguousarray(logits[i].T), hw, interpolation=cv2.INTER_LINEAR).T
        new: UpsampledMasks = processing.postprocess(logits[i : i + 1], hw)
        wrong = new.masks[0] != (old > 0)
        differing += int(wrong.sum())
        near += int((wrong & (np.abs(old) <= 1e-5)).sum())
        stability += int(new.stability[0] != stability_scores(old[None], 0.0)[0])
    return {
        "raw_pixels_differing": differing,
        "raw_pixels_differing_within_1e-5": near,
        "stability_differing": stability,
    }


def compare(old: FinalMasks, new: FinalMasks, hw: tuple[int, int]) -> dict[str, Any]:
    """Final results, old vs new: masks whose RLE bytes / stats / boxes differ, and the pixels the differing masks
    differ by."""
    rle = [i for i, (a, b) in enumerate(zip(old.encoded, new.encoded, strict=True)) if a.rle_counts != b.rle_counts]
    pixels = 0
    for i in rle:
        a, b = (mask_utils.decode({"size": list(hw), "counts": m.encoded[i].rle_counts}) for m in (old, new))
        pixels += int((a != b).sum())
    stats = sum(a != b for a, b in zip(old.stats, new.stats, strict=True))
    boxes = sum(
        not ((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b)))
        for a, b in zip(old.boxes, new.boxes, strict=True)
    )
    return {"rle_differing": len(rle), "final_pixels_differing": pixels, "stats_differing": stats,
            "boxes_differing": boxes}  # fmt: skip


def point(
    kind: str, logits: np.ndarray, boxes: np.ndarray, hw: tuple[int, int], repeats: int, new: Masks, old: OldMasks
) -> dict[str, Any]:
    image = types.SimpleNamespace(height=hw[0], width=hw[1])
    plan = types.SimpleNamespace(refinement=REFINEMENT, mask_encoding=RLE)
    prompts = prompts_for(boxes)
    new.finish(logits[:2], image, plan, prompts[:2])  # warm: the axis tables, torch's first calls
    old_s, old_cpu, old_final, old_mem = timed(lambda: old.finish(logits, image, plan, prompts), repeats)
    new_s, new_cpu, new_final, new_mem = timed(lambda: new.finish(logits, image, plan, prompts), repeats)
    row = {
        "input": kind,
        "megapixels": hw[0] * hw[1] / 1e6,
        "height": hw[0],
        "width": hw[1],
        "masks": len(boxes),
        "old_s": statistics.median(old_s),
        "new_s": statistics.median(new_s),
        "old_cpu_s": statistics.median(old_cpu),
        "new_cpu_s": statistics.median(new_cpu),
        "old_runs_s": old_s,
        "new_runs_s": new_s,
        "old_rss_peak_over_before_mb": old_mem["rss_peak_mb"] - old_mem["rss_before_mb"],
        "new_rss_peak_over_before_mb": new_mem["rss_peak_mb"] - new_mem["rss_before_mb"],
        **compare(old_final, new_final, hw),
        **raw_differences(logits, hw, new.segmentation),
    }
    row["speedup"] = row["old_s"] / row["new_s"]
    row["cpu_ratio"] = row["old_cpu_s"] / row["new_cpu_s"]
    print(
        f"{kind} {row['megapixels']:.1f} MP x {len(boxes)}: old {row['old_s']:.3f} s, new {row['new_s']:.3f} s "
        f"({row['speedup']:.1f}x); RLE differing {row['rle_differing']}, raw px differing "
        f"{row['raw_pixels_differing']}",
        flush=True,
    )
    return row


# --- report ---------------------------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# detseg: the mask stage before and after windowing (issue 22)",
        "",
        f"Measured {r['date']} with `python -m tests.benchmarks.mask_bench` on {m['cpu']} ({m['cores']} cores, "
        f"no GPU); torch {m['torch']}, OpenCV {m['opencv']}, numpy {m['numpy']}; mask pool of {r['mask_threads']} "
        f"threads (the server's default here); torch intra-op threads {r['torch_threads']} for the logits, one on "
        "the mask pool's threads (as in the server: `runners.local.torch_thread`).",
        "",
        "The stage is the server's `encode_masks` (`Masks.finish`): upsample + threshold + stability, refinement "
        f"(box + {REFINEMENT.box_margin:g} margin, holes and islands under {REFINEMENT.min_region_area} px), COCO "
        "RLE, review stats. **old**: the code before issue 22, kept in the benchmark as the reference (OpenCV "
        "upsampling of every mask to the whole frame); **new**: `service.pipeline.masking.Masks` (each mask "
        f"upsampled only in its window). Seconds: median of {r['repeats']} run(s) of the whole stage, both on the "
        "same logits in the same process.",
        "",
        "Inputs: **seeded SAM 2** = real SAM 2.1 hiera-tiny (1024²) decoder outputs with seeded random weights (the "
        "models of SCALING.md) for scaling_bench's box prompts on bus.jpg resized; random weights give logits in "
        "about [-0.4, 0.5], so every window is the frame and only the box clip narrows it, and the masks are "
        "fragmented noise (the hardest case for refinement and RLE). **blobs** = synthetic logits shaped like a "
        "trained SAM's (objects filling their boxes, -25 outside to +15 inside, ±1 crossed within a cell).",
        "",
        "| input | image (H×W) | masks | old (s) | new (s) | speedup | CPU old / new (s) | CPU ratio | "
        "RSS peak over start, old / new (MB) | final RLE differing (pixels) | raw pixels differing (within 1e-5 "
        "of 0) | stability differing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["points"]:
        lines.append(
            f"| {p['input']} | {p['height']}×{p['width']} ({p['megapixels']:.1f} MP) | {p['masks']} | "
            f"{p['old_s']:.3f} | {p['new_s']:.3f} | {p['speedup']:.1f}× | "
            f"{p['old_cpu_s']:.2f} / {p['new_cpu_s']:.2f} | {p['cpu_ratio']:.1f}× | "
            f"{p['old_rss_peak_over_before_mb']:.0f} / {p['new_rss_peak_over_before_mb']:.0f} | "
            f"{p['rle_differing']} of {p['masks']} ({p['final_pixels_differing']}) | {p['raw_pixels_differing']} "
            f"({p['raw_pixels_differing_within_1e-5']}) | {p['stability_differing']} |"
        )
    lines += [
        "",
        "Seconds are wall time of the whole stage; CPU seconds add up every thread's (the machine is shared, so "
        "wall time also carries other work's load).",
        "",
        "Differences: *final RLE differing* compares the stage's outputs mask by mask (bytes; in brackets the "
        "pixels those masks differ by); *raw pixels differing* compares every unrefined upsampled mask over the "
        "whole frame (200 × 12 MP = 2.4 billion pixels at 12 MP), OpenCV's arithmetic (old: IPP's float sums) vs "
        "ours (new: the same weights, float32 sums along y then x), and how many of those pixels have an OpenCV "
        "logit within 1e-5 of the threshold; *stability differing* counts masks whose stability score is not the "
        "same float.",
        "",
        f"Issue 22's target, the stage at 12 MP × 200 masks in ≤ 1 s: {target(r)}.",
        "",
        f"Logits for the seeded points took {r['decoder_s']:.0f} s to compute (not part of the stage). Whole run: "
        f"{r['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def target(r: dict[str, Any]) -> str:
    """Which 12 MP points meet issue 22's ≤ 1 s, in words."""
    big = [p for p in r["points"] if p["megapixels"] > 10]
    if not big:
        return "no 12 MP point in this run (--quick)"
    return "; ".join(f"{p['input']} {p['new_s']:.2f} s ({'met' if p['new_s'] <= 1 else 'not met'})" for p in big)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of the stage per point and implementation")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 4 MP x 50 instead of 12 MP x 200")
    args = parser.parse_args()
    start = time.perf_counter()
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(os.cpu_count() or 1)  # Settings.threads' default, as the server sets it
    # As in the server: threads started from here on (the mask pools') run torch's ops on one thread.
    torch_thread("bench-torch")
    sam = SeededSam()
    new = Masks(None, sam.processing, MASK_THREADS)  # type: ignore[arg-type]  # the stage needs no runner
    old = OldMasks(MASK_THREADS)
    bus = photo("bus.jpg")
    points, decoder_s = [], 0.0
    for megapixels, count in QUICK_POINTS if args.quick else POINTS:
        rgb = resized(bus, megapixels)
        hw = (rgb.shape[0], rgb.shape[1])
        boxes = boxes_for(count, hw[1], hw[0])
        t = time.perf_counter()
        seeded = sam.logits(rgb, boxes)
        decoder_s += time.perf_counter() - t
        points.append(point("seeded SAM 2", seeded, boxes, hw, repeats, new, old))
        points.append(point("blobs", blob_logits(boxes, hw), boxes, hw, repeats, new, old))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                platform.processor(),
            ),  # fmt: skip
            "cores": str(os.cpu_count()),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "mask_threads": MASK_THREADS,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "refinement": {"min_region_area": REFINEMENT.min_region_area, "box_margin": REFINEMENT.box_margin},
        "points": points,
        "decoder_s": decoder_s,
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "masks.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "MASKS.md").write_text(report(result))
    print(f"wrote {args.out / 'MASKS.md'} and {args.out / 'masks.json'}")


if __name__ == "__main__":
    main()
