"""Mask work read from each mask's window of set pixels gives exactly what reading the whole frame gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from service.pipeline.refine import Refinement, refine_mask
from service.pipeline.review import mask_stats
from service.processing.masks import Bounds, encode_masks, mask_bounds, rle_from_window


def _reference_rle(mask: np.ndarray) -> bytes:
    return mask_utils.encode(np.asfortranarray(mask[:, :, None].view(np.uint8)))[0]["counts"]  # type: ignore[no-any-return]


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["noise", "rect", "full", "empty", "columns"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = np.zeros((h, w), bool)
    if kind == "noise":
        mask[:] = rng.random((h, w)) < rng.random()
    elif kind == "rect":
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        mask[y0 : rng.integers(y0, h + 1), x0 : rng.integers(x0, w + 1)] = True
    elif kind == "full":
        mask[:] = True
    elif kind == "columns":  # full-height columns: runs that cross from one column into the next
        mask[:, rng.integers(0, w) :] = True
    return mask


@settings(max_examples=400, deadline=None)
@given(masks(), st.integers(0, 3), st.integers(0, 3))
def test_rle_from_the_window_is_pycocotools_rle(mask: np.ndarray, grow_y: int, grow_x: int) -> None:
    tight = mask_bounds(mask)
    assert rle_from_window(mask, tight) == _reference_rle(mask)
    if tight is not None:  # any window that holds the set pixels gives the same bytes
        h, w = mask.shape
        loose = Bounds(
            max(0, tight.y0 - grow_y), min(h, tight.y1 + grow_x), max(0, tight.x0 - grow_x), min(w, tight.x1)
        )
        assert mask_bounds(mask, loose) == tight
        assert rle_from_window(mask, loose) == _reference_rle(mask)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert (tight.y0, tight.y1, tight.x0, tight.x1) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    else:
        assert not mask.any()


@settings(max_examples=200, deadline=None)
@given(masks())
def test_stats_from_the_window_equal_the_whole_frames(mask: np.ndarray) -> None:
    whole = mask_stats(mask, 0.5, Bounds(0, mask.shape[0], 0, mask.shape[1]))
    assert mask_stats(mask, 0.5, mask_bounds(mask)) == whole == mask_stats(mask, 0.5)
    assert whole.area == int(mask.sum())


def test_encode_masks_with_windows_gives_the_same_bytes() -> None:
    rng = np.random.default_rng(1)
    batch = np.zeros((4, 60, 80), bool)
    batch[0, 10:30, 5:50] = True
    batch[1] = rng.random((60, 80)) < 0.3
    batch[3, :, 70:] = True
    plain = encode_masks(batch, "coco_rle")
    windowed = encode_masks(batch, "coco_rle", [mask_bounds(m) for m in batch])
    assert [m.rle_counts for m in windowed] == [m.rle_counts for m in plain]


@pytest.mark.parametrize("margin", [None, 0.1])
def test_refine_returns_a_window_holding_the_refined_mask(margin: float | None) -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((80, 90)) < 0.4
    mask[20:50, 30:70] = True
    window = refine_mask(
        mask, np.array([30, 20, 70, 50], np.float32), Refinement(min_region_area=20, box_margin=margin)
    )
    outside = mask.copy()
    outside[window.y0 : window.y1, window.x0 : window.x1] = False
    assert not outside.any() and mask.any()


def test_many_prompts_go_to_the_decoder_in_bounded_calls() -> None:
    """150 boxes → calls of at most MAX_PROMPTS_PER_CALL (bounded activation memory), every prompt once, in order."""
    from service.models.tensors import SegmenterSpec
    from service.processing.segmentation import MAX_PROMPTS_PER_CALL, SamPrompt, SegmenterProcessing

    none = np.zeros((0, 2), np.float32)
    prompts = [SamPrompt(np.array([i, i, i + 10, i + 10], np.float32), none, np.zeros(0, np.int32)) for i in range(150)]
    prompts.insert(70, SamPrompt(None, np.array([[5.0, 5.0]], np.float32), np.ones(1, np.int32)))
    batches = list(SegmenterProcessing(SegmenterSpec(image_size=1024)).prompt_batches(prompts, (480, 640), False))
    assert [len(indices) for indices, _ in batches] == [MAX_PROMPTS_PER_CALL, MAX_PROMPTS_PER_CALL, 22, 1]
    assert sorted(i for indices, _ in batches for i in indices) == list(range(151))
    assert all(len(batch.point_coords) == len(indices) for indices, batch in batches)
