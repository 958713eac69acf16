"""The attribute shapes world: the five shapes in named colours and two sizes, for text-prompted detection.

A second, separate world beside ``world.render_scene`` (which stays byte-identical: the shipped demo models and
their quality tests depend on it). Each scene is a pure function of its seed, as there.

- **Colours**: every shape is painted in one of ``PALETTE``'s eight named colours (its RGB value plus a uniform
  jitter of at most ``COLOUR_JITTER`` per channel, and zero-mean shading), on a desaturated, textured grey
  background, so the colour word is the only saturated thing in the image. The word is kept in the ground
  truth, and the median pixel of every visible mask is nearest to its own palette colour (tested).
- **Sizes**: the full (unoccluded) shape's area as a fraction of the image's area is drawn from
  ``SMALL_AREA`` (word ``small``) or ``LARGE_AREA`` (word ``large``); nothing falls between 2 % and 5 %, so
  the word is never borderline. Scenes are square, so this equals the fraction of the square letterbox a
  detector sees.
- **Distractors**: after the first shape, each next one repeats the shape of an earlier one in another colour
  (30 %), or the colour of an earlier one on another shape (30 %), else is drawn at random.
- **Held out**: the colour–shape combinations ``HELD_OUT`` (green star, purple hexagon, orange square) are
  never rendered in the ``train`` and ``val`` splits. ``test`` renders every combination, and draws a held-out
  one for ``TEST_HELD_OUT_RATE`` of its shapes so that their AP rests on enough instances.
- Occlusion and touching shapes as in ``world``: every instance keeps ``MIN_VISIBLE`` of its area visible.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from service.shapes.world import CLASSES, MIN_VISIBLE, _outline, place, yolo_label_lines

# Named colours, RGB. Pairwise at least 95 apart (Euclidean), so jitter and shading never cross a boundary.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (250, 130, 10),
    "yellow": (240, 230, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 215),
    "purple": (135, 50, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
COLOUR_JITTER = 10  # max |offset| per channel of one shape's base colour from its palette entry
SIZES = ("small", "large")
SMALL_AREA = (0.006, 0.02)  # full shape area / image area, word "small"
LARGE_AREA = (0.05, 0.11)  # word "large"
HELD_OUT: tuple[tuple[str, str], ...] = (("green", "star"), ("purple", "hexagon"), ("orange", "square"))
TEST_HELD_OUT_RATE = 0.15
SIDE = (256, 480)  # square scenes, side in pixels (inclusive)
OBJECTS = (2, 8)  # shapes per scene (inclusive; occlusion limits can leave fewer)
SPLIT_SEED_BASE = {"train": 10_000_000, "val": 11_000_000, "test": 12_000_000}
# Area of a shape of circumradius 1 (the polygons of world._outline): circle (72-gon), square, triangle,
# star (10 vertices alternating radii 1 and 0.45), hexagon.
_UNIT_AREA = {
    "circle": 36 * math.sin(2 * math.pi / 72),
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5),
    "hexagon": 3 * math.sqrt(3) / 2,
}


def colour_shape(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def size_colour_shape(size: str, colour: str, shape: str) -> str:
    return f"{size} {colour} {shape}"


# Fine classes: every (size, colour, shape), index = YOLO label id. Held-out combinations keep their ids (absent
# from train/val labels) so one table serves every split.
FINE_CLASSES: tuple[tuple[str, str, str], ...] = tuple((s, c, k) for s in SIZES for c in COLOURS for k in CLASSES)
FINE_NAMES = tuple(size_colour_shape(*f) for f in FINE_CLASSES)


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


@dataclasses.dataclass(frozen=True)
class AttributeInstance:
    """One shape. mask: (H, W) bool visible pixels; box: XYXY pixel edges around the visible mask;
    area_fraction: the full (unoccluded) shape's area / image area, which decides ``size``."""

    shape: str
    colour: str
    size: str
    mask: np.ndarray
    box: tuple[float, float, float, float]
    area_fraction: float

    @property
    def category_id(self) -> int:
        """Index into world.CLASSES (shape only)."""
        return CLASSES.index(self.shape)

    @property
    def fine_id(self) -> int:
        """Index into FINE_CLASSES."""
        return FINE_CLASSES.index((self.size, self.colour, self.shape))

    @property
    def colour_shape(self) -> str:
        return colour_shape(self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class AttributeScene:
    seed: int
    image: np.ndarray  # (H, W, 3) uint8 RGB, H == W
    instances: tuple[AttributeInstance, ...]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def split_seed(split: str, index: int) -> int:
    return SPLIT_SEED_BASE[split] + index


def split_of(seed: int) -> str:
    """The split a seed of this world belongs to (seeds below the train base count as train)."""
    return max((base, split) for split, base in SPLIT_SEED_BASE.items() if seed >= base or split == "train")[1]


def attribute_scenes(split: str, count: int, start: int = 0) -> list[AttributeScene]:
    return [render_attribute_scene(split_seed(split, i)) for i in range(start, start + count)]


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Desaturated grey texture: grey level 80–175, a faint tint, low-frequency blotches, stripes, pixel noise.
    float32 (side, side, 3)."""
    base = rng.uniform(80, 175) + rng.uniform(-8, 8, 3)
    cells = int(rng.integers(3, 9))
    grid = rng.normal(0, 18, (cells, cells)).astype(np.float32)
    low = np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC))[..., None]
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)[..., None]
    texture = stripes * rng.uniform(0, 12)
    noise = rng.normal(0, rng.uniform(2, 8), (side, side, 1))
    return (base + low + texture + noise).astype(np.float32)


def _choose(
    rng: np.random.Generator, placed: list[tuple[str, str]], allow_held_out: bool, promote_held_out: bool
) -> tuple[str, str]:
    """(colour, shape) of the next shape: distractors of earlier ones, or random; held-out rules applied."""
    if promote_held_out and rng.random() < TEST_HELD_OUT_RATE:
        colour, shape = HELD_OUT[int(rng.integers(0, len(HELD_OUT)))]
        return colour, shape
    for _ in range(100):
        roll = rng.random()
        colour, shape = COLOURS[int(rng.integers(0, len(COLOURS)))], CLASSES[int(rng.integers(0, len(CLASSES)))]
        if placed and roll < 0.3:  # same shape as an earlier one, another colour
            prev_colour, shape = placed[int(rng.integers(0, len(placed)))]
            colour = rng.choice([c for c in COLOURS if c != prev_colour]).item()
        elif placed and roll < 0.6:  # same colour as an earlier one, another shape
            colour, prev_shape = placed[int(rng.integers(0, len(placed)))]
            shape = rng.choice([k for k in CLASSES if k != prev_shape]).item()
        if allow_held_out or not is_held_out(colour, shape):
            return colour, shape
    raise RuntimeError("no allowed colour-shape combination drawn")  # unreachable: 37 of 40 are allowed


def render_attribute_scene(seed: int) -> AttributeScene:
    """The attribute scene of ``seed`` (its split, from the seed, decides whether held-out combinations occur)."""
    split = split_of(seed)
    rng = np.random.default_rng(seed)
    side = int(rng.integers(SIDE[0], SIDE[1] + 1))
    canvas = _background(rng, side)
    n = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    full_masks: list[np.ndarray] = []
    attrs: list[tuple[str, str, str, float]] = []
    previous: tuple[float, float, float] | None = None
    for _ in range(n):
        colour, shape = _choose(rng, [(c, k) for c, k, _, _ in attrs], split == "test", split == "test")
        size = SIZES[int(rng.integers(0, 2))]
        for _attempt in range(30):
            lo, hi = SMALL_AREA if size == "small" else LARGE_AREA
            fraction = float(rng.uniform(lo, hi))
            r = math.sqrt(fraction * side * side / _UNIT_AREA[shape])
            cx, cy = place(rng, previous, r, side, side, margin=0.7)
            angle = float(rng.uniform(0, 2 * math.pi))
            img = Image.new("L", (side, side), 0)
            ImageDraw.Draw(img).polygon(_outline(CLASSES.index(shape), cx, cy, r, angle), fill=1)
            mask = np.asarray(img, dtype=bool)
            # mostly inside the image (the size word is about the whole shape), and occluding nobody too much
            if mask.sum() < max(150.0, 0.8 * fraction * side * side):
                continue
            if all(_visible_ok(m, full_masks, i, mask) for i, m in enumerate(full_masks)):
                full_masks.append(mask)
                attrs.append((colour, shape, size, fraction))
                previous = (cx, cy, r)
                _paint(rng, canvas, mask, colour, cx, cy, r)
                break
    image = np.clip(canvas + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8)
    instances = []
    for i, ((colour, shape, size, fraction), mask) in enumerate(zip(attrs, full_masks, strict=True)):
        visible = mask.copy()
        for later in full_masks[i + 1 :]:
            visible &= ~later
        ys, xs = np.nonzero(visible)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        instances.append(AttributeInstance(shape, colour, size, visible, box, fraction))
    return AttributeScene(seed=seed, image=image, instances=tuple(instances))


def _paint(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, colour: str, cx: float, cy: float, r: float
) -> None:
    """Palette colour + jitter, with a zero-mean linear shade across the shape and luminance noise."""
    base = np.asarray(PALETTE[colour], np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = ((xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)) / max(r, 1.0)
    shade = ramp * rng.uniform(0, 12) + rng.normal(0, 4, len(xs))
    canvas[ys, xs] = np.clip(base[None, :] + shade[:, None], 0, 255)


def _visible_ok(full: np.ndarray, all_masks: list[np.ndarray], index: int, new: np.ndarray) -> bool:
    """With ``new`` painted on top, instance ``index`` keeps MIN_VISIBLE of its area visible."""
    visible = full & ~new
    for later in all_masks[index + 1 :]:
        visible &= ~later
    return bool(visible.sum() >= MIN_VISIBLE * full.sum())


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest (Euclidean) to an RGB triple."""
    names = list(PALETTE)
    d = [float(np.linalg.norm(np.asarray(PALETTE[n], np.float32) - rgb)) for n in names]
    return names[int(np.argmin(d))]


def yolo_fine_label_lines(scene: AttributeScene) -> list[str]:
    """One "fine_id cx cy w h" line per instance (FINE_CLASSES ids), normalised to [0, 1]."""
    return yolo_label_lines(scene, lambda inst: inst.fine_id)
