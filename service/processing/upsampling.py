"""SAM's mask upsampling computed only where it matters: each mask's window of pixels, its stability counted
over the whole frame without computing decided blocks, on numpy (host logits) or torch (a device-resident runner's),
with the same results as upsampling every pixel (``upsample_frame``). ``SegmenterProcessing.postprocess`` calls it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from service.processing import native
from service.processing.masks import EMPTY, Bounds, WindowedMask, rle_counts, window_runs

MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0  # logits; SAM's automatic mask generator's stability_score_offset
# A block of pixels (those between the same 2 × 2 low-res cells) is above / below a level without computing its
# pixels when all 4 cells clear it by this × (1 + the mask's largest |logit|): far more than the float32 rounding of
# a convex combination of them (~1e-7 relative), so such blocks hold exactly what computing every pixel gives.
_DECIDED_MARGIN = 1e-5
_BLOCKS_AT_ONCE = 4096  # undecided blocks computed at a time (~16 x 16 pixels each)
# A window whose undecided blocks hold more than this fraction of its pixels is computed pixel by pixel (separable
# sums stream; one block at a time gathers): a trained SAM's masks are undecided only along their outlines.
_SPARSE_BLOCKS = 0.15
# Padded window pixels of one pass of ``_Grid.every_window`` (masks upsampled at once where the logits are, torch):
# a pass holds two float32 arrays of that many values (256 MB).
_PASS_PIXELS = 1 << 25


@dataclasses.dataclass(frozen=True)
class UpsampledMasks:
    """B masks at original resolution, each held as its window (``WindowedMask``: the pixels its upsampled logits
    can set, within the window the caller asked for; a crop of column-major memory, the layout pycocotools' RLE
    reads); stability: (B,) float32 SAM stability scores of the whole frame's upsampled logits
    (``stability_scores``); rle: B pycocotools compressed counts of the masks as they are, when asked for (their
    runs computed where the logits are), else None."""

    windows: list[WindowedMask]
    stability: np.ndarray
    rle: list[bytes] | None = None

    @property
    def masks(self) -> np.ndarray:
        """(B, H, W) bool, the whole frames (a view of (H, W, B) column-major memory; B × H × W bytes), for callers
        that compare frames."""
        if not self.windows:
            return np.zeros((0, 0, 0), bool)
        first = self.windows[0]
        out = np.zeros((first.height, first.width, len(self.windows)), bool, order="F")
        for i, m in enumerate(self.windows):
            m.bounds.crop(out[:, :, i])[...] = m.crop
        return out.transpose(2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Axis:
    """Bilinear sampling of one axis, ``cells`` low-res cells → ``pixels`` pixels with half-pixel centres (sam2's
    ``F.interpolate(align_corners=False)``, OpenCV's INTER_LINEAR, edges clamped): pixel i = cell lo[i] * w0[i] +
    cell hi[i] * w1[i]; lo, hi (pixels,) int64, w0, w1 (pixels,) float32, the source coordinate computed in float64
    as OpenCV computes it. start: (cells + 1,) int64, the pixels whose lo cell is c are start[c]:start[c + 1] (the
    pixels of block c; hi = min(c + 1, cells - 1) for all of them)."""

    lo: np.ndarray
    hi: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    start: np.ndarray

    @property
    def block_pixels(self) -> np.ndarray:
        """(cells,) int64 pixels of each block."""
        return np.diff(self.start)


@functools.lru_cache(maxsize=32)
def sampling_axis(pixels: int, cells: int) -> Axis:
    """The ``Axis`` of ``cells`` → ``pixels`` (cached: a few image sizes serve many requests)."""
    f = (np.arange(pixels) + 0.5) * (1.0 / (pixels / cells)) - 0.5
    lo = np.floor(f).astype(np.int64)
    w1 = (f - lo).astype(np.float32)
    w1[(lo < 0) | (lo >= cells - 1)] = 0  # clamped at the edges: the edge cell alone
    lo = np.clip(lo, 0, cells - 1)
    hi = np.minimum(lo + 1, cells - 1)
    for a in (lo, hi, w1):
        a.flags.writeable = False
    w0 = np.float32(1) - w1
    w0.flags.writeable = False
    start = np.searchsorted(lo, np.arange(cells + 1))
    start.flags.writeable = False
    return Axis(lo, hi, w0, w1, start)


def upsample_windows(
    logits: Any, orig_hw: tuple[int, int], within: Sequence[Bounds | None] | None = None, rle: bool = False
) -> UpsampledMasks:
    """(B, s, s) float32 logits → B masks at original resolution, each computed only in its window, and their
    stability scores (``SegmenterProcessing.postprocess`` says how). Numpy logits are processed on the CPU; a torch
    tensor (a device-resident runner's) on its device, by the same code with torch's operations."""
    if isinstance(logits, np.ndarray):
        return _windowed(_HOST, logits.astype(np.float32, copy=False), orig_hw, within, rle)
    import torch

    with torch.inference_mode():
        return _windowed(_TorchOps(torch, logits.device), logits.float(), orig_hw, within, rle)


def _windowed(
    ops: _Ops, logits: Any, orig_hw: tuple[int, int], within: Sequence[Bounds | None] | None, rle: bool
) -> UpsampledMasks:
    """``postprocess`` of (B, s, s) float32 logits, numpy or torch as ``ops``."""
    h, w = orig_hw
    clips = list(within) if within is not None else [None] * logits.shape[0]
    grid = _grid(h, w, logits.shape[-1], ops)
    low, high, margin = grid.block_extremes(logits)
    inter = grid.count_above(logits, low, high, margin, MASK_THRESHOLD + STABILITY_OFFSET)
    union = grid.count_above(logits, low, high, margin, MASK_THRESHOLD - STABILITY_OFFSET)
    spans = grid.windows(high, margin, MASK_THRESHOLD)
    summary = ops.host(ops.cat([inter[:, None], union[:, None], spans], 1))  # the one value that must cross
    bounds = []
    for row, clip in zip(summary, clips, strict=True):
        window = Bounds(*(int(v) for v in row[2:]))
        window = window.intersect(clip) if clip is not None else window
        bounds.append(EMPTY if window.empty else window)
    crops: Iterable[Crop]
    if ops.at_once:  # torch: every window at once, and the crops cross to the host in one copy
        crops = grid.every_window(logits, bounds, MASK_THRESHOLD)
    else:  # numpy: mask by mask, decided blocks whole
        crops = (_host_crop(grid.mask(logits, i, (low, high, margin), b, MASK_THRESHOLD)) for i, b in enumerate(bounds))
    windows, encoded = [], []
    for window, crop in zip(bounds, crops, strict=True):
        if rle:
            encoded.append(rle_counts(ops.runs(crop.there, window, h, w)))
        windows.append(WindowedMask(h, w, window, crop.host.T))
    stability = stability_from_counts(summary[:, 0], summary[:, 1])
    return UpsampledMasks(windows, stability, encoded if rle else None)


@dataclasses.dataclass(frozen=True)
class Crop:
    """One mask's (x1 - x0, y1 - y0) bool crop of its window, x-major (the frame's column-major order): where the
    logits are (``there``) and on the host."""

    there: Any
    host: np.ndarray


def _host_crop(crop: np.ndarray) -> Crop:
    return Crop(crop, crop)


class _Ops:
    """The array operations of ``_Grid`` that numpy and torch spell differently (the rest they share), and where the
    arrays live. ``xp``: the array module."""

    xp: Any
    at_once = False  # upsample every mask's window in one pass (``_Grid.every_window``), not mask by mask

    def put(self, a: np.ndarray) -> Any:
        """A host table → an array where the logits are."""
        raise NotImplementedError

    def host(self, a: Any) -> np.ndarray:
        raise NotImplementedError

    def nonzero(self, a: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def arange(self, n: int) -> Any:
        raise NotImplementedError

    def cat(self, parts: list[Any], axis: int = 0) -> Any:
        raise NotImplementedError

    def add_at(self, target: Any, index: Any, values: Any) -> None:
        """target[index] += values, repeated indices adding up."""
        raise NotImplementedError

    def bools(self, shape: tuple[int, int]) -> Any:
        raise NotImplementedError

    def pad_edge(self, a: Any) -> Any:
        """(B, s, s) → (B, s + 1, s + 1), the last row and column repeated."""
        raise NotImplementedError

    def repeat(self, a: Any, counts: Any, axis: int) -> Any:
        """Element k along ``axis`` repeated counts[k] times."""
        raise NotImplementedError

    def runs(self, crop: Any, window: Bounds, height: int, width: int) -> np.ndarray:
        """The COCO RLE run lengths (K,) int64 of an (H, W) mask whose set pixels lie in ``window``, from its
        (x1 - x0, y1 - y0) bool x-major crop (``masks.window_runs``), computed where the crop is."""
        raise NotImplementedError


class _NumpyOps(_Ops):
    xp = np

    def put(self, a: np.ndarray) -> Any:
        return a

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def nonzero(self, a: Any) -> tuple[Any, ...]:
        return np.nonzero(a)

    def arange(self, n: int) -> Any:
        return np.arange(n)

    def cat(self, parts: list[Any], axis: int = 0) -> Any:
        return np.concatenate(parts, axis)

    def add_at(self, target: Any, index: Any, values: Any) -> None:
        np.add.at(target, index, values)

    def bools(self, shape: tuple[int, int]) -> Any:
        return np.zeros(shape, bool)

    def pad_edge(self, a: Any) -> Any:
        return np.pad(a, ((0, 0), (0, 1), (0, 1)), mode="edge")

    def repeat(self, a: Any, counts: Any, axis: int) -> Any:
        return np.repeat(a, counts, axis)

    def runs(self, crop: Any, window: Bounds, height: int, width: int) -> np.ndarray:
        return window_runs(WindowedMask(height, width, window, crop.T))


_HOST = _NumpyOps()


@dataclasses.dataclass(frozen=True, eq=True)
class _TorchOps(_Ops):
    """torch's operations on one device (hashable: grids are cached per device)."""

    xp: Any
    device: Any
    at_once = True  # a device's kernels per mask would cost more than its pixels

    def put(self, a: np.ndarray) -> Any:
        return self.xp.tensor(a, device=self.device)

    def host(self, a: Any) -> np.ndarray:
        return a.cpu().numpy()  # type: ignore[no-any-return]

    def nonzero(self, a: Any) -> tuple[Any, ...]:
        return a.nonzero(as_tuple=True)  # type: ignore[no-any-return]

    def arange(self, n: int) -> Any:
        return self.xp.arange(n, device=self.device)

    def cat(self, parts: list[Any], axis: int = 0) -> Any:
        return self.xp.cat(parts, axis)

    def add_at(self, target: Any, index: Any, values: Any) -> None:
        target.index_add_(0, index, values)

    def bools(self, shape: tuple[int, int]) -> Any:
        return self.xp.zeros(shape, dtype=self.xp.bool, device=self.device)

    def pad_edge(self, a: Any) -> Any:
        return self.xp.nn.functional.pad(a[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]

    def runs(self, crop: Any, window: Bounds, height: int, width: int) -> np.ndarray:
        return device_window_runs(crop, window, height, width)


def device_window_runs(crop: Any, window: Bounds, height: int, width: int) -> np.ndarray:
    """``masks.window_runs`` with torch's operations where the crop is: crop (x1 - x0, y1 - y0) bool tensor, the
    window of an (H, W) mask x-major (its column-major order), every set pixel of the mask inside it. Run
    boundaries are found on the crop's device; only the run lengths (K,) int64 cross to the host."""
    import torch

    h, total = height, height * width
    if window.empty:
        return np.array([total], np.int64)
    rows = window.y1 - window.y0
    flat = crop.reshape(-1)
    change = (flat[1:] != flat[:-1]).nonzero().flatten() + 1  # positions whose pixel differs from the one before
    if rows == h:  # whole columns: the crop is the frame's pixels x0 * H ... x1 * H in order
        first, last = flat[:1].nonzero().flatten(), flat[-1:].nonzero().flatten() + len(flat)
        edges = window.x0 * h + torch.cat([first, change, last])
    else:
        change = change[change % rows != 0]  # a column's first pixel follows background, not the column before
        starts = flat[::rows].nonzero().flatten()  # columns whose first pixel is set: a run starts at row y0
        ends = flat[rows - 1 :: rows].nonzero().flatten()  # columns whose last pixel is set: one ends at row y1
        at_change = (window.x0 + change // rows) * h + window.y0 + change % rows
        at_ends = [(window.x0 + starts) * h + window.y0, (window.x0 + ends) * h + window.y1]
        edges = torch.cat([at_change, *at_ends]).sort().values
    runs = torch.diff(edges, prepend=edges.new_zeros(1), append=edges.new_full((1,), total)).cpu().numpy()
    return runs[:-1] if runs[-1] == 0 else runs  # a mask reaching the frame's last pixel: no trailing zeros


@functools.lru_cache(maxsize=16)
def _grid(height: int, width: int, side: int, ops: _Ops) -> _Grid:
    """The ``_Grid`` of one image size where ``ops`` computes (a few sizes serve many requests)."""
    return _Grid(ops, height, width, side)


class _Grid:
    """Windowed bilinear upsampling of (s, s) logits to (H, W) with the operations of ``ops`` (``postprocess``).

    Tables (``Axis``) are built once per image size and put where the logits are."""

    def __init__(self, ops: _Ops, height: int, width: int, side: int) -> None:
        self.ops, self.xp, self.height, self.width = ops, ops.xp, height, width
        self.rows, self.cols = sampling_axis(height, side), sampling_axis(width, side)
        self.y = [ops.put(a) for a in (self.rows.lo, self.rows.hi, self.rows.w0, self.rows.w1, self.rows.start)]
        self.x = [ops.put(a) for a in (self.cols.lo, self.cols.hi, self.cols.w0, self.cols.w1, self.cols.start)]
        self.area = ops.put(np.outer(self.rows.block_pixels, self.cols.block_pixels))  # (s, s) int64 block pixels
        self.has_pixels = self.area > 0
        self.longest = (int(self.rows.block_pixels.max()), int(self.cols.block_pixels.max()))
        self.index = ops.arange(side)

    def block_extremes(self, logits: Any) -> tuple[Any, Any, Any]:
        """(B, s, s) logits → the min and max (B, s, s) of the 2 × 2 cells each block's pixels mix, and (B,) the
        margin by which they must clear a level to decide the block (``_DECIDED_MARGIN``)."""
        xp = self.xp
        ext = self.ops.pad_edge(logits)
        corners = (ext[:, :-1, :-1], ext[:, 1:, :-1], ext[:, :-1, 1:], ext[:, 1:, 1:])
        low = xp.minimum(xp.minimum(corners[0], corners[1]), xp.minimum(corners[2], corners[3]))
        high = xp.maximum(xp.maximum(corners[0], corners[1]), xp.maximum(corners[2], corners[3]))
        margin = _DECIDED_MARGIN * (1 + xp.amax(abs(logits).reshape(logits.shape[0], -1), 1))
        return low, high, margin

    def count_above(self, logits: Any, low: Any, high: Any, margin: Any, level: float) -> Any:
        """(B,) int64 pixels of the frame whose upsampled logit is > ``level``: decided blocks whole, the others
        pixel by pixel."""
        m = margin[:, None, None]
        above, below = low > level + m, high < level - m
        count = self.xp.where(above, self.area, 0).sum((1, 2))
        b, r, c = self.ops.nonzero(~(above | below) & self.has_pixels)
        for k in range(0, len(b), _BLOCKS_AT_ONCE):
            at = slice(k, k + _BLOCKS_AT_ONCE)
            values, valid, _, _ = self._block_values(logits, b[at], r[at], c[at])
            self.ops.add_at(count, b[at], ((values > level) & valid).sum((1, 2)))
        return count

    def _block_values(self, logits: Any, b: Any, r: Any, c: Any) -> tuple[Any, Any, Any, Any]:
        """Blocks (b: mask, r: row, c: column), (M,) each → their pixels' upsampled logits (M, bh, bw) float32,
        which of those are pixels of the block (M, bh, bw) bool (blocks differ in size by a pixel), and the pixels'
        rows (M, bh) and columns (M, bw) (clamped to the frame where not valid)."""
        ylo, yhi, yw0, yw1, ystart = self.y
        xlo, xhi, xw0, xw1, xstart = self.x
        ys = ystart[r][:, None] + self.ops.arange(self.longest[0])
        xs = xstart[c][:, None] + self.ops.arange(self.longest[1])
        valid = (ys < ystart[r + 1][:, None])[:, :, None] & (xs < xstart[c + 1][:, None])[:, None, :]
        ys, xs = ys.clip(max=self.height - 1), xs.clip(max=self.width - 1)
        b, c0, c1 = b[:, None], c[:, None], xhi[xstart[c]][:, None]
        a0, a1, r0, r1 = yw0[ys], yw1[ys], ylo[ys], yhi[ys]
        # The operations of ``_mask_every_pixel``, in its order: along y first, then along x.
        h0 = logits[b, r0, c0] * a0 + logits[b, r1, c0] * a1
        h1 = logits[b, r0, c1] * a0 + logits[b, r1, c1] * a1
        values = h0[:, :, None] * xw0[xs][:, None, :] + h1[:, :, None] * xw1[xs][:, None, :]
        return values, valid, ys, xs

    def windows(self, high: Any, margin: Any, level: float) -> Any:
        """(B, 4) int64 pixel windows y0, y1, x0, x1 of the blocks whose pixels can exceed ``level`` (0s: none)."""
        xp, index = self.xp, self.index
        reach = (high >= level - margin[:, None, None]) & self.has_pixels
        spans = []
        for axis, start in ((2, self.y[4]), (1, self.x[4])):
            hit = reach.any(axis)  # (B, s): block rows / columns that reach the level
            first, last = (hit * (len(index) - index)).argmax(1), (hit * index).argmax(1)
            spans += [start[first], start[last + 1]]
        found = reach.reshape(reach.shape[0], -1).any(1)[:, None]
        return xp.where(found, xp.stack(spans, 1), 0)

    def mask(self, logits: Any, i: int, extremes: tuple[Any, Any, Any], window: Bounds, level: float) -> Any:
        """Mask ``i`` of (B, s, s) logits → (x1 - x0, y1 - y0) bool, its upsampled logits > ``level`` in ``window``,
        x-major (the window's column-major order). ``extremes``: ``block_extremes`` of the logits. Where few of the
        window's blocks are undecided (a trained SAM's masks: only the outline), decided blocks are filled and
        only the undecided ones computed; else every pixel (``_mask_every_pixel``). Host logits (numpy)
        only: torch's go through ``every_window``."""
        out_shape = (window.x1 - window.x0, window.y1 - window.y0)
        if window.empty:
            return self.ops.bools(out_shape)
        low, high, margin = (e[i] for e in extremes)
        r0, r1 = int(self.rows.lo[window.y0]), int(self.rows.lo[window.y1 - 1]) + 1  # the window's blocks
        c0, c1 = int(self.cols.lo[window.x0]), int(self.cols.lo[window.x1 - 1]) + 1
        above = low[r0:r1, c0:c1] > level + margin
        undecided = ~above & (high[r0:r1, c0:c1] >= level - margin)
        r, c = self.ops.nonzero(undecided)
        if len(r) * self.longest[0] * self.longest[1] > _SPARSE_BLOCKS * out_shape[0] * out_shape[1]:
            return self._mask_every_pixel(logits[i], window, level)
        # Decided blocks whole: block (r, c) covers its pixels within the window.
        rows = np.diff(np.clip(self.rows.start[r0 : r1 + 1], window.y0, window.y1))
        cols = np.diff(np.clip(self.cols.start[c0 : c1 + 1], window.x0, window.x1))
        out = self.ops.repeat(self.ops.repeat(above.T, self.ops.put(cols), 0), self.ops.put(rows), 1)
        for k in range(0, len(r), _BLOCKS_AT_ONCE):
            at = slice(k, k + _BLOCKS_AT_ONCE)
            b = self.xp.full_like(r[at], i)
            values, valid, ys, xs = self._block_values(logits, b, r[at] + r0, c[at] + c0)
            in_y, in_x = (ys >= window.y0) & (ys < window.y1), (xs >= window.x0) & (xs < window.x1)
            valid &= in_y[:, :, None] & in_x[:, None, :]
            at_x = self.xp.broadcast_to((xs - window.x0)[:, None, :], values.shape)[valid]
            at_y = self.xp.broadcast_to((ys - window.y0)[:, :, None], values.shape)[valid]
            out[at_x, at_y] = values[valid] > level
        return out

    def every_window(self, logits: Any, windows: Sequence[Bounds], level: float) -> list[Crop]:
        """Each mask of (B, s, s) logits → its ``Crop`` in ``windows[i]``: upsampled logits > ``level``, every pixel
        computed as ``_mask_every_pixel`` computes it (the same operations in the same order: the same bits), in
        passes over masks of similar windows padded to the largest (``_PASS_PIXELS`` at most, a larger window
        alone), each a few kernels however many masks it holds. The crops cross to the host in one copy."""
        xp, ops = self.xp, self.ops
        sizes = [0 if b.empty else (b.x1 - b.x0) * (b.y1 - b.y0) for b in windows]
        across = logits.transpose(1, 2)  # (B, x cells, y cells)
        parts, offsets, at = [], [0] * len(windows), 0
        for group in _passes(windows, sizes):
            tall = max(windows[i].y1 - windows[i].y0 for i in group)
            wide = max(windows[i].x1 - windows[i].x0 for i in group)
            ys, in_y = self._pixels([(windows[i].y0, windows[i].y1) for i in group], tall, self.height)
            xs, in_x = self._pixels([(windows[i].x0, windows[i].x1) for i in group], wide, self.width)
            inside = in_x[:, :, None] & in_y[:, None, :]  # (M, X, Y): the pixels of each mask's own window
            parts.append(self._upsample_pass(across[ops.put(np.array(group))], ys, xs, level)[inside])
            for i in group:
                offsets[i], at = at, at + sizes[i]
        packed = xp.cat(parts) if parts else ops.bools((0, 0)).reshape(-1)
        host = ops.host(packed)
        crops = []
        for i, b in enumerate(windows):
            shape = (b.x1 - b.x0, b.y1 - b.y0) if sizes[i] else (0, 0)
            span = slice(offsets[i], offsets[i] + sizes[i])
            crops.append(Crop(packed[span].reshape(shape), host[span].reshape(shape)))
        return crops

    def _pixels(self, spans: list[tuple[int, int]], longest: int, limit: int) -> tuple[Any, Any]:
        """Per mask, its window's pixels [start, stop) along one axis padded to ``longest``: (M, longest) int64
        (clamped to the frame's ``limit``) and which are the window's (M, longest) bool."""
        start, stop = (self.ops.put(np.array(v, np.int64)[:, None]) for v in zip(*spans, strict=True))
        at = start + self.ops.arange(longest)
        return at.clip(max=limit - 1), at < stop

    def _upsample_pass(self, across: Any, ys: Any, xs: Any, level: float) -> Any:
        """(M, s, s) logits x-major, pixel rows (M, Y) and columns (M, X) → (M, X, Y) upsampled logits > ``level``:
        along y first, then along x, as ``_mask_every_pixel``."""
        ylo, yhi, yw0, yw1, _ = self.y
        xlo, xhi, xw0, xw1, _ = self.x
        xp, m, side = self.xp, across.shape[0], across.shape[1]
        rows = (m, side, ys.shape[1])
        along_y = xp.gather(across, 2, ylo[ys][:, None].expand(rows)) * yw0[ys][:, None]
        along_y += xp.gather(across, 2, yhi[ys][:, None].expand(rows)) * yw1[ys][:, None]
        cols = (m, xs.shape[1], ys.shape[1])
        values = xp.gather(along_y, 1, xlo[xs][:, :, None].expand(cols)) * xw0[xs][:, :, None]
        values += xp.gather(along_y, 1, xhi[xs][:, :, None].expand(cols)) * xw1[xs][:, :, None]
        return values > level

    def _mask_every_pixel(self, logit: Any, window: Bounds, level: float) -> Any:
        """``mask`` computing every pixel of the window: the separable sum, along y then along x, in one compiled
        pass (``native.upsample_window``)."""
        ylo, yhi, yw0, yw1, _ = self.y
        xlo, xhi, xw0, xw1, _ = self.x
        out = self.ops.bools((window.x1 - window.x0, window.y1 - window.y0))
        ys, xs = slice(window.y0, window.y1), slice(window.x0, window.x1)
        c0, c1 = int(self.cols.lo[window.x0]), int(self.cols.hi[window.x1 - 1]) + 1
        cells = logit.T[c0:c1]  # (columns of cells, s)
        native.upsample_window(
            cells, ylo[ys], yhi[ys], yw0[ys], yw1[ys], xlo[xs] - c0, xhi[xs] - c0, xw0[xs], xw1[xs], level, out
        )
        return out


def _passes(windows: Sequence[Bounds], sizes: list[int]) -> Iterator[list[int]]:
    """The masks with pixels in their windows, largest first, in groups whose windows padded to the group's tallest
    and widest hold at most ``_PASS_PIXELS`` pixels (a larger window alone)."""
    order = sorted((i for i, n in enumerate(sizes) if n), key=lambda i: -sizes[i])
    group: list[int] = []
    tall = wide = 0
    for i in order:
        t, w = max(tall, windows[i].y1 - windows[i].y0), max(wide, windows[i].x1 - windows[i].x0)
        if group and (len(group) + 1) * t * w > _PASS_PIXELS:
            yield group
            group, t, w = [], windows[i].y1 - windows[i].y0, windows[i].x1 - windows[i].x0
        group.append(i)
        tall, wide = t, w
    if group:
        yield group


def upsample_frame(logits: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """(s, s) float32 logits → (H, W) float32, every pixel of the frame upsampled as ``postprocess`` computes the
    pixels of its windows (the reference its windows and counts are tested against; H × W floats)."""
    rows, cols = sampling_axis(orig_hw[0], logits.shape[-1]), sampling_axis(orig_hw[1], logits.shape[-1])
    along_y = logits.T[:, rows.lo] * rows.w0 + logits.T[:, rows.hi] * rows.w1  # (s, H)
    return (along_y[cols.lo] * cols.w0[:, None] + along_y[cols.hi] * cols.w1[:, None]).T


def stability_scores(logits: np.ndarray, threshold: float, offset: float = STABILITY_OFFSET) -> np.ndarray:
    """(B, H, W) float32 mask logits → (B,) float32 IoU of (logits > threshold + offset) and
    (logits > threshold - offset); 1.0 where both are empty (SAM's ``calculate_stability_score``)."""
    flat = logits.reshape(logits.shape[0], -1)
    inter = (flat > threshold + offset).sum(axis=1, dtype=np.int64)
    union = (flat > threshold - offset).sum(axis=1, dtype=np.int64)
    return stability_from_counts(inter, union)


def stability_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """(B,) int64 pixel counts of (logits > threshold + offset) and (logits > threshold - offset) → (B,) float32
    stability scores (``stability_scores``; device-resident masks count on their device)."""
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float32)
