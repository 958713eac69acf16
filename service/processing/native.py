"""The mask stage's per-pixel loops, compiled by numba: each does in one pass what numpy did in several, and runs
without the GIL, so the mask pool's threads share the cores.

Every kernel computes exactly what the numpy it replaces computed (the tests compare them bit for bit):
``upsample_window`` the same float32 operations in the same order as ``upsampling``'s separable sums (no fused
multiply-add: numba compiles without fast-math), ``compressed_counts`` pycocotools' own string of a mask's runs
(``rleToString``).

Each kernel has one signature (arrays of any layout), compiled when this module is first imported and cached beside
it (numba's ``cache=True``; elsewhere under ``NUMBA_CACHE_DIR`` or the user's cache when this folder is read-only),
so later processes load it in milliseconds.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types


def _read(dtype: types.Type, ndim: int) -> types.Array:
    """An array argument the kernel only reads: any layout, writable or not (numba converts a writable one)."""
    return types.Array(dtype, ndim, "A", readonly=True)


_F1, _F2 = _read(types.float32, 1), _read(types.float32, 2)
_I1 = _read(types.int64, 1)
_OUT = types.Array(types.boolean, 2, "A")


@numba.njit(types.void(_F2, _I1, _I1, _F1, _F1, _I1, _I1, _F1, _F1, types.float32, _OUT), nogil=True, cache=True)
def upsample_window(cells, ylo, yhi, yw0, yw1, xlo, xhi, xw0, xw1, level, out):  # type: ignore[no-untyped-def]
    """Bilinear upsampling of a window, thresholded: out[x, y] = (along_y[xlo[x], y] * xw0[x] + along_y[xhi[x], y]
    * xw1[x]) > level, where along_y[c, y] = cells[c, ylo[y]] * yw0[y] + cells[c, yhi[y]] * yw1[y].

    cells: (C, s) float32, the low-res logits' columns the window reads (x-major); ylo, yhi, yw0, yw1: (Y,) the
    window's rows' cells and weights; xlo, xhi, xw0, xw1: (X,) its columns' (cells counted from the first of
    ``cells``); out: (X, Y) bool, x-major."""
    rows = ylo.shape[0]
    along_y = np.empty((cells.shape[0], rows), np.float32)
    for c in range(cells.shape[0]):
        for y in range(rows):
            along_y[c, y] = cells[c, ylo[y]] * yw0[y] + cells[c, yhi[y]] * yw1[y]
    for x in range(out.shape[0]):
        lo, hi, w0, w1 = xlo[x], xhi[x], xw0[x], xw1[x]
        for y in range(rows):
            out[x, y] = along_y[lo, y] * w0 + along_y[hi, y] * w1 > level


@numba.njit(types.Array(types.uint8, 1, "C")(_I1), nogil=True, cache=True)
def compressed_counts(runs):  # type: ignore[no-untyped-def]
    """Run lengths (K,) int64 → pycocotools' compressed counts as bytes (``rleToString``: each count, less the one
    two before it from the fourth on, in 5-bit groups with a continuation bit, + 48)."""
    out = np.empty(runs.shape[0] * 13 + 1, np.uint8)  # 13 groups hold any int64
    p = 0
    for i in range(runs.shape[0]):
        x = runs[i]
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out[p] = c + 48
            p += 1
    return out[:p]
