"""Client-side rendering of a SegmentResponse over its image (for ``detseg segment --out``)."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from pycocotools import mask as mask_utils


def decode_rle(size: list[int], counts: bytes) -> np.ndarray:
    """COCO RLE → (H, W) bool."""
    return mask_utils.decode({"size": list(size), "counts": counts}).astype(bool)


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def render_overlay(image_bytes: bytes, instances: list[dict], alpha: float = 0.5) -> bytes:
    """Draws masks (alpha-blended), boxes and "label score" tags; returns PNG bytes.

    ``instances`` are dicts with label, score, box [x0, y0, x1, y1] and rle {size, counts}; the image is
    shown EXIF-transposed, the frame the service answers in.
    """
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB")
    canvas = np.asarray(img, dtype=np.float32).copy()
    for i, inst in enumerate(instances):
        if "rle" in inst:
            m = decode_rle(inst["rle"]["size"], inst["rle"]["counts"])
            canvas[m] = canvas[m] * (1 - alpha) + np.array(_colour(i), np.float32) * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, inst in enumerate(instances):
        x0, y0, x1, y1 = inst["box"]
        draw.rectangle((x0, y0, x1, y1), outline=_colour(i), width=2)
        tag = f"{inst['label']} {inst['score']:.2f}"
        tx, ty = x0 + 2, max(0.0, y0 - 12)
        draw.rectangle((tx - 2, ty, tx + 6 * len(tag) + 2, ty + 11), fill=_colour(i))
        draw.text((tx, ty), tag, fill=(0, 0, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
