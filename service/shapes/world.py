"""Deterministic scene generator: textured backgrounds with 1–8 coloured, rotated shapes of 5 classes.

Each scene is a pure function of its seed. Shapes are painted back to front, so later shapes occlude
earlier ones; ground truth is the *visible* part of each shape (mask, and the box around it). Scenes whose
placement would leave an instance less than ``MIN_VISIBLE`` of its area visible are re-drawn, so every
annotated object is recognisable. Some shapes are placed touching the previous one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "hexagon")
MIN_VISIBLE = 0.45
SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}


@dataclasses.dataclass(frozen=True)
class ShapeInstance:
    """category_id indexes CLASSES; mask: (H, W) bool visible pixels; box: (x0, y0, x1, y1) float, XYXY,
    pixel-edge coordinates around the visible mask (x1 = last column + 1)."""

    category_id: int
    mask: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def category(self) -> str:
        return CLASSES[self.category_id]


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: tuple[ShapeInstance, ...]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def split_seed(split: str, index: int) -> int:
    return SPLIT_SEED_BASE[split] + index


def _outline(category: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape of circumradius r centred at (cx, cy), rotated by angle (rad)."""
    if category == 0:  # circle
        k, radii = 72, [r]
    elif category == 1:  # square
        k, radii = 4, [r]
    elif category == 2:  # triangle
        k, radii = 3, [r]
    elif category == 3:  # star: alternate outer/inner radius
        k, radii = 10, [r, r * 0.45]
    else:  # hexagon
        k, radii = 6, [r]
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / k),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / k))
        for i in range(k)
    ]  # fmt: skip


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour noise + stripes or blotches + pixel noise, float32 (H, W, 3) in [0, 255]."""
    base = rng.uniform(40, 200, 3)
    grid = rng.normal(0, 35, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    low = np.stack(
        [np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1
    )
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)[..., None]
    texture = stripes * rng.uniform(0, 18) * rng.uniform(0.5, 1, 3)
    noise = rng.normal(0, rng.uniform(3, 12), (h, w, 3))
    return (base + low + texture + noise).astype(np.float32)


def _colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A saturated colour far enough from the background's mean to stay visible."""
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        c[rng.integers(0, 3)] = rng.choice([rng.uniform(0, 50), rng.uniform(205, 255)])
        if np.abs(c - background_mean).sum() > 160:
            return c
    return 255.0 - background_mean


def place(
    rng: np.random.Generator, previous: tuple[float, float, float] | None, r: float, w: int, h: int, margin: float = 0.6
) -> tuple[float, float]:
    """The centre (px) of a shape of circumradius ``r`` on a w × h canvas: touching ``previous`` (its cx, cy, r) 30 %
    of the time, else anywhere at least ``margin`` × r from the edges. The worlds' shared placement (its draws are
    part of their pinned pixels)."""
    if previous is not None and rng.random() < 0.3:  # touching the previous shape
        px, py, pr = previous
        a = rng.uniform(0, 2 * math.pi)
        dist = (pr + r) * rng.uniform(0.75, 0.95)
        return px + dist * math.cos(a), py + dist * math.sin(a)
    return rng.uniform(r * margin, w - r * margin), rng.uniform(r * margin, h - r * margin)


def render_scene(seed: int) -> Scene:
    """The scene of ``seed``: same seed, same pixels and annotations, on any machine."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(256, 641, 2))
    canvas = _background(rng, h, w)
    bg_mean = canvas.reshape(-1, 3).mean(0)
    n = int(rng.integers(1, 9))
    side = min(h, w)
    full_masks: list[np.ndarray] = []
    categories: list[int] = []
    previous: tuple[float, float, float] | None = None
    for _ in range(n):
        for _attempt in range(30):
            category = int(rng.integers(0, len(CLASSES)))
            r = float(rng.uniform(0.06, 0.2) * side)
            cx, cy = place(rng, previous, r, w, h)
            angle = float(rng.uniform(0, 2 * math.pi))
            img = Image.new("L", (w, h), 0)
            ImageDraw.Draw(img).polygon(_outline(category, cx, cy, r, angle), fill=1)
            mask = np.asarray(img, dtype=bool)
            if mask.sum() < 150:
                continue
            pairs = enumerate(zip([m & ~mask for m in full_masks], full_masks, strict=True))
            if all(_visible_ok(v, m, full_masks, i) for i, (v, m) in pairs):
                full_masks.append(mask)
                categories.append(category)
                previous = (cx, cy, r)
                colour = _colour(rng, bg_mean)
                shade = rng.normal(0, 8, (h, w, 1)) + np.linspace(-15, 15, w)[None, :, None] * rng.uniform(-1, 1)
                canvas[mask] = (colour + shade[mask]).reshape(-1, 3)
                break
    image = np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)
    instances = []
    for i, (category, mask) in enumerate(zip(categories, full_masks, strict=True)):
        visible = mask.copy()
        for later in full_masks[i + 1 :]:
            visible &= ~later
        ys, xs = np.nonzero(visible)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        instances.append(ShapeInstance(category, visible, box))
    return Scene(seed=seed, image=image, instances=tuple(instances))


def _visible_ok(visible: np.ndarray, full: np.ndarray, all_masks: list[np.ndarray], index: int) -> bool:
    """After the new shape, instance ``index`` (already occluded by later shapes) keeps MIN_VISIBLE of its area."""
    for later in all_masks[index + 1 :]:
        visible = visible & ~later
    return visible.sum() >= MIN_VISIBLE * full.sum()


class LabeledScene(Protocol):
    """What a YOLO label file needs of a scene of either world: its size and its instances (each with a ``box``,
    original pixels XYXY)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def instances(self) -> Sequence[Any]: ...


def yolo_label_lines(scene: LabeledScene, class_id: Callable[[Any], int] = lambda inst: inst.category_id) -> list[str]:
    """One "class cx cy w h" line per instance, normalised to [0, 1]; ``class_id``: an instance's label id (the
    shape's by default; the attribute world passes its fine ids)."""
    lines = []
    for inst in scene.instances:
        x0, y0, x1, y1 = inst.box
        cx, cy = (x0 + x1) / 2 / scene.width, (y0 + y1) / 2 / scene.height
        bw, bh = (x1 - x0) / scene.width, (y1 - y0) / scene.height
        lines.append(f"{class_id(inst)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines
