"""JPEG decoding before and after TorchCodec (issue 22), in one run on the same bytes (not a test).

    python -m tests.benchmarks.jpeg_bench [--out benchmarks] [--device cuda] [--repeats 5] [--threads 2]

- **pillow**: the decoder before, kept here as the baseline: Pillow's JPEG plugin decodes, ``exif_transpose`` and the
  conversion to an (H, W, 3) array follow (what ``decode_image`` did for every JPEG).
- **torchcodec cpu**: ``decode_image`` as served (``jpeg_device`` cpu): TorchCodec's libjpeg-turbo into the array.
- **torchcodec cuda** (``--device cuda``): ``decode_image`` with ``jpeg_device`` cuda: nvJPEG, pixels copied back to
  the host; and TorchCodec's batched call (a list of ``--batch`` images at once, left on the device), to see whether
  batching requests' images would pay.

Images: ultralytics' bus.jpg resized (aspect kept) to 0.3, 1, 4 and 12 MP, saved by Pillow at quality 90 (4:2:0,
baseline), and at 12 MP also progressive and 4:4:4. Per decoder and image: the median time of ``--repeats`` decodes
after one unmeasured, the throughput of ``--threads`` threads decoding at once (the server decodes on its event
loop's executor threads), and the pixels' difference from Pillow's. Writes ``<out>/JPEG.md`` and ``<out>/jpeg.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchcodec
from PIL import Image, ImageOps, JpegImagePlugin
from torchcodec.decoders import decode_jpeg

from service.pipeline.image import ImageLimits, _to_rgb, decode_image
from tests.conftest import ultralytics_asset

LIMITS = ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30, max_side=1 << 16)
SIDES = {"0.3 MP": (480, 640), "1 MP": (866, 1155), "4 MP": (1732, 2309), "12 MP": (3000, 4000)}


def images() -> dict[str, bytes]:
    """Name → JPEG bytes of bus.jpg at each size (and the 12 MP variants)."""
    bus = Image.open(ultralytics_asset("bus.jpg")).convert("RGB")
    out = {}
    for name, (h, w) in SIDES.items():
        photo = bus.resize((w, h), Image.Resampling.BICUBIC)
        variants = {"": {}} if name != "12 MP" else {"": {}, ", progressive": {"progressive": True}}
        if name == "12 MP":
            variants[", 4:4:4"] = {"subsampling": 0}
        for suffix, options in variants.items():
            buf = io.BytesIO()
            photo.save(buf, format="JPEG", quality=90, **options)
            out[name + suffix] = buf.getvalue()
    return out


def pillow(data: bytes) -> np.ndarray:
    """The decoder before: Pillow's pixels in the displayed frame."""
    img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    img.load()
    return _to_rgb(ImageOps.exif_transpose(img) or img)


def timed(decode: Callable[[], Any], repeats: int) -> float:
    decode()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(decode: Callable[[], Any], threads: int, per_thread: int) -> float:
    """Images per second with ``threads`` threads each decoding ``per_thread`` images at once."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: decode(), range(threads)))  # warm every thread
        start = time.perf_counter()
        list(pool.map(lambda _: [decode() for _ in range(per_thread)], range(threads)))
        return threads * per_thread / (time.perf_counter() - start)


def difference(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    d = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return {"max": int(d.max()), "mean": float(d.mean()), "differing": float((d > 0).mean())}


def orientations(device: str) -> dict[int, dict[str, Any]]:
    """Per EXIF orientation 1-8 of a 480 × 640 photo: whether ``decode_image`` on ``device`` gives Pillow's frame
    (the same shape, and a mean difference like the upright image's, not a turned image's)."""
    photo = np.asarray(Image.open(ultralytics_asset("bus.jpg")).convert("RGB").resize((640, 480)))
    out = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
        ours, reference = decode_image(buf.getvalue(), LIMITS, jpeg_device=device).rgb, pillow(buf.getvalue())
        same = ours.shape == reference.shape
        out[orientation] = {"shape": same, **(difference(ours, reference) if same else {})}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    decoders: dict[str, Callable[[bytes], np.ndarray]] = {
        "pillow": pillow,
        "torchcodec cpu": lambda data: decode_image(data, LIMITS).rgb,
    }
    if args.device != "cpu":
        decoders[f"torchcodec {args.device}"] = lambda data: decode_image(data, LIMITS, jpeg_device=args.device).rgb
    rows = []
    for name, data in images().items():
        reference = pillow(data)
        for decoder, decode in decoders.items():
            seconds = timed(lambda decode=decode, data=data: decode(data), args.repeats)
            rate = throughput(lambda decode=decode, data=data: decode(data), args.threads, args.repeats)
            row = {"image": name, "bytes": len(data), "decoder": decoder, "seconds": seconds, "images_per_s": rate}
            rows.append(row | {"vs_pillow": difference(decode(data), reference)})
            print(json.dumps(rows[-1]), flush=True)
        if args.device != "cpu":
            batch = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * args.batch

            def batched(batch: list[torch.Tensor] = batch) -> None:
                decode_jpeg(batch, device=args.device)
                torch.cuda.synchronize()

            seconds = timed(batched, args.repeats) / args.batch
            rows.append(
                {
                    "image": name,
                    "bytes": len(data),
                    "decoder": f"torchcodec {args.device}, batch of " f"{args.batch} on the device",
                    "seconds": seconds,
                    "images_per_s": 1 / seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else None,
            "pillow": PIL.__version__,
            "torchcodec": torchcodec.__version__,
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "threads": args.threads,
        "rows": rows,
        "orientations": {device: orientations(device) for device in dict.fromkeys(["cpu", args.device])},
    }


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# JPEG decoding: Pillow vs TorchCodec",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `python -m tests.benchmarks.jpeg_bench` on {m['cpu']} "
        f"({m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}); Pillow {m['pillow']}, TorchCodec "
        f"{m['torchcodec']}, torch {m['torch']}. Images: bus.jpg resized, quality 90 (4:2:0 baseline unless named). "
        f"Time: median of {result['repeats']} decodes; throughput: {result['threads']} threads decoding at once; "
        "difference: |ours − Pillow's| over every value (max, mean, share of values that differ).",
        "",
        "| image | decoder | ms | vs Pillow | img/s, threads | vs Pillow | max diff | mean diff | values differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["image"]: r for r in result["rows"] if r["decoder"] == "pillow"}
    for r in result["rows"]:
        b, diff = base[r["image"]], r.get("vs_pillow")
        cells = [
            r["image"],
            r["decoder"],
            f"{r['seconds'] * 1000:.1f}",
            f"{r['seconds'] / b['seconds']:.2f}",
            f"{r['images_per_s']:.1f}" if diff else "–",
            f"{r['images_per_s'] / b['images_per_s']:.2f}×" if diff else "–",
            str(diff["max"]) if diff else "–",
            f"{diff['mean']:.4f}" if diff else "–",
            f"{diff['differing']:.2%}" if diff else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "EXIF orientations 1-8 (480 × 640): Pillow's frame, and the mean difference from Pillow's pixels:",
        "",
    ]
    for device, turned in result["orientations"].items():
        cells = [
            f"{o}: {'same frame' if t['shape'] else 'OTHER FRAME'}" + (f", {t['mean']:.3f}" if t["shape"] else "")
            for o, t in turned.items()
        ]
        lines.append(f"- {device}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--device", default="cpu", help="also decode on this CUDA device (nvJPEG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads decoding at once for the throughput")
    parser.add_argument("--batch", type=int, default=8, help="images per batched call on the device")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server's threads other than the runner's
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jpeg.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "JPEG.md").write_text(report(result))


if __name__ == "__main__":
    main()
