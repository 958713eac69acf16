"""Small test helpers: image bytes, RLE decoding, mask IoU."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.proto.detseg.v1 import detseg_pb2 as pb


def encode(rgb: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def load_rgb(path: object) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))  # type: ignore[arg-type]


def synthetic_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A noisy background with a few filled rectangles and discs."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    side = min(height, width)
    for _ in range(3):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(side // 10 + 1, side // 4 + 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(150, 255, 3)
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        img[y0 : y0 + side // 4, x0 : x0 + side // 4] = rng.integers(0, 255, 3)
    return img


def rle_mask(mask: pb.Mask) -> np.ndarray:
    """pb.Mask (COCO RLE) → (H, W) bool via pycocotools."""
    rle = {"size": list(mask.coco_rle.size), "counts": mask.coco_rle.counts}
    return mask_utils.decode(rle).astype(bool)


def mask_overflow(mask: np.ndarray, box: pb.BoundingBox) -> float:
    """How far (px) a (H, W) bool mask reaches beyond its XYXY box: 0 when inside (or empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0.0
    return max(0.0, box.x_min - cols[0], box.y_min - rows[0], cols[-1] + 1 - box.x_max, rows[-1] + 1 - box.y_max)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# SAM's masks untouched (no clipping, hole filling or island removal): what SAM2ImagePredictor returns.
RAW_MASKS = pb.MaskRefinement(disabled=True)


def segment_request(data: bytes, classes: tuple[str, ...] = (), **options: object) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=pb.Image(encoded=data), classes=list(classes), options=pb.SegmentOptions(**options))


def assert_same_instances(embedded: pb.SegmentResponse, other: pb.SegmentResponse, stats: dict) -> None:
    """Same instances (label, box within 1 px, mask IoU >= 0.99), matched by label and box distance."""
    assert other.image.sha256 == embedded.image.sha256
    # Instances whose score sits right at the threshold may flip with float noise; compare the clear ones.
    want = [i for i in embedded.instances if i.score > 0.3]
    got = list(other.instances)
    assert len(got) >= len(want)
    for e in want:
        candidates = [t for t in got if t.label == e.label]
        assert candidates, f"no {e.label} in the second answer"
        t = min(candidates, key=lambda t: _box_distance(t.box, e.box))
        stats["box"] = max(stats.get("box", 0.0), _box_distance(t.box, e.box))
        stats["iou"] = min(stats.get("iou", 1.0), mask_iou(rle_mask(t.mask), rle_mask(e.mask)))
        stats["score"] = max(stats.get("score", 0.0), abs(t.score - e.score))
        stats["n"] = stats.get("n", 0) + 1
    assert stats.get("box", 0.0) <= 1.0 and stats.get("iou", 1.0) >= 0.99


def _box_distance(a: pb.BoundingBox, b: pb.BoundingBox) -> float:
    return max(abs(a.x_min - b.x_min), abs(a.y_min - b.y_min), abs(a.x_max - b.x_max), abs(a.y_max - b.y_max))


def seeded_decoder_sam():  # type: ignore[no-untyped-def]
    """SAM 2.1 hiera-tiny at 256², seed 3, every mask-decoder parameter given a value (seeded random init leaves some
    at zero) and a random "no mask" embedding: what the decoder rewrites are checked on."""
    import torch
    from sam2.build_sam import build_sam2

    from service.models.testing import TEST_SEGMENTER_CONFIG

    torch.manual_seed(3)
    model = build_sam2(
        TEST_SEGMENTER_CONFIG, None, device="cpu", mode="eval", hydra_overrides_extra=["++model.image_size=256"]
    )
    with torch.no_grad():
        for p in model.sam_mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.sam_prompt_encoder.no_mask_embed.weight.normal_()
    return model
