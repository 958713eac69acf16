"""Mask encodings: COCO RLE (pycocotools), polygons along pixel edges (holes included), PNG (Pillow).

Polygons rasterised back the COCO way (pycocotools ``frPyObjects`` → ``merge`` → ``decode``) give the mask's
pixels exactly; see ``_polygons`` for the vertex convention and how holes are carried.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.processing import native

RLE, POLYGON, PNG = "coco_rle", "polygon", "png"
ENCODINGS = (RLE, POLYGON, PNG)


@dataclasses.dataclass(frozen=True)
class EncodedMask:
    """One mask at original resolution in one encoding.

    rle_counts: pycocotools compressed counts (bytes); polygons: flattened [x0, y0, x1, y1, ...] lists in
    original-image pixels, one per 8-connected component, vertices on pixel edges, holes joined to their outer
    ring by zero-width cuts (pycocotools reproduces the mask exactly); png: 8-bit grayscale PNG bytes (255 = object).
    """

    height: int
    width: int
    encoding: str
    rle_counts: bytes = b""
    polygons: tuple[tuple[float, ...], ...] = ()
    png: bytes = b""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A window [y0, y1) x [x0, x1) of an (H, W) mask, original-image pixels, that holds every set pixel of it."""

    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) → the (y1 - y0, x1 - x0) view of this window."""
        return mask[self.y0 : self.y1, self.x0 : self.x1]

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0

    def intersect(self, other: Bounds) -> Bounds:
        """The pixels in both windows (an empty window, y1 = y0 or x1 = x0, when they do not meet)."""
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        return Bounds(y0, max(y0, min(self.y1, other.y1)), x0, max(x0, min(self.x1, other.x1)))


EMPTY = Bounds(0, 0, 0, 0)


@dataclasses.dataclass(frozen=True)
class WindowedMask:
    """An (H, W) bool mask at original resolution held as one window of it: every set pixel lies in ``bounds``.

    crop: (y1 - y0, x1 - x0) bool, the window's pixels, a view of column-major memory (``crop.T`` is C-contiguous
    when the crop is the whole of its array) as upsampling makes it, the order of COCO RLE runs; any layout reads
    the same. An empty window holds no pixel. parts: its 8-connected parts when already counted (refinement's
    island removal counts them), else None.
    """

    height: int
    width: int
    bounds: Bounds
    crop: np.ndarray
    parts: int | None = None

    def frame(self) -> np.ndarray:
        """(H, W) bool, the whole mask (H × W bytes)."""
        out = np.zeros((self.height, self.width), bool)
        self.bounds.crop(out)[...] = self.crop
        return out

    def within(self, window: Bounds) -> WindowedMask:
        """The mask cleared outside ``window`` (a view of this crop)."""
        b = self.bounds.intersect(window)
        return WindowedMask(
            self.height,
            self.width,
            b,
            self.crop[b.y0 - self.bounds.y0 : b.y1 - self.bounds.y0, b.x0 - self.bounds.x0 : b.x1 - self.bounds.x0],
        )

    def tight(self) -> WindowedMask:
        """The same mask held by the tight window of its set pixels (``mask_bounds``; EMPTY when none is set)."""
        inner = mask_bounds(self.crop) if not self.bounds.empty else None
        if inner is None:
            return WindowedMask(self.height, self.width, EMPTY, np.zeros((0, 0), bool), 0)
        y0, x0 = self.bounds.y0, self.bounds.x0
        b = Bounds(y0 + inner.y0, y0 + inner.y1, x0 + inner.x0, x0 + inner.x1)
        return WindowedMask(self.height, self.width, b, inner.crop(self.crop), self.parts)


def mask_bounds(mask: np.ndarray, within: Bounds | None = None) -> Bounds | None:
    """(H, W) bool → the tight window of its set pixels, None when empty. ``within``: a window known to hold every
    set pixel (e.g. the prompt box + margin the refinement clipped to): only it is searched."""
    within = within or Bounds(0, mask.shape[0], 0, mask.shape[1])
    window = within.crop(mask)
    cols = np.flatnonzero(window.any(axis=0))  # along columns first: the masks' column-major memory in its order
    if not len(cols):
        return None
    rows = np.flatnonzero(window[:, cols[0] : cols[-1] + 1].any(axis=1))
    y0, x0 = within.y0, within.x0
    return Bounds(y0 + int(rows[0]), y0 + int(rows[-1]) + 1, x0 + int(cols[0]), x0 + int(cols[-1]) + 1)


def rle_from_window(mask: np.ndarray, bounds: Bounds | None) -> bytes:
    """The COCO RLE (pycocotools' compressed counts) of an (H, W) bool mask, computed from its window alone.

    Exactly ``pycocotools.mask.encode``'s counts (the tests compare them), in time proportional to the window, not
    the image (``window_runs``). ``bounds`` None: an empty mask.
    """
    h, w = mask.shape
    window = bounds or EMPTY
    return rle_counts(window_runs(WindowedMask(h, w, window, window.crop(mask))))


def rle_counts(runs: np.ndarray) -> bytes:
    """(K,) int64 COCO RLE run lengths of an (H, W) mask (column-major, zeros first) → pycocotools' compressed
    counts (``native.compressed_counts``: its ``rleToString``)."""
    return native.compressed_counts(runs).tobytes()  # type: ignore[no-any-return]


def window_runs(mask: WindowedMask) -> np.ndarray:
    """The COCO RLE run lengths (K,) int64 of a windowed mask: what ``pycocotools.mask.encode`` counts on the whole
    frame, in time proportional to the window.

    Run boundaries are where the column-major crop changes value, plus each column's first and last pixel when set
    (the frame around the window is empty); a window as tall as the frame is one contiguous stretch of the frame.
    ``SegmenterProcessing`` computes the same runs with torch where the logits are (``device_window_runs``).
    """
    h, w, b = mask.height, mask.width, mask.bounds
    if b.empty:
        return np.array([h * w], np.int64)
    rows = b.y1 - b.y0
    flat = np.ascontiguousarray(mask.crop.T).reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # crop positions whose pixel differs from the one before
    if rows == h:  # whole columns: the crop is the frame's pixels x0 * H ... x1 * H in order
        first, last = np.flatnonzero(flat[:1]), np.flatnonzero(flat[-1:]) + flat.size  # set: a run starts / ends
        edges = b.x0 * h + np.concatenate([first, change, last]).astype(np.int64)
    else:
        change = change[change % rows != 0]  # a column's first pixel follows background, not the column before
        starts = np.flatnonzero(flat[::rows])  # columns whose first pixel is set: a run starts at row y0
        ends = np.flatnonzero(flat[rows - 1 :: rows])  # columns whose last pixel is set: a run ends at row y1
        at_change = (b.x0 + change // rows) * h + b.y0 + change % rows
        at_ends = [(b.x0 + starts) * h + b.y0, (b.x0 + ends) * h + b.y1]
        edges = np.sort(np.concatenate([at_change, *at_ends]).astype(np.int64), kind="stable")  # 3 sorted runs
    runs = np.diff(edges, prepend=0, append=h * w)
    return runs[:-1] if runs[-1] == 0 else runs  # a mask reaching the frame's last pixel has no trailing zeros


def encode_window(mask: WindowedMask, encoding: str) -> EncodedMask:
    """One windowed mask → EncodedMask, byte for byte what ``encode_masks`` gives for its whole frame; RLE and
    polygons read only the window, PNG needs the frame."""
    h, w = mask.height, mask.width
    if encoding == RLE:
        return EncodedMask(h, w, RLE, rle_counts=rle_counts(window_runs(mask)))
    if encoding == POLYGON:
        polygons = () if mask.bounds.empty else _polygons(mask.crop, (mask.bounds.y0, mask.bounds.x0))
        return EncodedMask(h, w, POLYGON, polygons=polygons)
    if encoding == PNG:
        return EncodedMask(h, w, PNG, png=_png(mask.frame()))
    raise ValueError(f"unknown mask encoding {encoding!r}")


def encode_masks(masks: np.ndarray, encoding: str, bounds: Sequence[Bounds | None] | None = None) -> list[EncodedMask]:
    """masks: (N, H, W) bool → N EncodedMask. ``bounds``: each mask's window of set pixels (``mask_bounds``), when
    known: RLE then reads only the windows (the same bytes, faster for masks smaller than the image)."""
    n, h, w = masks.shape
    if encoding == RLE and bounds is not None:
        return [EncodedMask(h, w, RLE, rle_counts=rle_from_window(m, b)) for m, b in zip(masks, bounds, strict=True)]
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


def _polygons(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> tuple[tuple[float, ...], ...]:
    """(H, W) bool mask → one flattened [x0, y0, x1, y1, ...] polygon per 8-connected component, holes included.

    Coordinates are original-image pixels in pycocotools' frame: pixel (row r, col c) is the unit square
    [c, c + 1] × [r, r + 1] with its centre at (c + 0.5, r + 0.5). Every vertex lies on a pixel edge, at the
    midpoint of an edge between a mask pixel and a background pixel, i.e. at (c + 0.5, r) or (c, r + 0.5), halfway
    between the two pixel centres (the 0.5 iso-line of marching squares, diagonal touches joined as in 8-connected
    components). Straight runs (axis-aligned or 45°) keep only their end points. Cuts aside, the outline crosses
    each pixel-column centre line only on horizontal pixel edges, half a pixel from the nearest centres, so pycocotools'
    rasteriser (``frPyObjects`` → ``merge`` → ``decode``: a pixel is set when its centre is inside, vertices snapped
    to 1/5 px) gives back exactly the mask's pixels. A single pixel becomes a 4-vertex diamond.

    Holes: each hole ring hangs from the ring straight above its topmost edge (its component's outer ring, or a
    hole higher up) by a zero-width vertical cut along that pixel column's centre line, walked down and back up.
    The cut adds no crossings, so even-odd filling leaves the hole empty while the polygon stays weakly simple; a
    hole is never a polygon of its own (``merge`` is a union). An island inside a hole is a polygon of its own.
    """
    points, bounds, parents = _boundary_rings(mask, origin)
    feet, heads = _cuts(points, bounds, parents)
    keep = _turns(points, bounds)  # drop points inside straight runs, but not the cuts' ends
    keep[feet] = keep[heads] = True
    rank = np.cumsum(keep) - 1  # point index → index among the kept points
    bounds, feet, heads = np.concatenate(([0], rank[bounds[1:] - 1] + 1)), rank[feet], rank[heads]
    xy = points[keep] * 0.5  # doubled → image pixels
    holes = np.flatnonzero(parents >= 0).tolist()
    foot_of = dict(zip(holes, feet.tolist(), strict=True))
    hung: dict[int, list[tuple[int, int]]] = {}
    for hole, head, ring in zip(holes, heads.tolist(), _ring_of(bounds, heads).tolist(), strict=True):
        hung.setdefault(ring, []).append((head, hole))
    return tuple(
        tuple(xy[_splice(outer, bounds, foot_of, hung)].ravel().tolist()) for outer in np.flatnonzero(parents < 0)
    )


def _boundary_rings(mask: np.ndarray, origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) bool mask → its boundary rings: points (N, 2) int64, bounds (R + 1,) int64, parents (R,) int64.
    ``origin``: (row, column) of the mask's first pixel in the frame the coordinates are in.

    Ring k is points[bounds[k]:bounds[k + 1]], a closed cycle with one point per pixel edge between a mask pixel and
    a background pixel, at the edge's midpoint, in doubled original-image pixel coordinates (2x, 2y): (2c + 1, 2r)
    for the top edge of pixel (r, c), (2c, 2r + 1) for its left edge. parents[k] is the outer ring that hole ring k
    belongs to, -1 for outer rings (OpenCV's RETR_CCOMP: mask 8-connected, background 4-connected).
    """
    image = np.ascontiguousarray(mask, dtype=np.uint8)
    x, y, w, h = cv2.boundingRect(image)
    x0, y0 = x + origin[1], y + origin[0]
    if w == 0:
        return np.zeros((0, 2), np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64)
    crop = cv2.copyMakeBorder(image[y : y + h, x : x + w], 1, 1, 1, 1, cv2.BORDER_CONSTANT)
    # At 2x, the border pixels OpenCV traces sit a quarter pixel inside the original pixel edges: (u + 1) // 2 moves
    # them onto pixel corners, turning each contour into the unit-step chain of the region's pixel edges.
    doubled = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(
        doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE, offset=(2 * x0 - 2, 2 * y0 - 2)
    )
    lengths = [len(c) for c in contours]
    corners = (np.concatenate(contours).reshape(-1, 2).astype(np.int64) + 1) >> 1
    previous, _ = _ring_neighbours(np.concatenate(([0], np.cumsum(lengths))))
    xs, ys = corners.T
    moved = (xs != xs[previous]) | (ys != ys[previous])
    ring = np.repeat(np.arange(len(contours)), lengths)[moved]
    corners, bounds = corners[moved], np.searchsorted(ring, np.arange(len(contours) + 1))
    _, following = _ring_neighbours(bounds)
    return corners + corners[following], bounds, hierarchy[0, :, 3].astype(np.int64)


def _ring_neighbours(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring bounds (R + 1,) → (previous, next) point indices (N,), cyclic within each ring."""
    index = np.arange(bounds[-1])
    previous, following = index - 1, index + 1
    previous[bounds[:-1]] = bounds[1:] - 1
    following[bounds[1:] - 1] = bounds[:-1]
    return previous, following


def _ring_of(bounds: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Ring bounds (R + 1,), point indices (M,) → ring ids (M,)."""
    return np.searchsorted(bounds, index, side="right") - 1


def _turns(points: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Ring points (N, 2), bounds (R + 1,) → (N,) bool: True where the ring changes direction."""
    previous, following = _ring_neighbours(bounds)
    x, y = points.T
    return (x - x[previous]) * (y[following] - y) != (y - y[previous]) * (x[following] - x)


def _cuts(points: np.ndarray, bounds: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring points (N, 2), bounds (R + 1,), parents (R,) → the cut of each hole ring, in ring order: feet, heads (M,).

    foot: the hole ring's topmost (then leftmost) point, on a pixel edge with the hole below and the mask above.
    head: the next point of the same component straight above it, where that pixel column first meets background;
    it lies on the outer ring or on a hole whose top is higher, so the cuts form a tree under the outer ring.
    """
    holes = parents >= 0
    if not holes.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ring = np.repeat(np.arange(len(parents)), np.diff(bounds))
    x, y = points.T
    width, height = int(x.max()) + 1, int(y.max()) + 1
    row_major = y * width + x
    feet = np.flatnonzero(holes[ring] & (row_major == np.minimum.reduceat(row_major, bounds[:-1])[ring]))
    # Heads: the previous point in (component, x, y) order among the horizontal edges (odd x) of holed components.
    component = np.where(holes, parents, np.arange(len(parents)))
    holed = np.zeros(len(parents), bool)
    holed[component[holes]] = True
    candidates = np.flatnonzero(holed[component[ring]] & (x % 2 == 1))
    by_column = candidates[np.argsort((component[ring[candidates]] * width + x[candidates]) * height + y[candidates])]
    rank = np.zeros(len(points), np.int64)
    rank[by_column] = np.arange(len(by_column))
    return feet, by_column[rank[feet] - 1]


def _splice(
    outer: int, bounds: np.ndarray, foot_of: dict[int, int], hung: dict[int, list[tuple[int, int]]]
) -> np.ndarray:
    """Point indices (K,) of the polygon of outer ring ``outer``, every hole walked in through its cut.

    bounds: (R + 1,) ring bounds; foot_of: hole ring → point index of its cut's foot; hung: ring → [(point index of
    a cut's head on it, hole ring)]. A cut is walked head, foot, the hole ring round to its foot again, head.
    """
    pieces: list[np.ndarray] = []
    stack = [(*_walk(outer, int(bounds[outer]), bounds, hung), 0)]
    while stack:
        order, cuts, done = stack.pop()
        if cuts:
            at, hole = cuts.pop()
            pieces.append(order[done : at + 1])
            stack += [(order, cuts, at), (*_walk(hole, foot_of[hole], bounds, hung), 0)]
            continue
        pieces.append(order[done:])
        if stack:  # back up a cut: its foot, then the head it hangs from resumes the ring above
            pieces.append(order[:1])
    return np.concatenate(pieces)


def _walk(
    ring: int, start: int, bounds: np.ndarray, hung: dict[int, list[tuple[int, int]]]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Ring ``ring`` from point index ``start`` → its point indices in walking order (L,), and the cuts hanging from
    it as [(position in that order, hole ring)], last-walked first."""
    lo, hi = int(bounds[ring]), int(bounds[ring + 1])
    cuts = sorted((((head - start) % (hi - lo), hole) for head, hole in hung.get(ring, ())), reverse=True)
    order = np.arange(start, start + hi - lo)
    order[order >= hi] -= hi - lo
    return order, cuts


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()
