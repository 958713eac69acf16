"""The shifted shapes world: a domain the demo models have not seen (for domain adaptation), with one new class.

A fourth image world beside ``world.render_scene`` (which stays byte-identical; this module only imports its
helpers). Scenes are ``world.Scene``s of ``world.ShapeInstance``s, so ``dataset.coco_annotations`` and
``world.yolo_label_lines`` take them unchanged; ``category_id`` indexes ``SHIFTED_CLASSES``: the five old shapes
and "cross" (id 5, a Greek cross, drawn with probability ``CROSS_RATE``), like a new SKU. ``ShapeInstance.category``
knows only the old five: name a cross with ``shifted_category``, and give COCO files ``coco_categories()``.

Each scene is a pure function of its seed; its parameters are drawn from it, in this order:

- **Size**: width and height in ``SIZE`` px, as in the plain world.
- **Texture** (plain world: low-frequency blotches and 8–40 px stripes): one of ``TEXTURES`` (fine wood grain,
  plain-weave fabric, a rotated checkerboard, two-scale gravel) with period or cell size ``TEXTURE_PERIOD`` px and
  amplitude ``TEXTURE_AMPLITUDE`` grey levels (tinted per channel), over a base colour and a linear gradient.
- **Blur**: Gaussian, sigma ``BLUR_SIGMA`` px, over the whole painted image (the optics).
- **Sensor noise**: Gaussian, ``NOISE_SIGMA`` grey levels per pixel and channel, added after the blur.
- **Shapes**: ``OBJECTS`` of them, circumradius ``RADIUS`` × the shorter side (plain world: 0.06–0.2), placed
  and occluded as in the plain world (every instance keeps ``MIN_VISIBLE`` of its area; some touch the previous
  one). Low contrast: a shape's base colour lies ``CONTRAST`` (Euclidean RGB) from the mean of the canvas around
  it (its box grown by a third of its radius, outside any shape), and at least ``CONTRAST[0]`` from every earlier
  shape visible there (plain world: L1 > 160 from the image mean, i.e. Euclidean > 92). A shape carries
  ``SHAPE_TEXTURE`` of the background's texture and a faint shading ramp.

Masks are the exact visible pixels of the painted polygons (before blur); boxes are pixel-edge XYXY around them.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from service.shapes.world import CLASSES, MIN_VISIBLE, Scene, ShapeInstance, _outline, place

SHIFTED_CLASSES = (*CLASSES, "cross")
CROSS = SHIFTED_CLASSES.index("cross")
CROSS_RATE = 0.18  # chance a shape is a cross; else one of the five old classes, uniformly
CROSS_ARM = 1 / 3  # arm half-width / arm length (centre to tip)
TEXTURES = ("wood", "fabric", "checker", "gravel")
SIZE = (256, 640)  # width and height, px (inclusive)
TEXTURE_PERIOD = (5.0, 11.0)  # px: grain, thread or cell period
TEXTURE_AMPLITUDE = (22.0, 40.0)  # grey levels
BLUR_SIGMA = (0.8, 2.0)  # px
NOISE_SIGMA = (5.0, 12.0)  # grey levels
OBJECTS = (1, 8)  # shapes per scene (inclusive; occlusion limits can leave fewer)
RADIUS = (0.05, 0.16)  # circumradius / shorter side
CONTRAST = (20.0, 40.0)  # Euclidean RGB distance of a shape's base colour from its surroundings
SHAPE_TEXTURE = (0.2, 0.7)  # fraction of the background texture a shape carries
# Far from the plain (0–3 M), attribute (10–13 M) and video (20–23 M) worlds' seeds; 1 M seeds per split.
SPLIT_SEED_BASE = {"train": 30_000_000, "val": 31_000_000, "test": 32_000_000}


def split_seed(split: str, index: int) -> int:
    return SPLIT_SEED_BASE[split] + index


def shifted_scenes(split: str, count: int, start: int = 0) -> list[Scene]:
    """``count`` scenes of ``split`` (train | val | test), deterministic."""
    return [render_shifted_scene(split_seed(split, i)) for i in range(start, start + count)]


def shifted_category(instance: ShapeInstance) -> str:
    """The class name of an instance of this world (``instance.category`` fails on a cross)."""
    return SHIFTED_CLASSES[instance.category_id]


def coco_categories() -> list[dict[str, Any]]:
    """COCO ``categories`` for this world (ids start at 1, as ``dataset.coco_annotations`` writes them)."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHIFTED_CLASSES)]


def _cross_outline(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The 12 vertices (pixels) of a Greek cross with arms of length r from (cx, cy), rotated by angle (rad)."""
    a = r * CROSS_ARM
    local = [(r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a), (-a, -r), (a, -r)]
    local.append((a, -a))
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


def _polygon_mask(points: list[tuple[float, float]], h: int, w: int) -> np.ndarray:
    """(h, w) bool: the pixels cv2 fills for the polygon (vertices in pixels, 1/16 px precision)."""
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(points) * 16).astype(np.int32)], (1,), lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) float64, roughly zero-mean in [-1.5, 1.5]: one of TEXTURES, rotated by a random angle."""
    kind = TEXTURES[int(rng.integers(0, len(TEXTURES)))]
    period = float(rng.uniform(*TEXTURE_PERIOD))
    theta = float(rng.uniform(0, math.pi))
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = yy * math.cos(theta) - xx * math.sin(theta)
    if kind == "wood":  # grain lines, bent along their length, each line a little lighter or darker
        bent = u + rng.uniform(2, 8) * np.sin(v * 2 * math.pi / rng.uniform(40, 120) + rng.uniform(0, 2 * math.pi))
        line = np.floor(bent / period).astype(np.int64)
        shade = rng.normal(0, 0.4, int(line.max() - line.min()) + 1)[line - line.min()]
        return 0.9 * np.sin(bent * 2 * math.pi / period) + shade
    cell_u, cell_v = np.floor(u / period), np.floor(v / period)
    if kind == "fabric":  # plain weave: each cell shows a warp or a weft thread on top
        over = (cell_u + cell_v) % 2 == 0
        thread = np.where(over, np.abs(np.sin(u * math.pi / period)), np.abs(np.sin(v * math.pi / period)))
        return 2.0 * thread - 1.2
    if kind == "checker":  # ±1 cells, each with its own slight offset
        iu, iv = (cell_u - cell_u.min()).astype(np.int64), (cell_v - cell_v.min()).astype(np.int64)
        cells = rng.normal(0, 0.25, (int(iu.max()) + 1, int(iv.max()) + 1))
        return np.where((cell_u + cell_v) % 2 == 0, 1.0, -1.0) + cells[iu, iv]
    # gravel: stones of two sizes (axis-aligned cells, shifted), summed
    out = np.zeros((h, w))
    for size, weight in ((period, 0.8), (period * 0.55 + 1, 0.6)):
        s = max(2, round(size))
        grid = rng.normal(0, weight, (h // s + 2, w // s + 2))
        oy, ox = (int(o) for o in rng.integers(0, s, 2))
        out += grid[(np.arange(h)[:, None] + oy) // s, (np.arange(w)[None, :] + ox) // s]
    return out


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float64 image (reflect-101 borders), in numpy's exact elementwise
    arithmetic (a fixed order of taps), so the result does not depend on the machine's SIMD width."""
    radius = max(1, math.ceil(3 * sigma))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = math.fsum(taps)
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, tap in enumerate(taps):
            acc += (tap / total) * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def _colour(
    rng: np.random.Generator,
    canvas: np.ndarray,
    owner: np.ndarray,
    mask: np.ndarray,
    margin: int,
    colours: list[np.ndarray],
) -> np.ndarray:
    """A base colour CONTRAST from the background around ``mask`` and >= CONTRAST[0] from neighbouring shapes."""
    ys, xs = np.nonzero(mask)
    region = np.s_[max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1]
    around, who = ~mask[region], owner[region]
    background = canvas[region][around & (who < 0)]
    reference = (background if len(background) else canvas[region][around]).mean(0)
    neighbours = [colours[k] for k in np.unique(who[around]) if k >= 0]
    for _ in range(50):
        direction = rng.normal(0, 1, 3)
        colour = np.clip(reference + direction / np.linalg.norm(direction) * rng.uniform(*CONTRAST), 0, 255)
        if all(np.linalg.norm(colour - ref) >= CONTRAST[0] for ref in [reference, *neighbours]):
            return colour
    return np.clip(reference + (CONTRAST[1] if reference.mean() < 128 else -CONTRAST[1]), 0, 255)


def render_shifted_scene(seed: int) -> Scene:
    """The shifted scene of ``seed``: same seed, same pixels and annotations, on any machine.

    Returns a Scene whose image is (H, W, 3) uint8 RGB; instances in paint order (back to front)."""
    return _render(seed)[0]


def _render(seed: int) -> tuple[Scene, list[np.ndarray]]:
    """The scene of ``seed`` and each instance's full (unoccluded, in-image) mask, (H, W) bool."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(SIZE[0], SIZE[1] + 1, 2))
    texture = _texture(rng, h, w)[..., None] * rng.uniform(*TEXTURE_AMPLITUDE) * rng.uniform(0.6, 1.0, 3)
    slope = rng.uniform(-15, 15, 2) / max(h, w)
    ramp = np.arange(h)[:, None, None] * slope[0] + np.arange(w)[None, :, None] * slope[1]
    canvas = rng.uniform(50, 200, 3) + ramp + texture
    blur_sigma, noise_sigma = float(rng.uniform(*BLUR_SIGMA)), float(rng.uniform(*NOISE_SIGMA))
    n = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    side = min(h, w)
    owner = np.full((h, w), -1, np.int64)  # index of the shape on top of each pixel, -1 for background
    categories: list[int] = []
    full_masks: list[np.ndarray] = []
    colours: list[np.ndarray] = []
    previous: tuple[float, float, float] | None = None
    for _ in range(n):
        for _attempt in range(30):
            category = CROSS if rng.random() < CROSS_RATE else int(rng.integers(0, len(CLASSES)))
            r = float(rng.uniform(*RADIUS) * side)
            cx, cy = place(rng, previous, r, w, h)
            angle = float(rng.uniform(0, 2 * math.pi))
            outline = _cross_outline(cx, cy, r, angle) if category == CROSS else _outline(category, cx, cy, r, angle)
            mask = _polygon_mask(outline, h, w)
            if mask.sum() < 150:
                continue
            visible = np.bincount(owner[owner >= 0], minlength=len(categories))
            lost = np.bincount(owner[mask & (owner >= 0)], minlength=len(categories))
            if np.all(visible - lost >= MIN_VISIBLE * np.asarray([m.sum() for m in full_masks], np.float64)):
                colour = _colour(rng, canvas, owner, mask, max(3, round(r / 3)), colours)
                ys, xs = np.nonzero(mask)
                phi = rng.uniform(0, 2 * math.pi)
                shade = ((xs - cx) * math.cos(phi) + (ys - cy) * math.sin(phi)) / r * rng.uniform(0, 8)
                canvas[ys, xs] = colour + rng.uniform(*SHAPE_TEXTURE) * texture[ys, xs] + shade[:, None]
                owner[mask] = len(categories)
                categories.append(category)
                full_masks.append(mask)
                colours.append(colour)
                previous = (cx, cy, r)
                break
    blurred = _blur(np.clip(canvas, 0, 255), blur_sigma)
    image = np.clip(np.rint(blurred + rng.normal(0, noise_sigma, blurred.shape)), 0, 255).astype(np.uint8)
    instances = []
    for i, category in enumerate(categories):
        visible_mask = owner == i
        ys, xs = np.nonzero(visible_mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        instances.append(ShapeInstance(category, visible_mask, box))
    return Scene(seed=seed, image=image, instances=tuple(instances)), full_masks
