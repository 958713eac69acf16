"""Mask encodings: COCO RLE (pycocotools), polygons (OpenCV contours), PNG (Pillow)."""

from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

RLE, POLYGON, PNG = "coco_rle", "polygon", "png"
ENCODINGS = (RLE, POLYGON, PNG)


@dataclasses.dataclass(frozen=True)
class EncodedMask:
    """One mask at original resolution in one encoding.

    rle_counts: pycocotools compressed counts (bytes); polygons: flattened [x0, y0, x1, y1, ...] lists in
    original-image pixels; png: 8-bit grayscale PNG bytes (255 = object).
    """

    height: int
    width: int
    encoding: str
    rle_counts: bytes = b""
    polygons: tuple[tuple[float, ...], ...] = ()
    png: bytes = b""


def encode_masks(masks: np.ndarray, encoding: str) -> list[EncodedMask]:
    """masks: (N, H, W) bool → N EncodedMask."""
    n, h, w = masks.shape
    if encoding == RLE:
        if n == 0:
            return []
        # (H, W, N) column-major uint8: free when ``masks`` is a view of such memory (SegmenterProcessing).
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).view(np.uint8)))
        return [EncodedMask(h, w, RLE, rle_counts=r["counts"]) for r in rles]
    if encoding == POLYGON:
        return [EncodedMask(h, w, POLYGON, polygons=_polygons(m)) for m in masks]
    if encoding == PNG:
        return [EncodedMask(h, w, PNG, png=_png(m)) for m in masks]
    raise ValueError(f"unknown mask encoding {encoding!r}")


def _polygons(mask: np.ndarray) -> tuple[tuple[float, ...], ...]:
    image = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(image, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return tuple(tuple(float(v) for v in c.reshape(-1)) for c in contours if len(c) >= 3)


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()
