"""The mask stage computes each mask only in its window (issue 22) and gives exactly what computing whole frames
gives: upsampled masks and stability counts, refinement, and every encoding's bytes; COCO RLE from a window, on the
host (numpy) or where a device-resident runner's logits are (torch, here on the CPU), is pycocotools' RLE."""

from __future__ import annotations

import tracemalloc
import types

import cv2
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from service.models.tensors import SegmenterSpec
from service.pipeline.masking import Masks
from service.pipeline.refine import Refinement, refine_mask, refine_window
from service.pipeline.review import mask_stats
from service.processing.masks import (
    EMPTY,
    PNG,
    POLYGON,
    RLE,
    Bounds,
    WindowedMask,
    encode_masks,
    encode_window,
    mask_bounds,
    rle_counts,
    window_runs,
)
from service.processing.segmentation import SamPrompt, SegmenterProcessing
from service.processing.upsampling import device_window_runs, sampling_axis, stability_scores, upsample_frame

LEVELS = (-1.0, 0.0, 1.0)  # stability's low level, the mask threshold, stability's high level


@pytest.fixture(scope="module")
def processing() -> SegmenterProcessing:
    return SegmenterProcessing(SegmenterSpec(image_size=256))


def _pycocotools_rle(mask: np.ndarray) -> bytes:
    return mask_utils.encode(np.asfortranarray(mask[:, :, None].view(np.uint8)))[0]["counts"]  # type: ignore[no-any-return]


def _column_major(crop: np.ndarray) -> np.ndarray:
    """A crop as the mask stage holds it: a view of column-major memory."""
    return np.ascontiguousarray(crop.T).T


# --- strategies -----------------------------------------------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn, side: int = 24) -> np.ndarray:
    """(H, W) bool masks, 1×1 up: noise, rectangles, full, empty, one pixel, the frame's last pixel, runs that cross
    from one column's last row into the next column's first row."""
    h, w = draw(st.integers(1, side)), draw(st.integers(1, side))
    kind = draw(st.sampled_from(["noise", "rect", "full", "empty", "pixel", "last", "across", "columns"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = np.zeros((h, w), bool)
    if kind == "noise":
        mask[:] = rng.random((h, w)) < rng.random()
    elif kind == "rect":
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        mask[y0 : rng.integers(y0, h + 1), x0 : rng.integers(x0, w + 1)] = True
    elif kind == "full":
        mask[:] = True
    elif kind == "pixel":
        mask[rng.integers(0, h), rng.integers(0, w)] = True
    elif kind == "last":  # the frame's last pixel (no trailing run of zeros), with or without more
        mask[:] = rng.random((h, w)) < rng.random() * 0.5
        mask[-1, -1] = True
    elif kind == "across":  # bottom of column x and top of column x + 1: one run in column-major order
        x = rng.integers(0, w)
        mask[h - rng.integers(1, h + 1) :, x] = True
        if x + 1 < w:
            mask[: rng.integers(1, h + 1), x + 1] = True
    elif kind == "columns":
        mask[:, rng.integers(0, w) : rng.integers(0, w + 1)] = True
    return mask


@st.composite
def windowed(draw: st.DrawFn, side: int = 24) -> tuple[np.ndarray, WindowedMask]:
    """A frame and the same mask held by a window that holds its set pixels: the tight one grown by 0-3 pixels a
    side, or as tall as the frame, or (empty masks) any window, EMPTY included."""
    mask = draw(frames(side))
    h, w = mask.shape
    tight = mask_bounds(mask)
    if tight is None:
        y0, x0 = draw(st.integers(0, h)), draw(st.integers(0, w))
        tight = Bounds(y0, draw(st.integers(y0, h)), x0, draw(st.integers(x0, w)))
    g = [draw(st.integers(0, 3)) for _ in range(4)]
    b = Bounds(max(0, tight.y0 - g[0]), min(h, tight.y1 + g[1]), max(0, tight.x0 - g[2]), min(w, tight.x1 + g[3]))
    if draw(st.booleans()):
        b = Bounds(0, h, b.x0, b.x1)
    b = EMPTY if b.empty else b
    return mask, WindowedMask(h, w, b, _column_major(b.crop(mask)))


def _near(value: float, rng: np.random.Generator) -> np.float32:
    """A float32 at, or within rounding of, ``value``."""
    v = np.float32(value)
    choices = [v, np.nextafter(v, np.float32(-9)), np.nextafter(v, np.float32(9)), v + np.float32(1e-6),
               v - np.float32(1e-6), v + np.float32(2e-5), v - np.float32(2e-5)]  # fmt: skip
    return np.float32(choices[int(rng.integers(0, len(choices)))])


@st.composite
def logits(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int]]:
    """(B, s, s) float32 low-res logits and an (H, W) to upsample them to (up or down, 1×1 included): random;
    values at or within rounding of -1, 0, +1; a blob on a far-negative background; cells near the levels on the
    grid's borders."""
    s, b = draw(st.integers(1, 12)), draw(st.integers(1, 3))
    hw = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    kind = draw(st.sampled_from(["random", "levels", "blob", "borders"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        out = rng.normal(0, 3, (b, s, s)).astype(np.float32)
    elif kind == "levels":
        out = np.array([_near(LEVELS[int(i)], rng) for i in rng.integers(0, 3, b * s * s)], np.float32)
        out = out.reshape(b, s, s)
    else:
        out = np.full((b, s, s), -20, np.float32)
        for m in out:
            if kind == "blob":
                y, x = rng.integers(0, s, 2)
                m[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = rng.uniform(-2, 8)
            else:
                edge = [(0, slice(None)), (s - 1, slice(None)), (slice(None), 0), (slice(None), s - 1)]
                m[edge[int(rng.integers(0, 4))]] = [_near(LEVELS[int(rng.integers(0, 3))], rng) for _ in range(s)]
    return out, hw


# --- RLE from a window ----------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(windowed())
def test_window_rle_on_the_host_and_with_torch_is_pycocotools_rle(case: tuple[np.ndarray, WindowedMask]) -> None:
    mask, held = case
    h, w = mask.shape
    expected = _pycocotools_rle(mask)
    assert rle_counts(window_runs(held)) == expected
    assert encode_window(held, RLE).rle_counts == expected
    crop = torch.from_numpy(np.ascontiguousarray(held.crop.T))  # x-major, as the device path holds it
    assert rle_counts(device_window_runs(crop, held.bounds, h, w)) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**27), min_size=1, max_size=40), st.booleans())
@example([2**26, 2**26 + 3, 2**26 + 5, 2**27], False)  # 4 counts of 6 characters: the overflow below, every run
def test_compressed_counts_are_pycocotools_for_any_runs(runs: list[int], starts_set: bool) -> None:
    """Run lengths of large frames (counts up to 2^27 pixels, differences of either sign from the fourth on): the
    compiled string is pycocotools' own (``frPyObjects`` of the same counts; its buffer of 6 characters a count
    holds differences under 2^29).

    pycocotools 2.0.11's ``rleToString`` writes its closing NUL one byte past that buffer when every count takes
    all 6 characters (|difference| >= 2^24), which corrupts glibc's heap (an abort in a later test). So the oracle
    gets one count more, one that encodes as the single character "0" (a difference of 0 from the fourth count on,
    else 0 itself), and that character is cut off its answer: each count's characters depend only on the counts
    before it."""
    runs = ([0] if starts_set else []) + [max(1, r) for r in runs]  # only the first run may be empty
    total = sum(runs)
    padded = [*runs, runs[-2] if len(runs) >= 3 else 0]
    compiled = mask_utils.frPyObjects({"size": [total, 1], "counts": padded}, total, 1)["counts"]
    assert compiled.endswith(b"0")
    expected = compiled[:-1]
    assert rle_counts(np.array(runs, np.int64)) == expected


@settings(max_examples=150, deadline=None)
@given(windowed(side=16))
def test_polygons_and_png_from_a_window_are_the_whole_frames(case: tuple[np.ndarray, WindowedMask]) -> None:
    mask, held = case
    assert np.array_equal(held.frame(), mask)
    for encoding in (POLYGON, PNG):
        assert encode_window(held, encoding) == encode_masks(mask[None], encoding)[0]
    tight = held.tight()
    assert (None if tight.bounds.empty else tight.bounds) == mask_bounds(mask)


# --- upsampling in windows ------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(logits(), st.data())
def test_windowed_upsampling_equals_the_whole_frames(
    processing: SegmenterProcessing, case: tuple[np.ndarray, tuple[int, int]], data: st.DataObject
) -> None:
    """Masks, stability scores and RLE from the windows (decided blocks counted whole) equal computing every pixel
    of the frame, on the host and with torch alike, with or without a window asked for."""
    low_res, hw = case
    h, w = hw
    within = []
    for _ in low_res:
        y0, x0 = data.draw(st.integers(0, h)), data.draw(st.integers(0, w))
        within.append(data.draw(st.sampled_from([None, Bounds(y0, data.draw(st.integers(y0, h)), x0, w)])))
    host = processing.postprocess(low_res, hw, within, rle=True)
    device = processing.postprocess(torch.from_numpy(low_res), hw, within, rle=True)
    full = np.stack([upsample_frame(m, hw) for m in low_res])
    expected = full > 0
    for m, clip in zip(expected, within, strict=True):
        if clip is not None:
            outside = np.ones(hw, bool)
            clip.crop(outside)[...] = False
            m[outside] = False
    assert np.array_equal(host.masks, expected)
    np.testing.assert_array_equal(host.stability, stability_scores(full, 0.0))
    assert host.rle == [_pycocotools_rle(m) for m in expected]
    assert np.array_equal(device.masks, host.masks)
    np.testing.assert_array_equal(device.stability, host.stability)
    assert device.rle == host.rle
    for held, clip in zip(host.windows, within, strict=True):
        assert clip is None or held.bounds.empty or held.bounds.intersect(clip) == held.bounds


def test_weights_are_opencvs_and_masks_differ_from_opencvs_only_within_rounding_of_the_threshold(
    processing: SegmenterProcessing,
) -> None:
    """The old path upsampled with cv2.resize (IPP arithmetic): our float32 sums use its weights exactly and may
    only disagree about pixels whose logit is within float rounding of 0."""
    rng = np.random.default_rng(3)
    for hw in ((301, 457), (1155, 866), (4000, 3000), (17, 5)):
        side = 256 if hw[0] > 100 else 64
        eye = np.eye(side, dtype=np.float32)
        for pixels, axis in ((hw[1], sampling_axis(hw[1], side)), (hw[0], sampling_axis(hw[0], side))):
            weights = cv2.resize(eye, (pixels, side), interpolation=cv2.INTER_LINEAR)  # (cells, pixels)
            ours = np.zeros_like(weights)
            np.add.at(ours, (axis.lo, np.arange(pixels)), axis.w0)
            np.add.at(ours, (axis.hi, np.arange(pixels)), axis.w1)
            assert np.array_equal(ours, weights)
        low_res = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), 3) * 40
        opencv = cv2.resize(np.ascontiguousarray(low_res.T), hw, interpolation=cv2.INTER_LINEAR).T
        ours = processing.postprocess(low_res[None], hw).masks[0]
        differ = ours != (opencv > 0)
        assert not differ[np.abs(opencv) > 1e-5].any()
        assert np.abs(upsample_frame(low_res, hw) - opencv).max() <= 1e-5 * (1 + np.abs(low_res).max())


def test_a_small_object_on_a_large_image_is_computed_in_its_own_window(processing: SegmenterProcessing) -> None:
    """12 MP, one object of 3 × 3 low-res cells (a trained SAM's logits: far negative elsewhere): the mask's window
    is its cells grown by one (about 5 × 5 cells of 15.6 × 11.7 pixels), yet stability counts the whole frame."""
    hw = (4000, 3000)
    low_res = np.full((1, 256, 256), -20, np.float32)
    low_res[0, 100:103, 40:43] = 6.0
    low_res[0, 101, 41] = 0.5  # a pixel-level question inside the object
    up = processing.postprocess(low_res, hw)
    b = up.windows[0].bounds
    assert (b.y1 - b.y0) <= 5 * 16 and (b.x1 - b.x0) <= 5 * 12
    full = upsample_frame(low_res[0], hw)
    assert np.array_equal(up.masks[0], full > 0)
    np.testing.assert_array_equal(up.stability, stability_scores(full[None], 0.0))


def test_torch_logits_are_upsampled_for_every_mask_at_once_in_passes(
    processing: SegmenterProcessing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device-resident runner's logits: 40 masks of windows from 1 pixel to the whole frame (and empty ones) are
    upsampled in passes of similar windows, a few kernels each however many masks a pass holds (a GPU would
    otherwise launch dozens of kernels per mask), with the host path's masks, counts and RLE bit for bit; a pass
    bounded by its padded pixels splits, and a window larger than the bound goes alone."""
    from service.processing import upsampling

    rng = np.random.default_rng(11)
    hw = (173, 229)
    low_res = cv2.GaussianBlur(rng.standard_normal((40, 64, 64)).astype(np.float32), (0, 0), 1.5) * 20 - 3
    low_res[::7] = -15  # empty masks
    low_res[5] = 8.0  # the whole frame
    within = [None if i % 3 else Bounds(i, i + 1 + 4 * i, 2 * i, 2 * i + 1 + i) for i in range(40)]
    host = processing.postprocess(low_res, hw, within, rle=True)
    passes: list[int] = []
    original = upsampling._Grid._upsample_pass

    def counted(grid: object, across: torch.Tensor, *args: object) -> torch.Tensor:
        passes.append(across.shape[0])
        return original(grid, across, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(upsampling._Grid, "_upsample_pass", counted)
    counts = []
    for bound in (1 << 25, hw[0] * hw[1] // 2):
        monkeypatch.setattr(upsampling, "_PASS_PIXELS", bound)
        passes.clear()
        device = processing.postprocess(torch.from_numpy(low_res), hw, within, rle=True)
        assert np.array_equal(device.masks, host.masks)
        np.testing.assert_array_equal(device.stability, host.stability)
        assert device.rle == host.rle
        assert [w.bounds for w in device.windows] == [w.bounds for w in host.windows]
        assert all(w.crop.T.flags.c_contiguous for w in device.windows)  # column-major, as pycocotools reads
        assert sum(passes) == sum(not w.bounds.empty for w in host.windows)  # each mask in one pass
        counts.append(len(passes))
    assert counts[0] == 1 and counts[1] >= 3
    assert 1 in passes  # the whole frame's window, over half the bound, went alone


def test_memory_follows_the_windows_not_the_frame(processing: SegmenterProcessing) -> None:
    """Eight small objects: the peak memory of postprocess at 12 MP is about that at 0.12 MP (no whole frame of
    floats, 48 MB, or of bools, 12 MB, is ever held); what it holds grows with the batch's low-res logits."""
    low_res = np.full((8, 256, 256), -20, np.float32)
    for i, m in enumerate(low_res):
        m[20 * i : 20 * i + 12, 30 * i : 30 * i + 9] = 5.0

    def peak(hw: tuple[int, int]) -> int:
        processing.postprocess(low_res[:1], hw)  # the axis tables, once
        tracemalloc.start()
        try:
            up = processing.postprocess(low_res, hw, rle=True)
            assert all(w.crop.size < hw[0] * hw[1] / 100 for w in up.windows)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak((4000, 3000)) < peak((400, 300)) + (2 << 20)


# --- refinement and the whole stage ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    windowed(side=32),
    st.sampled_from([0, 1, 3, 12]),
    st.sampled_from([None, 0.0, 0.1, 0.5]),
    st.tuples(st.floats(-5, 30), st.floats(-5, 30), st.floats(0, 20), st.floats(0, 20)),
)
def test_refining_a_window_equals_refining_the_frame(
    case: tuple[np.ndarray, WindowedMask], area: int, margin: float | None, box: tuple[float, float, float, float]
) -> None:
    mask, held = case
    refinement = Refinement(min_region_area=area, box_margin=margin)
    xyxy = np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]], np.float32)
    expected = mask.copy()
    refine_mask(expected, xyxy, refinement)
    got = refine_window(held, xyxy, refinement)
    assert np.array_equal(got.frame(), expected)
    if got.parts is not None:  # island removal counted the parts review reads
        assert got.parts == mask_stats(expected, 1.0).components
    assert area == 0 or got.parts is not None


def test_when_every_island_is_small_the_same_one_stays_as_on_the_frame() -> None:
    """Equal-sized islands, all under the area: the survivor is OpenCV's first label in the frame's orientation."""
    mask = np.zeros((40, 40), bool)
    for y, x in ((3, 30), (20, 4), (30, 25), (10, 12)):
        mask[y : y + 3, x : x + 3] = True
    expected = mask.copy()
    refine_mask(expected, None, Refinement(min_region_area=50))
    held = WindowedMask(40, 40, Bounds(0, 40, 0, 40), _column_major(mask))
    assert np.array_equal(refine_window(held, None, Refinement(min_region_area=50)).frame(), expected)
    assert expected.sum() == 9


def _frame_stage(
    low_res: np.ndarray, hw: tuple[int, int], prompts: list[SamPrompt], p: types.SimpleNamespace
) -> list[tuple[bytes, tuple[tuple[float, ...], ...], bytes, object, object]]:
    """The mask stage on whole frames (before issue 22): what every windowed result must equal."""
    out = []
    for logit, prompt in zip(low_res, prompts, strict=True):
        full = upsample_frame(logit, hw)
        mask = np.asfortranarray(full > 0)
        window = refine_mask(mask, prompt.box, p.refinement) if p.refinement.active else None
        bounds = mask_bounds(mask, window)
        (encoded,) = encode_masks(mask[None], p.mask_encoding, [bounds] if p.mask_encoding == RLE else None)
        box = None
        if prompt.box is None and bounds is not None:
            box = (bounds.x0, bounds.y0, bounds.x1, bounds.y1)
        stats = mask_stats(mask, float(stability_scores(full[None], 0.0)[0]), bounds)
        out.append((encoded.rle_counts, encoded.polygons, encoded.png, box, stats))
    return out


@pytest.mark.parametrize("encoding", [RLE, POLYGON, PNG])
@pytest.mark.parametrize(
    "refinement", [Refinement.NONE, Refinement(box_margin=0.1), Refinement(min_region_area=20, box_margin=0.1)]
)
@pytest.mark.parametrize("on", ["host", "device"])
def test_the_stage_gives_the_whole_frame_stages_bytes(
    processing: SegmenterProcessing, encoding: str, refinement: Refinement, on: str
) -> None:
    """Masks.finish (windows, on the mask pool; torch logits as a device-resident runner's) vs the same stage on
    whole frames: RLE, polygons, PNG, boxes of clicks-only prompts and review stats, byte for byte."""
    rng = np.random.default_rng(5)
    hw = (97, 131)
    low_res = cv2.GaussianBlur(rng.standard_normal((6, 32, 32)).astype(np.float32), (0, 0), 2) * 30 - 2
    low_res[4] = -15  # an empty mask
    none, no_labels = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
    prompts = [SamPrompt(np.array([10, 5, 60 + 10 * i, 50 + 5 * i], np.float32), none, no_labels) for i in range(4)]
    prompts += [SamPrompt(None, np.array([[30.0, 40.0]], np.float32), np.ones(1, np.int32))] * 2
    p = types.SimpleNamespace(refinement=refinement, mask_encoding=encoding)
    image = types.SimpleNamespace(height=hw[0], width=hw[1])
    masks = Masks(runner=None, segmentation=processing, mask_threads=2)  # type: ignore[arg-type]  # finish needs none
    final = masks.finish(low_res if on == "host" else torch.from_numpy(low_res), image, p, prompts)  # type: ignore[arg-type]
    expected = _frame_stage(low_res, hw, prompts, p)
    got = [
        (e.rle_counts, e.polygons, e.png, None if b is None else tuple(int(v) for v in b), s)
        for e, b, s in zip(final.encoded, final.boxes, final.stats, strict=True)
    ]
    assert got == expected
    assert any(s.area for s in final.stats) and any(not s.area for s in final.stats)
