"""Mask refinement: clipping to box + margin, and hole/island cleanup equal to sam2's own remove_small_regions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sam2.utils.amg import remove_small_regions

from service.pipeline.refine import Refinement, refine_mask


def _blobby_mask(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A mask with a main body, specks, small and large holes, kept off the image border."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), sigmaX=rng.uniform(1.5, 4))
    mask = noise > np.quantile(noise, rng.uniform(0.4, 0.8))
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
    return mask


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("area", [10, 50, 200])
def test_cleanup_equals_sam2_remove_small_regions(seed, area):
    mask = _blobby_mask(seed)
    expected, _ = remove_small_regions(mask, area, mode="holes")
    expected, _ = remove_small_regions(expected, area, mode="islands")
    got = mask.copy()
    refine_mask(got, None, Refinement(min_region_area=area))
    assert np.array_equal(got, expected)


def test_cleanup_works_on_a_view_of_column_major_memory():
    """The pipeline refines views into an (H, W, N) Fortran-ordered batch (what pycocotools encodes)."""
    masks = np.stack([_blobby_mask(s) for s in range(3)], axis=2).copy(order="F")
    expected = []
    for i in range(3):
        e, _ = remove_small_regions(masks[:, :, i], 100, mode="holes")
        expected.append(remove_small_regions(e, 100, mode="islands")[0])
    views = masks.transpose(2, 0, 1)
    for view in views:
        refine_mask(view, None, Refinement(min_region_area=100))
    assert all(np.array_equal(views[i], expected[i]) for i in range(3))


@pytest.mark.parametrize("order", ["C", "F"])
def test_equal_largest_islands_keep_sams_choice_in_either_memory_order(order):
    """All islands small and two equally large: SAM keeps the first in row-major order. A column-major mask is
    labelled as its transpose, which meets them the other way round."""
    mask = np.zeros((30, 30), bool)
    mask[2:5, 20:23] = True  # 9 px, first in row-major order
    mask[10:13, 3:6] = True  # 9 px, first in column-major order
    mask[25, 25] = True  # 1 px
    expected, _ = remove_small_regions(mask, 100, mode="islands")
    got = np.array(mask, order=order)
    refine_mask(got, None, Refinement(min_region_area=100))
    assert np.array_equal(got, expected) and got[3, 21] and not got[11, 4]


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    """Speckle, blobs or a few small rectangles in a frame of 1 to 60 pixels a side: masks touching the frame's edges,
    covering nearly all of it, or made of equally large islands."""
    h, w = (int(v) for v in rng.integers(1, 60, 2))
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.random((h, w)) < rng.uniform(0.05, 0.95)
    if kind == 1:
        noise = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), sigmaX=rng.uniform(0.5, 3))
        return noise > np.quantile(noise, rng.uniform(0.1, 0.9))
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 6)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    return mask


@pytest.mark.parametrize("order", ["C", "F"])
def test_cleanup_equals_sam2_on_any_mask_the_frames_edges_included(order):
    """SAM labels the whole frame: background between the mask and the frame's edge is a hole when small (a notch, a
    corner the mask leaves), and so is all of it when the frame is small. The window refined here used to be padded
    as if the frame went on beyond it (937 of these 1,998 non-empty masks came out otherwise than SAM's); ties among
    all small islands follow OpenCV's numbering of the whole frame (it labels 2 x 2 blocks from the frame's origin).
    An empty mask stays empty (SAM fills a frame smaller than the area: "all of it is a small hole")."""
    rng = np.random.default_rng(5)
    for case in range(2000):
        mask, area = _random_mask(rng), int(rng.choice([1, 3, 10, 50, 200, 5000]))
        expected, _ = remove_small_regions(mask, area, mode="holes")
        expected, _ = remove_small_regions(expected, area, mode="islands")
        got = np.array(mask, order=order)
        refine_mask(got, None, Refinement(min_region_area=area))
        assert np.array_equal(got, expected) or not mask.any(), (case, mask.shape, area)


def test_small_background_at_the_frames_edge_is_a_hole():
    notch = np.ones((6, 6), bool)
    notch[0, 2] = False  # between the mask and the frame's top edge
    corner = np.ones((20, 20), bool)
    corner[:3, :3] = False  # the 9 px the mask leaves at the frame's corner
    for mask in (notch, corner):
        refine_mask(mask, None, Refinement(min_region_area=100))
        assert mask.all()


def test_clipping_keeps_box_plus_margin_and_drops_the_rest():
    mask = np.ones((100, 200), bool)
    refine_mask(mask, np.array([50, 20, 150, 60], np.float32), Refinement(box_margin=0.1))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == (40, 160, 16, 64)  # 10 px and 4 px margins
    assert mask.sum() == 120 * 48


def test_clicks_only_masks_are_not_clipped_and_an_all_small_mask_keeps_its_largest_island():
    mask = np.zeros((50, 50), bool)
    mask[5:9, 5:9] = True  # 16 px
    mask[30:35, 30:35] = True  # 25 px, the largest
    refine_mask(mask, None, Refinement(min_region_area=100, box_margin=0.0))
    assert mask.sum() == 25 and mask[32, 32]


def test_none_changes_nothing():
    mask = _blobby_mask(3)
    before = mask.copy()
    refine_mask(mask, np.array([0, 0, 10, 10], np.float32), Refinement.NONE)
    assert np.array_equal(mask, before) and not Refinement.NONE.active
