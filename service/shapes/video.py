"""The shapes video world: the attribute world's shapes moving over a static background, with exact per-frame
ground truth for tracking (track ids, visible masks, boxes, visible fractions).

A third world beside ``world.render_scene`` and ``attributes.render_attribute_scene`` (both stay byte-identical;
this module only imports their helpers). Every video is a pure function of its seed and size arguments: the plan
(every object's trajectory) is drawn up front, and any frame is rendered alone from it, so ``video.frame(i)``
equals the i-th frame of iterating the video.

- **Scene**: a static camera over one textured grey background (``attributes._background``), with fresh
  Gaussian sensor noise (std ``NOISE``, per pixel and channel) on every frame.
- **Objects**: the five ``world.CLASSES`` in ``attributes.PALETTE`` colours, painted as the attribute world paints
  them (``attributes._paint``: palette colour + jitter, shading, luminance noise) from the same draws on every
  frame, so an object keeps its exact colour and shading direction for its life. Colour and shape are chosen
  as there (distractors: a new object often repeats an alive one's shape in another colour, or its colour on
  another shape); held-out combinations (``attributes.HELD_OUT``) appear only in the ``test`` split.
- **Sizes**: an object's full (unoccluded) area as a fraction of the square letterbox a detector sees
  (``max(width, height)`` squared, the image area of the square attribute scenes) is drawn from
  ``attributes.SMALL_AREA`` (``small``) or ``attributes.LARGE_AREA`` (``large``), fixed for the object's life.
- **Motion**: each object moves at a constant speed of ``SPEED`` px/frame (at 480 rows; scaled with the shorter
  side) along a gently curving path (heading turning at most ``TURN`` rad/frame) and spins at most ``SPIN``
  rad/frame.
- **Entries and exits**: ``objects[0]``..``objects[1]`` objects are placed in the frame at frame 0; an object's
  life ends the first time its circumscribed circle has left the frame. While fewer than ``objects[0]`` are
  alive a new one is launched at once, else (below ``objects[1]``) with probability ``SPAWN_RATE`` per frame;
  launches start just outside a random edge, heading into the frame. At most ``objects[1]`` are alive at once.
- **Occlusion**: every object has a fixed depth (``TrackPlan.depth``, 0 = furthest back); nearer objects hide
  farther ones. While a large object is alive, a new object is, with probability ``BEHIND_RATE``, small and
  launched on a straight path just behind it that the large one alone hides completely on ``BEHIND_FRAMES``
  frames (checked by rasterising both), after which it reappears; other objects cross as their paths happen to
  meet (occluders in front can lengthen a hidden spell).
- **Ground truth**: each object's mask is its *visible* pixels, from the very rasterisation that paints the frame
  (masks of one frame are disjoint); ``visible`` = visible pixels / the shape's in-frame pixels (0 when fully
  hidden or outside), ``in_frame`` = in-frame pixels / all of the shape's pixels. A frame lists the objects with a
  visible pixel in ``objects`` and the other alive ones (fully hidden, or not yet / no longer over the frame) in
  ``hidden``. Track ids start at 1, follow launch order, and belong to one object for its one life.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service.shapes.attributes import _UNIT_AREA, LARGE_AREA, SMALL_AREA, _background, _choose, _paint
from service.shapes.world import CLASSES, _outline

FRAMES = 120
WIDTH, HEIGHT = 640, 480
MIN_SIDE = 16  # a video's least width and height, pixels
OBJECTS = (2, 6)  # alive at once (inclusive)
FPS = 10
SPEED = (1.5, 5.0)  # px/frame at 480 rows (scaled with min(width, height) / 480)
TURN = 0.015  # max |heading change|, rad/frame
SPIN = 0.03  # max |rotation|, rad/frame
SPAWN_RATE = 0.04  # chance per frame of launching an object while fewer than objects[1] are alive
LARGE_RATE = 0.45  # chance an object is large
BEHIND_RATE = 0.6  # chance a new object is aimed to pass fully behind a large one (when one is alive)
BEHIND_FRAMES = (2, 10)  # frames such a pass hides it completely behind the front one (inclusive)
NOISE = 3.0  # std of the per-frame sensor noise, grey levels
SPLIT_SEED_BASE = {"train": 20_000_000, "val": 21_000_000, "test": 22_000_000}
# Radius of the largest circle inside each shape of circumradius 1 (world._outline's polygons); the star's is the
# distance from its centre to the edge between an outer vertex (1, 0) and an inner one 0.45 (cos 36°, sin 36°).
_INRADIUS = {
    "circle": math.cos(math.pi / 72),
    "square": math.cos(math.pi / 4),
    "triangle": 0.5,
    "star": 0.45 * math.sin(math.pi / 5) / math.hypot(1 - 0.45 * math.cos(math.pi / 5), 0.45 * math.sin(math.pi / 5)),
    "hexagon": math.cos(math.pi / 6),
}
_BEHIND_SLACK = 12.0  # px at 480 rows: an object passes behind one whose inscribed circle it fits with this to spare
# Sensor noise: a standard normal quantised to 256 equally likely levels (one random byte per sample, 4x faster).
_GAUSSIAN_LEVELS = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], np.float32)
_PAINT_STREAM, _NOISE_STREAM = 1, 2  # seed-sequence keys of the per-object paint and per-frame noise generators


@dataclasses.dataclass(frozen=True)
class TrackPlan:
    """One object's whole life. It is alive on frames ``first`` .. ``end - 1``; its centre at frame t follows from
    (x, y, heading) at frame ``launch``, moving ``speed`` px/frame while the heading turns ``turn`` rad/frame."""

    track_id: int
    shape: str
    colour: str
    size: str
    area_fraction: float  # full area / max(width, height) ** 2, which decides ``size``
    radius: float  # circumradius, px
    depth: int  # paint order: 0 furthest back; a higher depth hides a lower one
    first: int
    end: int
    launch: int
    x: float
    y: float
    heading: float
    speed: float
    turn: float
    angle: float
    spin: float

    def centre(self, t: Any) -> tuple[Any, Any]:
        """(x, y) at frame(s) t (a number or an array)."""
        return _centre(self.x, self.y, self.heading, self.speed, self.turn, t - self.launch)

    def angle_at(self, t: Any) -> Any:
        return self.angle + self.spin * (t - self.launch)


@dataclasses.dataclass(frozen=True)
class TrackTruth:
    """One object on one frame. mask: (H, W) bool visible pixels; box: XYXY pixel edges around the visible mask
    (x1 = last column + 1, as in ``world``), (0, 0, 0, 0) when nothing is visible; visible: visible pixels / the
    shape's in-frame pixels; in_frame: the shape's in-frame pixels / all its pixels."""

    track_id: int
    shape: str
    colour: str
    size: str
    mask: np.ndarray
    box: tuple[float, float, float, float]
    visible: float
    in_frame: float


@dataclasses.dataclass(frozen=True)
class VideoFrame:
    """objects: those with a visible pixel (the tracking ground truth), by track id; hidden: the other alive ones
    (fully occluded, or over the frame's edge with no pixel in it), by track id."""

    index: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: tuple[TrackTruth, ...]
    hidden: tuple[TrackTruth, ...]


@dataclasses.dataclass(frozen=True)
class TrackInfo:
    """A track over the whole video: alive on frames first..last; first/last_visible None when never visible."""

    track_id: int
    shape: str
    colour: str
    size: str
    area_fraction: float
    depth: int
    first: int
    last: int
    first_visible: int | None
    last_visible: int | None


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One alive object rasterised on one frame: crop (x0, y0) of the image, the shape's in-frame pixels and its
    visible ones there (bool, same shape), and the count of all its pixels (in frame or not)."""

    plan: TrackPlan
    x0: int
    y0: int
    full: np.ndarray
    visible: np.ndarray
    full_pixels: int


@dataclasses.dataclass(frozen=True, eq=False)
class ShapesVideo:
    """The plan of one video: background and trajectories; frames are rendered on demand."""

    seed: int
    width: int
    height: int
    fps: int
    length: int
    plans: tuple[TrackPlan, ...]
    background: np.ndarray  # (H, W, 3) float32, before noise
    noise: float = NOISE

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[VideoFrame]:
        return (self.frame(i) for i in range(self.length))

    def frame(self, index: int) -> VideoFrame:
        """Frame ``index`` (0-based) with its ground truth, rendered from the plan alone."""
        layers = self._layers(index)
        canvas = self.background.copy()
        for layer in layers:  # back to front; visible pixels only, so the order does not matter
            if layer.visible.any():
                p = layer.plan
                cx, cy = p.centre(index)
                rng = np.random.default_rng([self.seed, _PAINT_STREAM, p.track_id])  # same draws every frame
                crop = canvas[layer.y0 : layer.y0 + layer.full.shape[0], layer.x0 : layer.x0 + layer.full.shape[1]]
                _paint(rng, crop, layer.visible, p.colour, cx - layer.x0, cy - layer.y0, p.radius)
        if self.noise > 0:
            rng = np.random.default_rng([self.seed, _NOISE_STREAM, index])
            canvas += np.take(_GAUSSIAN_LEVELS * np.float32(self.noise), rng.integers(0, 256, canvas.shape, np.uint8))
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        truths = sorted((self._truth(layer) for layer in layers), key=lambda tr: tr.track_id)
        return VideoFrame(
            index=index,
            image=image,
            objects=tuple(tr for tr in truths if tr.visible > 0),
            hidden=tuple(tr for tr in truths if tr.visible == 0),
        )

    def coverage(self) -> tuple[np.ndarray, np.ndarray]:
        """(visible, in_frame), each (length, tracks) float64, column j for track id j + 1 (0 where not alive);
        from the masks alone, without painting."""
        visible = np.zeros((self.length, len(self.plans)))
        in_frame = np.zeros((self.length, len(self.plans)))
        for t in range(self.length):
            for layer in self._layers(t):
                j = layer.plan.track_id - 1
                visible[t, j], in_frame[t, j] = _fractions(layer)
        return visible, in_frame

    def tracks(self) -> tuple[TrackInfo, ...]:
        """Every track, by id, with the frames it is alive and visible on (rasterises every frame's masks)."""
        visible, _ = self.coverage()
        out = []
        for p in self.plans:
            seen = np.flatnonzero(visible[:, p.track_id - 1] > 0)
            first_visible, last_visible = (int(seen[0]), int(seen[-1])) if len(seen) else (None, None)
            out.append(
                TrackInfo(
                    p.track_id, p.shape, p.colour, p.size, p.area_fraction, p.depth,
                    p.first, p.end - 1, first_visible, last_visible,
                )
            )  # fmt: skip
        return tuple(out)

    def _layers(self, index: int) -> list[_Layer]:
        """The objects alive on frame ``index``, back to front, each rasterised once; visible = its pixels that no
        nearer object covers."""
        if not 0 <= index < self.length:
            raise IndexError(f"frame {index} of a {self.length}-frame video")
        alive = sorted((p for p in self.plans if p.first <= index < p.end), key=lambda p: p.depth)
        covered = np.zeros((self.height, self.width), bool)
        layers = []
        for p in reversed(alive):  # front to back
            x0, y0, full, full_pixels = _rasterise(p, index, self.width, self.height)
            window = covered[y0 : y0 + full.shape[0], x0 : x0 + full.shape[1]]
            visible = full & ~window
            window |= full
            layers.append(_Layer(p, x0, y0, full, visible, full_pixels))
        return layers[::-1]

    def _truth(self, layer: _Layer) -> TrackTruth:
        p = layer.plan
        mask = np.zeros((self.height, self.width), bool)
        h, w = layer.visible.shape
        mask[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w] = layer.visible
        ys, xs = np.nonzero(layer.visible)
        box = (0.0, 0.0, 0.0, 0.0)
        if len(xs):
            box = (
                float(layer.x0 + xs.min()), float(layer.y0 + ys.min()),
                float(layer.x0 + xs.max() + 1), float(layer.y0 + ys.max() + 1),
            )  # fmt: skip
        visible, in_frame = _fractions(layer)
        return TrackTruth(p.track_id, p.shape, p.colour, p.size, mask, box, visible, in_frame)


def _fractions(layer: _Layer) -> tuple[float, float]:
    """(visible pixels / in-frame pixels, in-frame pixels / all pixels) of one layer."""
    in_frame = int(layer.full.sum())
    visible = int(layer.visible.sum()) / in_frame if in_frame else 0.0
    return visible, in_frame / max(layer.full_pixels, 1)


def _rasterise(p: TrackPlan, t: int, width: int, height: int) -> tuple[int, int, np.ndarray, int]:
    """The shape of ``p`` at frame t drawn on a crop around it: (x0, y0, in-frame pixels (bool crop at x0, y0,
    possibly empty), count of all its pixels)."""
    cx, cy = p.centre(t)
    points = _outline(CLASSES.index(p.shape), cx, cy, p.radius, p.angle_at(t))
    bx0 = math.floor(min(x for x, _ in points))
    by0 = math.floor(min(y for _, y in points))
    bx1 = math.floor(max(x for x, _ in points)) + 2
    by1 = math.floor(max(y for _, y in points)) + 2
    img = Image.new("L", (bx1 - bx0, by1 - by0), 0)
    ImageDraw.Draw(img).polygon([(x - bx0, y - by0) for x, y in points], fill=1)
    shape = np.asarray(img, dtype=bool)
    x0, y0 = min(max(bx0, 0), width), min(max(by0, 0), height)
    x1, y1 = max(min(bx1, width), x0), max(min(by1, height), y0)
    return x0, y0, shape[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0], int(shape.sum())


def _centre(x: float, y: float, heading: float, speed: float, turn: float, tau: Any) -> tuple[Any, Any]:
    """Position after ``tau`` frames from (x, y) at ``speed`` px/frame, the heading turning ``turn`` rad/frame."""
    if abs(turn) < 1e-9:
        return x + speed * tau * math.cos(heading), y + speed * tau * math.sin(heading)
    k = speed / turn
    return (
        x + k * (np.sin(heading + turn * tau) - math.sin(heading)),
        y - k * (np.cos(heading + turn * tau) - math.cos(heading)),
    )


def split_seed(split: str, index: int) -> int:
    return SPLIT_SEED_BASE[split] + index


def split_of(seed: int) -> str:
    """The split a seed of this world belongs to (seeds below the train base count as train)."""
    return max((base, split) for split, base in SPLIT_SEED_BASE.items() if seed >= base or split == "train")[1]


def make_video(
    seed: int,
    frames: int = FRAMES,
    width: int = WIDTH,
    height: int = HEIGHT,
    objects: tuple[int, int] = OBJECTS,
    fps: int = FPS,
) -> ShapesVideo:
    """The video of ``seed``: same arguments, same pixels and ground truth, on any machine. Cheap (the plan and
    the background); frames render on demand."""
    lo, hi = objects
    if not 1 <= lo <= hi or frames < 1 or min(width, height) < MIN_SIDE:
        raise ValueError(f"bad video: frames={frames} size={width}x{height} objects={objects}")
    rng = np.random.default_rng(seed)
    background = np.ascontiguousarray(_background(rng, max(width, height))[:height, :width])
    planner = _Planner(rng, frames, width, height, allow_held_out=split_of(seed) == "test")
    for _ in range(int(rng.integers(lo, hi + 1))):
        planner.launch(0, inside=True)
    for t in range(1, frames):
        alive = planner.alive(t)
        launches = lo - alive if alive < lo else int(alive < hi and rng.random() < SPAWN_RATE)
        for _ in range(launches):
            planner.launch(t, inside=False)
    return ShapesVideo(seed, width, height, fps, frames, planner.plans(), background)


class _Planner:
    """Draws the objects' lives frame by frame from positions (only a planned pass behind another object is
    rasterised, to check it). Drafts are plans without their id and depth rank, each with its depth as drawn."""

    def __init__(self, rng: np.random.Generator, frames: int, width: int, height: int, allow_held_out: bool):
        self.rng, self.frames, self.width, self.height = rng, frames, width, height
        self.allow_held_out = allow_held_out
        self.scale = min(width, height) / 480
        self.letterbox = max(width, height) ** 2
        self.drafts: list[tuple[TrackPlan, float]] = []

    def alive(self, t: int) -> int:
        return sum(p.first <= t < p.end for p, _ in self.drafts)

    def launch(self, t: int, inside: bool) -> None:
        rng = self.rng
        alive = [(p, depth) for p, depth in self.drafts if p.first <= t < p.end]
        colour, shape = _choose(rng, [(p.colour, p.shape) for p, _ in alive], self.allow_held_out, False)
        spin = float(rng.uniform(-SPIN, SPIN))
        angle = float(rng.uniform(0, 2 * math.pi))
        hosts = [(p, depth) for p, depth in alive if p.size == "large" and p.end > t + 15]
        if hosts and rng.random() < BEHIND_RATE:
            host, host_depth = hosts[int(rng.integers(0, len(hosts)))]
            behind = self._behind(t, inside, shape, colour, angle, spin, host)
            if behind is not None:
                self._add(behind, host_depth - float(rng.uniform(1e-6, 1e-3)))
                return
        size = "large" if rng.random() < LARGE_RATE else "small"
        lo, hi = LARGE_AREA if size == "large" else SMALL_AREA
        fraction = float(rng.uniform(lo, hi))
        radius = math.sqrt(fraction * self.letterbox / _UNIT_AREA[shape])
        speed = float(rng.uniform(*SPEED)) * self.scale
        turn = float(rng.uniform(-TURN, TURN))
        if inside:
            x, y = float(rng.uniform(0.05, 0.95) * self.width), float(rng.uniform(0.05, 0.95) * self.height)
            heading = float(rng.uniform(0, 2 * math.pi))
        else:
            x, y = self._edge_point(radius)
            tx, ty = rng.uniform(0.2, 0.8) * self.width, rng.uniform(0.2, 0.8) * self.height
            heading = math.atan2(ty - y, tx - x)
        depth = float(rng.uniform(0, 1))
        self._add(
            TrackPlan(0, shape, colour, size, fraction, radius, 0, 0, 0, t, x, y, heading, speed, turn, angle, spin),
            depth,
        )

    def _behind(
        self, t: int, inside: bool, shape: str, colour: str, angle: float, spin: float, host: TrackPlan
    ) -> TrackPlan | None:
        """A small ``shape`` launched at frame t on a straight path behind ``host`` that the host alone hides
        completely (while partly in frame) on ``BEHIND_FRAMES`` frames, checked by rasterising both; None when
        it cannot fit inside the host or no such path is found. The path is aimed at the host's centre at a
        meeting frame, then moved sideways (across the relative velocity) by 0.5-1.5 times the distance at which
        the host's inscribed circle still covers it, so that most passes are short."""
        rng = self.rng
        reach_max = _INRADIUS[host.shape] * host.radius - _BEHIND_SLACK * self.scale
        fit = reach_max * reach_max * _UNIT_AREA[shape] / self.letterbox  # the largest area fraction that fits
        if reach_max <= 0 or fit < SMALL_AREA[0]:
            return None
        fraction = float(rng.uniform(SMALL_AREA[0], min(SMALL_AREA[1], fit)))
        radius = math.sqrt(fraction * self.letterbox / _UNIT_AREA[shape])
        reach = _INRADIUS[host.shape] * host.radius - radius  # centres this close: the host hides it
        lo, hi = SPEED[0] * self.scale, SPEED[1] * self.scale
        for _attempt in range(10):
            miss = float(rng.uniform(0.5, 1.5) * rng.choice([-1.0, 1.0])) * reach
            if inside:  # a random velocity, started where it meets the host's centre after k frames
                k = int(rng.integers(6, 41))
                speed, heading = float(rng.uniform(lo, hi)), float(rng.uniform(0, 2 * math.pi))
                tx, ty = host.centre(t + k)
                x, y = tx - speed * k * math.cos(heading), ty - speed * k * math.sin(heading)
            else:  # from an edge point, at the speed that meets the host's centre after k frames
                x, y = self._edge_point(radius)
                ks = np.arange(6, 91)
                txs, tys = _centre(host.x, host.y, host.heading, host.speed, host.turn, t + ks - host.launch)
                speeds = np.hypot(txs - x, tys - y) / ks
                ok = np.flatnonzero((speeds >= lo) & (speeds <= hi) & (t + ks < host.end))
                if not len(ok):
                    continue
                i = int(rng.choice(ok))
                k, tx, ty = int(ks[i]), float(txs[i]), float(tys[i])
                speed, heading = float(speeds[i]), math.atan2(ty - y, tx - x)
            if not (t + k < host.end and self._in_view(tx, ty)):
                continue
            host_heading = host.heading + host.turn * (t + k - host.launch)
            rx = speed * math.cos(heading) - host.speed * math.cos(host_heading)
            ry = speed * math.sin(heading) - host.speed * math.sin(host_heading)
            relative = math.hypot(rx, ry)
            if relative < lo:
                continue
            nx, ny = -ry / relative * miss, rx / relative * miss
            if inside:  # the same velocity, started to one side
                x, y = x + nx, y + ny
            else:  # the same start, aimed to one side
                speed, heading = math.hypot(tx + nx - x, ty + ny - y) / k, math.atan2(ty + ny - y, tx + nx - x)
            if not (lo <= speed <= hi and (not inside or self._in_view(x, y))):
                continue
            plan = TrackPlan(
                0, shape, colour, "small", fraction, radius, 0, 0, 0, t, x, y, heading, speed, 0.0, angle, spin
            )
            if BEHIND_FRAMES[0] <= self._hidden_behind(plan, host) <= BEHIND_FRAMES[1]:
                return plan
        return None

    def _hidden_behind(self, plan: TrackPlan, host: TrackPlan) -> int:
        """Frames from plan's launch on which host's pixels cover all of plan's in-frame pixels (at least one);
        counting stops past ``BEHIND_FRAMES[1]``."""
        tau = np.arange(plan.launch, min(host.end, self.frames), dtype=np.float64)
        cx, cy = plan.centre(tau)
        hx, hy = host.centre(tau)
        hidden = 0
        near = np.hypot(cx - hx, cy - hy) < host.radius - _INRADIUS[plan.shape] * plan.radius  # else never covered
        for t in tau[near].astype(int):
            x0, y0, mask, _ = _rasterise(plan, int(t), self.width, self.height)
            hx0, hy0, host_mask, _ = _rasterise(host, int(t), self.width, self.height)
            ys, xs = np.nonzero(mask)
            ys, xs = ys + (y0 - hy0), xs + (x0 - hx0)
            h, w = host_mask.shape
            if len(ys) and ys.min() >= 0 and xs.min() >= 0 and ys.max() < h and xs.max() < w:
                hidden += bool(host_mask[ys, xs].all())
                if hidden > BEHIND_FRAMES[1]:
                    break
        return hidden

    def _in_view(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        return np.asarray((x >= 0) & (x < self.width) & (y >= 0) & (y < self.height))

    def _edge_point(self, radius: float) -> tuple[float, float]:
        """A centre just outside a random edge (edges weighted by length), its circumscribed circle touching it."""
        rng = self.rng
        w, h = self.width, self.height
        along = float(rng.uniform(0.1, 0.9))
        edge = int(rng.choice(4, p=np.array([w, w, h, h]) / (2 * (w + h))))
        return [(along * w, -radius), (along * w, h + radius), (-radius, along * h), (w + radius, along * h)][edge]

    def _add(self, draft: TrackPlan, depth: float) -> None:
        """Records a launch; its life runs from the first frame its circumscribed circle meets the frame until
        the first frame after that on which it does not (dropped if that never happens)."""
        t, r = draft.launch, draft.radius
        tau = np.arange(self.frames - t, dtype=np.float64)
        cx, cy = _centre(draft.x, draft.y, draft.heading, draft.speed, draft.turn, tau)
        meets = (cx + r > -1) & (cx - r < self.width + 1) & (cy + r > -1) & (cy - r < self.height + 1)
        if not meets.any():
            return
        first = int(np.argmax(meets))
        gone = np.flatnonzero(~meets[first:])
        end = t + first + (int(gone[0]) if len(gone) else len(meets) - first)
        self.drafts.append((dataclasses.replace(draft, first=t + first, end=end), depth))

    def plans(self) -> tuple[TrackPlan, ...]:
        """Ids in launch order, depths as ranks (0 = furthest back)."""
        order = sorted(range(len(self.drafts)), key=lambda i: self.drafts[i][1])
        rank = {i: r for r, i in enumerate(order)}
        return tuple(dataclasses.replace(p, track_id=i + 1, depth=rank[i]) for i, (p, _) in enumerate(self.drafts))


def mot_xywh(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A pixel-edge XYXY box as MOTChallenge's (bb_left, bb_top, bb_width, bb_height), 1-based like MOT's files
    (the top-left pixel is (1, 1)); tracker results should go through the same function."""
    x0, y0, x1, y1 = box
    return x0 + 1, y0 + 1, x1 - x0, y1 - y0


def mot_lines(video: ShapesVideo) -> list[str]:
    """MOT17 gt.txt lines for every visible object: frame (1-based), id, bb_left, bb_top, bb_width, bb_height,
    1 (considered), 1 (class), visibility (the visible fraction); from the masks alone, without painting."""
    lines = []
    for t in range(video.length):
        truths = sorted((video._truth(layer) for layer in video._layers(t)), key=lambda tr: tr.track_id)
        for tr in truths:
            if tr.visible > 0:
                x, y, w, h = mot_xywh(tr.box)
                lines.append(f"{t + 1},{tr.track_id},{x:g},{y:g},{w:g},{h:g},1,1,{tr.visible:.4f}")
    return lines


def seqinfo_ini(video: ShapesVideo, name: str) -> str:
    """The seqinfo.ini MOTChallenge (and trackeval) reads beside gt/gt.txt."""
    return (
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={video.fps}\nseqLength={video.length}\n"
        f"imWidth={video.width}\nimHeight={video.height}\nimExt=.jpg\n"
    )
