"""Client-side rendering of instances over their image (``detseg segment --out``, ``detseg track --out``)."""

from __future__ import annotations

import colorsys
import dataclasses
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from service.pixels import upright_rgb


def decode_rle(size: list[int], counts: bytes) -> np.ndarray:
    """COCO RLE → (H, W) bool."""
    return mask_utils.decode({"size": list(size), "counts": counts}).astype(bool)


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


# Overlay image formats by file extension (Pillow's format names).
OVERLAY_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def render_overlay(image_bytes: bytes, instances: list[dict], alpha: float = 0.5, format: str = "PNG") -> bytes:
    """Draws masks (alpha-blended), boxes and "label score" tags; returns the image's bytes in ``format`` (one of
    OVERLAY_FORMATS' values).

    ``instances`` are dicts with label, score, box [x0, y0, x1, y1] and rle {size, counts}; the image is
    shown EXIF-transposed, the frame the service answers in, and converted to RGB as the server converts it
    (``service.pixels.upright_rgb``: 16-bit scaled, alpha over white; a plain conversion drew a 16-bit grey image white
    and a transparent one black).
    """
    opened = Image.open(io.BytesIO(image_bytes))
    rgb = upright_rgb(opened)
    drawn = [
        Drawn(
            colour=i,
            mask=decode_rle(inst["rle"]["size"], inst["rle"]["counts"]) if "rle" in inst else None,
            box=inst["box"],
            tag=f"{inst['label']} {inst['score']:.2f}",
        )
        for i, inst in enumerate(instances)
    ]
    buf = io.BytesIO()
    draw_instances(rgb, drawn, alpha).save(buf, format=format)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Drawn:
    """One instance to draw: ``colour`` (an index: the same index, the same colour), mask (H, W) bool or None, box
    XYXY original pixels, and its tag."""

    colour: int
    mask: np.ndarray | None
    box: Sequence[float]
    tag: str


def draw_instances(rgb: np.ndarray, instances: Sequence[Drawn], alpha: float = 0.5) -> Image.Image:
    """``rgb`` (H, W, 3) uint8 with every mask alpha-blended in its colour, then every box and tag over them."""
    canvas = np.asarray(rgb, dtype=np.float32).copy()
    for inst in instances:
        if inst.mask is not None:
            canvas[inst.mask] = canvas[inst.mask] * (1 - alpha) + np.array(_colour(inst.colour), np.float32) * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for inst in instances:
        x0, y0, x1, y1 = inst.box
        colour = _colour(inst.colour)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        tx, ty = x0 + 2, max(0.0, y0 - 12)
        draw.rectangle((tx - 2, ty, tx + 6 * len(inst.tag) + 2, ty + 11), fill=colour)
        draw.text((tx, ty), inst.tag, fill=(0, 0, 0))
    return out
