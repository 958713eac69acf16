"""SAM 2's mask decoder on this machine, as detseg serves it on the CPU, against the old policy and sam2's own decoder
(one run, not a test).

    python -m tests.benchmarks.decoder_bench [--out benchmarks] [--repeats 5] [--no-openvino]

Model: SAM 2.1 hiera-tiny at 1024² with seeded random weights (the official architecture and FLOPs; the "bench"
models of pipeline_bench). Images: ultralytics' bus.jpg and zidane.jpg, encoded once by the model (float32).

- serving path: the openvino backend's decoder (``sam_ops.PromptDecoder`` with the CPU policy, bf16 image tokens where
  the CPU has bf16 dot products, as ``service.runners.openvino.gated_decoder`` serves it when its gate passes: the gate
  figures below are this model's) called as ``OpenVinoRunner`` calls it
  (``decode_batch`` on the ``PromptBatch`` es of ``SegmenterProcessing.prompt_batches``): 1, 10 and 50 boxes in one
  call, and 50 one-box calls;
- the old policy: the same decoder with every prompt of a call (up to 64) in one pass; the float32 policy (the
  torch backend's, exact); sam2's own decoder (``MaskDecoder.predict_masks`` on a per-prompt copy of the image, as
  ``SAM2ImagePredictor`` runs it);
- levers: passes of 4 / 16 / 64 prompts, 1 thread vs all, and (unless ``--no-openvino``) the rewritten decoder
  exported to ONNX and run by OpenVINO in f32 and bf16;
- the quality gate: final masks (upsampled to the photo, threshold 0) of the serving path and of OpenVINO bf16 vs
  sam2's own float32 decoder, single mask per box, over 104 box prompts (27 grid boxes + 25 seeded random boxes per
  photo).

Times are the best of ``--repeats`` interleaved repeats in shuffled order (the median beside it). Writes
``<out>/DECODER.md`` and ``<out>/decoder.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import Settings
from service.models import sam_ops
from service.models.cpu import cpu_has_native_bf16
from service.models.tensors import ImageFeatures, PromptBatch, SegmenterSpec
from service.models.testing import TEST_SEGMENTER_CONFIG
from service.processing.segmentation import MAX_PROMPTS_PER_CALL, SamPrompt, SegmenterProcessing

THREADS = os.cpu_count() or 2
IMAGE_SIZE = 1024
PHOTOS = ("bus.jpg", "zidane.jpg")
RANDOM_BOXES = 25  # per photo, beside the int8 gate's 27 grid boxes
TARGET_RATIO = 0.5  # 50 boxes in one call / 50 one-box calls
TARGET_MS_PER_BOX = 15.0  # at 10-50 boxes
GATE_MIN_IOU = 0.99
_NO_POINTS, _NO_LABELS = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class Photo:
    """One photo: name; hw (H, W); features (embed, high_res_0, high_res_1) float32 tensors of batch 1; boxes (52, 4)
    float32 box prompts, original-image pixels XYXY."""

    name: str
    hw: tuple[int, int]
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    boxes: np.ndarray


def seeded_sam() -> Any:
    """SAM 2.1-T at 1024² with seed-0 random weights: ``testing.write_segmenter(path, seed=0, image_size=1024)``'s."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(
        TEST_SEGMENTER_CONFIG,
        None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"],
    )
    return model.requires_grad_(False)


def photo_features(model: Any) -> list[Photo]:
    """PHOTOS through ``model``'s image encoder (float32), each with its box prompts (``gate_boxes``)."""
    from PIL import Image
    from ultralytics.utils import ASSETS

    processing = SegmenterProcessing(SegmenterSpec(image_size=int(model.image_size)))
    photos = []
    for name in PHOTOS:
        with Image.open(Path(ASSETS) / name) as image:
            rgb = np.array(image.convert("RGB"))
        with torch.inference_mode():
            embed, hr0, hr1 = sam_ops.image_features(model, torch.from_numpy(processing.preprocess(rgb)))
        hw = (rgb.shape[0], rgb.shape[1])
        photos.append(Photo(name, hw, (embed, hr0, hr1), gate_boxes(hw)))
    return photos


def gate_boxes(hw: tuple[int, int], seed: int = 1) -> np.ndarray:
    """(52, 4) float32 boxes, pixels XYXY: the int8 gate's 27 grid boxes, then RANDOM_BOXES seeded ones of 5-50 % of
    each side."""
    from service.runners.openvino import grid_boxes

    h, w = hw
    rng = np.random.default_rng(seed)
    boxes = list(grid_boxes(w, h))
    for _ in range(RANDOM_BOXES):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        boxes.append((x0, y0, min(w, x0 + rng.uniform(0.05, 0.5) * w), min(h, y0 + rng.uniform(0.05, 0.5) * h)))
    return np.array(boxes, dtype=np.float32)


def prompt_batches(photo: Photo, boxes: np.ndarray) -> list[PromptBatch]:
    """The decoder calls the pipeline makes for ``boxes`` on ``photo`` (single mask per box)."""
    processing = SegmenterProcessing(SegmenterSpec(image_size=IMAGE_SIZE))
    prompts = [SamPrompt(box, _NO_POINTS, _NO_LABELS) for box in boxes]
    return [batch for _, batch in processing.prompt_batches(prompts, photo.hw, multimask=False)]


def gate_prompts(photo: Photo) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``photo``'s box prompts as one batch: (coords (52, 2, 2) float32 SAM input pixels, labels (52, 2))."""
    (batch,) = prompt_batches(photo, photo.boxes)
    return torch.from_numpy(batch.point_coords), torch.from_numpy(batch.point_labels)


def features_of(photo: Photo) -> ImageFeatures:
    embed, hr0, hr1 = (f.numpy() for f in photo.features)
    return ImageFeatures(image_embed=embed, high_res_feats=(hr0, hr1))


def sam2_decoder(model: Any, features: Any, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sam2's own decoder as ``SAM2ImagePredictor._predict`` runs it (the image side copied per prompt), single mask
    per prompt → (B, 1, 256, 256) float32 logits."""
    embed, hr0, hr1 = features
    b = coords.shape[0]
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    decoder = model.sam_mask_decoder
    masks, iou, _, _ = decoder.predict_masks(
        image_embeddings=torch.repeat_interleave(embed, b, dim=0),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[torch.repeat_interleave(hr0, b, dim=0), torch.repeat_interleave(hr1, b, dim=0)],
    )
    return decoder._dynamic_multimask_via_stability(masks, iou)[0]


def mask_ious(a: torch.Tensor, b: torch.Tensor, hw: tuple[int, int]) -> list[float]:
    """(B, 1, s, s) logits each → IoU of the masks upsampled to ``hw`` as sam2 does it (bilinear, threshold 0)."""
    up = [torch.nn.functional.interpolate(x.float(), hw, mode="bilinear", align_corners=False) > 0 for x in (a, b)]
    inter = (up[0] & up[1]).flatten(1).sum(1)
    union = (up[0] | up[1]).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).tolist()


def timed(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per case: each warmed up once, then ``repeats`` interleaved runs, the order shuffled each time (no case
    always follows the same one) → {"best", "median"}."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        for name in rng.permutation(order):
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return {name: {"best": min(t), "median": statistics.median(t)} for name, t in times.items()}


def decoder_cases(decoder: Any, photo: Photo, label: str) -> dict[str, Callable[[], Any]]:
    """1, 10, 50 boxes in one call and 50 one-box calls of ``decoder`` on ``photo``, as the runner calls it."""
    from service.runners.torch import decode_batch

    features = features_of(photo)

    def calls(batches: list[PromptBatch]) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                for batch in batches:
                    decode_batch(decoder, features, batch, torch.from_numpy)

        return run

    boxes = photo.boxes
    cases = {f"{label}: {n} in one call": calls(prompt_batches(photo, boxes[:n])) for n in (1, 10, 50)}
    singles = [batch for box in boxes[:50] for batch in prompt_batches(photo, box[None])]
    cases[f"{label}: 50 one-box calls"] = calls(singles)
    return cases


def openvino_lever(model: Any, photos: list[Photo], repeats: int, tmp: Path) -> dict[str, Any]:
    """The rewritten decoder (float32, one pass) exported to ONNX and compiled by OpenVINO, f32 and bf16 inference
    precision: ms per box at 10 and 50 boxes, and bf16's final masks vs sam2's float32 decoder."""
    import openvino as ov

    decoder = sam_ops.PromptDecoder(model)

    class Graph(torch.nn.Module):
        def forward(self, embed, hr0, hr1, coords, labels):  # type: ignore[no-untyped-def]
            return decoder(embed, hr0, hr1, coords, labels, multimask=False)

    photo = photos[0]
    coords, labels = gate_prompts(photo)
    path = tmp / "decoder.onnx"
    names = ["embed", "hr0", "hr1", "coords", "labels"]
    dynamic = {"coords": {0: "b"}, "labels": {0: "b"}, "masks": {0: "b"}, "iou": {0: "b"}}
    with torch.no_grad():
        torch.onnx.export(Graph(), (*photo.features, coords[:4], labels[:4]), str(path), input_names=names,
                          output_names=["masks", "iou"], dynamic_axes=dynamic, opset_version=17, dynamo=False)  # fmt: skip
    core = ov.Core()
    requests = {
        hint: core.compile_model(
            str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS}
        ).create_infer_request()
        for hint in ("f32", "bf16")
    }  # fmt: skip

    def infer(hint: str, p: Photo, c: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(names, (*(f.numpy() for f in p.features), c.numpy(), lab.numpy()), strict=True))
        return torch.from_numpy(requests[hint].infer(feeds)["masks"].copy())

    cases = {f"openvino {hint}: {n} in one call": (lambda h=hint, n=n: infer(h, photo, coords[:n], labels[:n]))
             for hint in requests for n in (10, 50)}  # fmt: skip
    times = timed(cases, repeats)
    ious: list[float] = []
    for p in photos:
        c, lab = gate_prompts(p)
        with torch.inference_mode():
            reference = sam2_decoder(model, p.features, c, lab)
        ious += mask_ious(infer("bf16", p, c, lab), reference, p.hw)
    return {
        "ms_per_box": {name: {k: v * 1e3 / int(name.split(": ")[1].split()[0]) for k, v in t.items()} for name, t in times.items()},
        "bf16_gate": {"prompts": len(ious), "min_iou": min(ious), "mean_iou": float(np.mean(ious))},
    }  # fmt: skip


def demo_gate() -> dict[str, Any]:
    """The bf16 policy's gate on the demo's SAM (trained on the shapes worlds, 256², 64 channels) over its held-out
    set (the int8 gate's shapes scenes and their ground-truth boxes), vs sam2's float32 decoder: why the gate is
    measured per served model."""
    from service.models.demo.profile import SHAPES_SAM2, SHAPES_SAM2_CONFIG, SHAPES_SAM2_OVERRIDES
    from service.models.loading import load_segmenter_module
    from service.runners.openvino import load_int8_images

    model = load_segmenter_module(SHAPES_SAM2_CONFIG, SHAPES_SAM2, SHAPES_SAM2_OVERRIDES, "cpu")
    size = int(model.image_size)
    processing = SegmenterProcessing(SegmenterSpec(image_size=size))
    decoder = sam_ops.PromptDecoder(model, sam_ops.decoder_policy("cpu", bf16=True))
    ious: list[float] = []
    scenes = load_int8_images().gate_scenes
    for scene in scenes:
        hw = (scene.rgb.shape[0], scene.rgb.shape[1])
        prompts = [SamPrompt(box, _NO_POINTS, _NO_LABELS) for box in scene.boxes]
        with torch.inference_mode():
            features = sam_ops.image_features(model, torch.from_numpy(processing.preprocess(np.array(scene.rgb))))
            for _, batch in processing.prompt_batches(prompts, hw, multimask=False):
                c, lab = torch.from_numpy(batch.point_coords), torch.from_numpy(batch.point_labels)
                reference = sam2_decoder(model, features, c, lab)
                ious += mask_ious(decoder(*features, c, lab, multimask=False)[0], reference, hw)
    return {"images": len(scenes), "prompts": len(ious), "min_iou": min(ious), "mean_iou": float(np.mean(ious))}


def machine() -> dict[str, str]:
    import importlib.metadata

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "cores": str(os.cpu_count()), "native_bf16": str(cpu_has_native_bf16()),
            "torch": torch.__version__, "sam2": importlib.metadata.version("sam2"),
            "python": platform.python_version()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO lever")
    parser.add_argument("--allocator", default=Settings.allocator, help="this process's malloc, as `detseg serve` sets")
    args = parser.parse_args()
    from service.startup import reexec_for_allocator

    reexec_for_allocator(args.allocator, ["-m", "tests.benchmarks.decoder_bench", *sys.argv[1:]])
    torch.set_num_threads(THREADS)
    model = seeded_sam()
    photos = photo_features(model)
    bus = photos[0]
    bf16 = cpu_has_native_bf16()
    serving = sam_ops.PromptDecoder(model, sam_ops.decoder_policy("cpu", bf16=bf16))
    execution = "torch-bf16" if bf16 else "torch-fp32"
    old_policy = sam_ops.PromptDecoder(model, dataclasses.replace(serving.policy, prompts_per_pass=None,
                                                                   upscale_group=None))  # fmt: skip
    exact = sam_ops.PromptDecoder(model, sam_ops.decoder_policy("cpu"))
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": THREADS, "allocator": args.allocator,
        "model": f"SAM 2.1 hiera-tiny ({TEST_SEGMENTER_CONFIG}) at {IMAGE_SIZE}², seed-0 random weights",
        "max_prompts_per_call": MAX_PROMPTS_PER_CALL,
        "serving": {"execution": execution, "prompts_per_pass": serving.policy.prompts_per_pass,
                    "upscale_group": serving.policy.upscale_group, "image_dtype": str(serving.policy.image_dtype)},
    }  # fmt: skip

    # 1. The serving path, the old policy (every prompt of a call in one pass) and the exact policy, interleaved.
    cases = {
        **decoder_cases(serving, bus, "serving"),
        **decoder_cases(old_policy, bus, "old policy (64 per pass)"),
        **decoder_cases(exact, bus, "float32 (torch backend)"),
    }
    coords, labels = gate_prompts(bus)
    for n in (1, 10, 50):
        cases[f"sam2 decoder: {n} in one call"] = (
            lambda n=n: sam2_decoder(model, bus.features, coords[:n], labels[:n])  # type: ignore[misc]
        )
    with torch.inference_mode():
        times = timed(cases, args.repeats)
    result["times_ms"] = {name: {k: v * 1e3 for k, v in t.items()} for name, t in times.items()}
    result["ms_per_box"] = {
        name: {k: v * 1e3 / int(name.split(": ")[1].split()[0]) for k, v in t.items()} for name, t in times.items()
    }

    # 2. Levers: passes of 4 / 16 / 64 prompts (bf16 where served so), threads.
    passes = {
        f"pass {n}": sam_ops.PromptDecoder(model, dataclasses.replace(serving.policy, prompts_per_pass=n))
        for n in (4, 16, 64)
    }
    lever_cases = {}
    for name, decoder in passes.items():
        batch = prompt_batches(bus, bus.boxes[:50])[0]
        lever_cases[f"{name}: 50 in one call"] = (
            lambda d=decoder, b=batch: decode_batch_timed(d, features_of(bus), b)  # type: ignore[misc]
        )
    with torch.inference_mode():
        lever_times = timed(lever_cases, args.repeats)
        thread_times = {}
        ten = prompt_batches(bus, bus.boxes[:10])[0]
        for threads in (1, THREADS):
            torch.set_num_threads(threads)
            thread_times[f"{threads} thread{'s' if threads > 1 else ''}: 10 in one call"] = timed(
                {"t": lambda: decode_batch_timed(serving, features_of(bus), ten)}, args.repeats
            )["t"]
        torch.set_num_threads(THREADS)
    result["levers_ms_per_box"] = {
        name: {k: v * 1e3 / int(name.split(": ")[1].split()[0]) for k, v in t.items()}
        for name, t in {**lever_times, **thread_times}.items()
    }

    # 3. The quality gate: final masks vs sam2's own float32 decoder, every box prompt of both photos.
    ious: dict[str, list[float]] = {"serving": [], "float32": []}
    for photo in photos:
        c, lab = gate_prompts(photo)
        with torch.inference_mode():
            reference = sam2_decoder(model, photo.features, c, lab)
            for name, decoder in (("serving", serving), ("float32", exact)):
                ious[name] += mask_ious(decoder(*photo.features, c, lab, multimask=False)[0], reference, photo.hw)
    result["gate"] = {
        name: {"prompts": len(v), "min_iou": min(v), "mean_iou": float(np.mean(v))} for name, v in ious.items()
    }
    result["demo_gate"] = demo_gate()
    if not args.no_openvino:
        with tempfile.TemporaryDirectory(prefix="detseg-decoder-bench-") as tmp:
            result["openvino"] = openvino_lever(model, photos, args.repeats, Path(tmp))

    per_box = result["ms_per_box"]
    calls = result["times_ms"]
    result["targets"] = {
        "one_call_vs_single_calls": calls["serving: 50 in one call"]["best"]
        / calls["serving: 50 one-box calls"]["best"],
        "max_ms_per_box_10_50": max(per_box[f"serving: {n} in one call"]["best"] for n in (10, 50)),
        "old_policy_one_call_vs_single_calls": calls["old policy (64 per pass): 50 in one call"]["best"]
        / calls["old policy (64 per pass): 50 one-box calls"]["best"],
        "gate_min_iou": result["gate"]["serving"]["min_iou"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "DECODER.md").write_text(report(result))
    print(report(result))


def decode_batch_timed(decoder: Any, features: ImageFeatures, batch: PromptBatch) -> Any:
    """One ``decode_batch`` call (the levers' unit of work)."""
    from service.runners.torch import decode_batch

    return decode_batch(decoder, features, batch, torch.from_numpy)


def report(r: dict[str, Any]) -> str:
    m, t, per_box, calls = r["machine"], r["targets"], r["ms_per_box"], r["times_ms"]

    def row(label: str, name: str) -> str:
        cells = [per_box[f"{name}: {n} in one call"] for n in (1, 10, 50)]
        single = per_box.get(f"{name}: 50 one-box calls")
        one = calls.get(f"{name}: 50 in one call")
        ratio = f"{one['best'] / calls[f'{name}: 50 one-box calls']['best']:.2f}" if single and one else "–"
        shown = " | ".join(f"{c['best']:.1f} ({c['median']:.1f})" for c in cells)
        singles = f"{single['best']:.1f} ({single['median']:.1f})" if single else "–"
        return f"| {label} | {shown} | {singles} | {ratio} |"

    s = r["serving"]
    gate, exact = r["gate"]["serving"], r["gate"]["float32"]
    lines = [
        "# SAM 2's mask decoder on the CPU",
        "",
        f"Measured {r['date']} with `python -m tests.benchmarks.decoder_bench` on {m['cpu']} ({m['cores']} cores, "
        f"native bf16: {m['native_bf16']}), {r['threads']} threads, {r['allocator']} allocator; torch {m['torch']}, "
        f"sam2 {m['sam2']}. Model: {r['model']} (the official architecture and FLOPs). Features of bus.jpg and "
        "zidane.jpg from the model's own encoder (float32). Times: best of the interleaved repeats, shuffled (median).",
        "",
        f"Serving path (`backend=openvino`, the CPU default, where the model passes its bf16 gate: "
        f"`service.runners.openvino.gated_decoder`): decoder {s['execution']}, passes of {s['prompts_per_pass']} prompts, upscaled {s['upscale_group']} at a time, "
        f"image tokens {s['image_dtype'].removeprefix('torch.')}; calls of at most {r['max_prompts_per_call']} prompts "
        "(`MAX_PROMPTS_PER_CALL`).",
        "",
        "## Targets",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| decoder, 50 boxes in one call / 50 one-box calls | {t['one_call_vs_single_calls']:.2f} | ≤ {TARGET_RATIO} |",
        f"| decoder ms per box at 10–50 boxes (worst of 10, 50) | {t['max_ms_per_box_10_50']:.1f} | "
        f"≤ {TARGET_MS_PER_BOX:.0f} |",
        f"| final masks vs sam2's fp32 decoder: min IoU over {gate['prompts']} box prompts (mean) | "
        f"{gate['min_iou']:.4f} ({gate['mean_iou']:.4f}) | ≥ {GATE_MIN_IOU} |",
        "",
        "## Milliseconds per box (bus.jpg)",
        "",
        "| decoder | 1 box | 10 boxes | 50 boxes (one call) | 50 one-box calls | 50 in one call / 50 calls |",
        "|---|---|---|---|---|---|",
        row("serving path", "serving"),
        row("old policy: every prompt of a call in one pass (64)", "old policy (64 per pass)"),
        row("float32 policy (torch backend; exact)", "float32 (torch backend)"),
        row("sam2's own decoder (image side copied per prompt)", "sam2 decoder"),
        "",
        f"Float32 policy vs sam2's decoder: final masks min IoU {exact['min_iou']:.6f} (mean {exact['mean_iou']:.6f}) "
        "over the same prompts: the same numbers to float rounding.",
        "",
        f"The bf16 gate is the served model's: the demo's SAM (shapes-trained, 256², 64 channels) on its held-out "
        f"shapes scenes ({r['demo_gate']['prompts']} boxes on {r['demo_gate']['images']} scenes): min IoU "
        f"{r['demo_gate']['min_iou']:.4f} (mean {r['demo_gate']['mean_iou']:.4f}), so it fails and the openvino "
        "backend serves its float32 decoder (`gated_decoder`; the figures are measured once per weights and stored "
        "beside the export).",
        "",
        "## Levers (ms per box, best (median))",
        "",
        "| lever | ms per box |",
        "|---|---|",
        *(f"| {name} | {v['best']:.1f} ({v['median']:.1f}) |" for name, v in r["levers_ms_per_box"].items()),
    ]
    if "openvino" in r:
        ov = r["openvino"]
        lines += [
            *(f"| {name} | {v['best']:.1f} ({v['median']:.1f}) |" for name, v in ov["ms_per_box"].items()),
            "",
            f"OpenVINO bf16 (its inference precision hint turns every op to bf16, token-side ones included): min mask "
            f"IoU {ov['bf16_gate']['min_iou']:.4f} (mean {ov['bf16_gate']['mean_iou']:.4f}) over "
            f"{ov['bf16_gate']['prompts']} prompts vs sam2's fp32 decoder.",
        ]
    lines += ["", WHAT_BOUNDS, ""]
    return "\n".join(lines)


WHAT_BOUNDS = """## What makes it fast, and what bounds it

- **Shared image side** (kept from before): without mask inputs every prompt's image tokens start equal, so block 1's
  image-side projections are computed once per call.
- **Re-associated attention** (new, exact): each attention between the 4096 image tokens and a prompt's 9 tokens pulls
  the 9 × 8 heads = 72 rows through the projection instead of projecting the image tokens per prompt (a (72, 256) ×
  (256, 4096) GEMM instead of (4096, 256) × (256, 128) ones, twice as many of which ran before), and the positional
  encoding's projections are computed once per model: the image-sized GEMMs per prompt drop from ~2.9 to ~1.9 GFLOP.
- **Upscaling as two per-pixel GEMMs** in channels-last order (the high-res features permuted once per call, not the
  activations per prompt), and only the mask tokens read: token 0 and the multimask output SAM 2's dynamic fallback
  could pick (single mask), or tokens 1-3 (multimask).
- **bf16 image tokens** on CPUs with bf16 dot products (AVX512_BF16 / AMX): the GEMMs run ~3× faster than fp32 and the
  elementwise work moves half the bytes; token-sized work, the softmax inputs' pe terms and the IoU head stay fp32.
- **Prompts per pass** (`sam_ops.DECODER_POLICIES`): on the rewritten decoder, passes of 16 and of 64 cost the same
  per box within run-to-run noise (passes of 4 ~15 % more), but a 64-box call in one pass peaks at +549 MB instead of
  +129 MB (bf16; fp32 +1243 / +499 MB), which the tuned allocator keeps: the CPU policy takes 16; a GPU takes a call
  at once. (The old decoder's ~16 was about its memory traffic; the rewrite moved that bound.)
- **Threads**: both cores (`threads` = cores) ~1.8× one. **OpenVINO** on the rewritten graph (exported per weights):
  f32 beats torch fp32 by ~15 %, but its bf16 (every op in bf16) fails the gate and is not faster than torch's bf16
  image tokens by enough to carry an export: not kept.
- **Before** (the previous shared path, same machine, measured once before the change): 47 / 38 / 36 ms per box at
  1 / 10 / 50 boxes on torch; the openvino backend sent calls of fewer than 4 prompts to the exported graph on ONNX
  Runtime (42 ms for one box here; RESULTS.md: 50 boxes in one call 2588 ms vs 50 one-box calls 1726 ms, ratio 1.50).
- **Bound**: at 10–50 boxes about half the time is GEMMs near this CPU's bf16 peak (~1.9 GFLOP per box) and half is
  memory-bound elementwise work over the per-prompt image tokens (LayerNorms, GELUs, softmaxes: ~4 MB per prompt per
  pass in bf16). A one-box call also pays the call's image side (~12 ms: block 1's projections, the high-res features'
  permutes), which is why 50 one-box calls cost about twice 50 boxes in one call and not more."""


if __name__ == "__main__":
    main()
