"""Polygon mask encoding, checked the way users read it: pycocotools frPyObjects → merge → decode.

Masks are (H, W) bool; polygons are flattened [x0, y0, x1, y1, ...] in original-image pixels, pycocotools' frame
(pixel (r, c) is the unit square [c, c + 1] × [r, r + 1]).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.processing.masks import POLYGON, encode_masks

Polygons = tuple[tuple[float, ...], ...]
SEEDS = range(60)
MIN_IOU = 0.98


def rasterise(polygons: Polygons, h: int, w: int) -> np.ndarray:
    """Polygons → (H, W) bool, exactly as a pycocotools user does it."""
    if not polygons:
        return np.zeros((h, w), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([list(p) for p in polygons], h, w))).astype(bool)


def encode(mask: np.ndarray) -> Polygons:
    (encoded,) = encode_masks(mask[None], POLYGON)
    assert (encoded.height, encoded.width) == mask.shape
    return encoded.polygons


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool → the same with every hole filled (outer contours drawn filled)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(mask.astype(np.uint8), contours, -1, (1,), thickness=-1).astype(bool)


def bbox_at_least(mask: np.ndarray, side: int) -> bool:
    ys, xs = np.nonzero(mask)
    return bool(len(xs) > 0 and np.ptp(xs) + 1 >= side and np.ptp(ys) + 1 >= side)


# Shape generators: (rng, canvas (H, W) uint8 zeros) → canvas drawn with 1s. Centres may sit near or past the
# border, so many shapes are clipped by it.


def _centre(rng: np.random.Generator, img: np.ndarray) -> tuple[int, int]:
    h, w = img.shape
    return int(rng.integers(-w // 8, w + w // 8)), int(rng.integers(-h // 8, h + h // 8))


def _radius(rng: np.random.Generator, img: np.ndarray, low: int = 1) -> int:
    return int(rng.integers(low, max(low + 1, min(img.shape) // 2)))


def disc(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    return cv2.circle(img, _centre(rng, img), _radius(rng, img), (1,), -1)


def ellipse(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    axes = (_radius(rng, img), _radius(rng, img))
    return cv2.ellipse(img, _centre(rng, img), axes, float(rng.uniform(0, 180)), 0, 360, (1,), -1)


def rotated_rect(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    size = (2 * _radius(rng, img), 2 * _radius(rng, img))
    corners = cv2.boxPoints((_centre(rng, img), size, float(rng.uniform(0, 90))))
    return cv2.fillPoly(img, [np.round(corners).astype(np.int32)], (1,))


def star(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    n, (cx, cy), r = int(rng.integers(3, 12)), _centre(rng, img), _radius(rng, img, 2)
    angles = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
    radii = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.2, 0.8))
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return cv2.fillPoly(img, [np.round(points).astype(np.int32)], (1,))


def noise_blob(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Thresholded smoothed noise: irregular outlines, several components, holes."""
    noise = cv2.GaussianBlur(rng.standard_normal(img.shape).astype(np.float32), (0, 0), float(rng.uniform(1, 12)))
    return img | (noise > rng.uniform(0, 1.5) * noise.std()).astype(np.uint8)


def thin_line(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    line_type = int(rng.choice([cv2.LINE_4, cv2.LINE_8]))
    return cv2.line(img, _centre(rng, img), _centre(rng, img), (1,), 1, lineType=line_type)


def pixels(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    img[rng.integers(0, h, 6), rng.integers(0, w, 6)] = 1
    return img


def several(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    for _ in range(int(rng.integers(2, 6))):
        img = HOLE_FREE[int(rng.integers(4))](rng, img)  # disc, ellipse, rotated_rect or star
    return img


HOLE_FREE: list[Callable[[np.random.Generator, np.ndarray], np.ndarray]] = [
    disc,
    ellipse,
    rotated_rect,
    star,
    noise_blob,
    thin_line,
    pixels,
    several,
]


def donut(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    centre, r = (w // 2, h // 2), _radius(rng, img, 4)
    cv2.circle(img, centre, r, (1,), -1)
    return cv2.circle(img, centre, int(rng.integers(1, r - 1)), (0,), -1)


def thin_ring(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    return cv2.circle(img, (w // 2, h // 2), _radius(rng, img, 3), (1,), int(rng.integers(1, 4)))


def letter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    text, scale = str(rng.choice(list("B8AOPQRDg0@%&"))), min(h, w) / 30
    return cv2.putText(img, text, (w // 8, h - h // 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (1,), int(rng.integers(1, 6)))


def swiss_cheese(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A rectangle with several holes: discs, squares and single pixels, some clipped by the border."""
    h, w = img.shape
    img[h // 8 : h - h // 8, : w - w // 8] = 1
    for _ in range(int(rng.integers(2, 12))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.3:
            img[y, x] = 0
        else:
            cv2.circle(img, (x, y), int(rng.integers(1, max(2, min(h, w) // 10))), (0,), -1)
    return img


def nested(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Concentric levels: object, hole, island in the hole, hole in the island, ..."""
    h, w = img.shape
    r, step = min(h, w) // 2 - 1, int(rng.integers(2, 8))
    for level, radius in enumerate(range(r, 0, -step)):
        cv2.circle(img, (w // 2, h // 2), radius, (1 - level % 2,), -1)
    return img


def checkerboard_holes(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Holes touching each other only diagonally (separate 4-connected background regions)."""
    h, w = img.shape
    img[2 : h - 2, 2 : w - 2] = 1
    k = int(rng.integers(2, 8))
    ys, xs = np.mgrid[0:h, 0:w]
    img[(ys >= 4) & (ys < 4 + 2 * k) & (xs >= 4) & (xs < 4 + 2 * k) & ((ys + xs) % 2 == 0)] = 0
    return img


def holed_blob(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    cv2.ellipse(img, (w // 2, h // 2), (w // 2 - 1, h // 2 - 1), 0, 0, 360, (1,), -1)
    noise = cv2.GaussianBlur(rng.standard_normal(img.shape).astype(np.float32), (0, 0), float(rng.uniform(1, 6)))
    return img & (noise < noise.std()).astype(np.uint8)


def speckle(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Pixel noise: diagonal touches, one-pixel holes and islands, holes in islands, everywhere."""
    h, w = img.shape
    img[h // 4 : h - h // 4, w // 4 : w - w // 4] = rng.random((h - h // 4 * 2, w - w // 4 * 2)) < rng.uniform(0.3, 0.8)
    return img


HOLED = [donut, thin_ring, letter, swiss_cheese, nested, checkerboard_holes, holed_blob, speckle]


def hole_free_masks(seed: int) -> list[np.ndarray]:
    """Seeded hole-free masks of every kind, from a few pixels to a few hundred across."""
    rng = np.random.default_rng(seed)
    masks = []
    for kind in HOLE_FREE:
        h, w = (int(v) for v in rng.integers(4, 320, 2))
        mask = fill_holes(kind(rng, np.zeros((h, w), np.uint8)).astype(bool))
        if not mask.any():
            mask[h // 2, w // 2] = True
        masks.append(mask)
    return masks


def holed_masks(seed: int) -> list[np.ndarray]:
    """Seeded masks of every holed kind, at least 32 × 32 px (a kind whose holes closed up is left out)."""
    rng = np.random.default_rng(seed)
    masks = []
    for kind in HOLED:
        h, w = (int(v) for v in rng.integers(34, 320, 2))
        mask = kind(rng, np.zeros((h, w), np.uint8)).astype(bool)
        if (fill_holes(mask) & ~mask).any():
            masks.append(mask)
    return masks


def check_valid(polygons: Polygons, h: int, w: int) -> None:
    for p in polygons:
        xy = np.asarray(p).reshape(-1, 2)
        assert len(p) >= 6 and len(p) % 2 == 0
        assert (xy >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_hole_free_masks_rasterise_back_exactly(seed: int) -> None:
    for mask in hole_free_masks(seed):
        polygons = encode(mask)
        check_valid(polygons, *mask.shape)
        back = rasterise(polygons, *mask.shape)
        if bbox_at_least(mask, 32):
            assert iou(back, mask) >= MIN_IOU
        assert np.array_equal(back, mask), f"{(back != mask).sum()} pixels differ"


@pytest.mark.parametrize("seed", SEEDS)
def test_holes_stay_empty_and_holed_masks_rasterise_back_exactly(seed: int) -> None:
    for mask in holed_masks(seed):
        polygons = encode(mask)
        check_valid(polygons, *mask.shape)
        back = rasterise(polygons, *mask.shape)
        assert not (back & fill_holes(mask) & ~mask).any(), "a hole was filled"
        assert iou(back, mask) >= MIN_IOU
        assert np.array_equal(back, mask), f"{(back != mask).sum()} pixels differ"


def test_every_kind_of_holed_mask_is_exercised() -> None:
    assert sum(len(holed_masks(seed)) for seed in SEEDS) >= 0.9 * len(HOLED) * len(SEEDS)


def test_iou_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Min / mean IoU over the hole-free (bbox ≥ 32 × 32) and holed sets, printed even without ``-s``."""
    summary = {}
    for name, make in [("hole-free", hole_free_masks), ("holed", holed_masks)]:
        masks = [m for seed in SEEDS for m in make(seed) if bbox_at_least(m, 32)]
        ious = [iou(rasterise(encode(m), *m.shape), m) for m in masks]
        summary[name] = (min(ious), float(np.mean(ious)), len(ious))
    with capsys.disabled():
        for name, (low, mean, n) in summary.items():
            print(f"\npolygon → pycocotools IoU, {name}: min {low:.6f}, mean {mean:.6f} over {n} masks")
    assert all(low >= MIN_IOU for low, _, _ in summary.values())


def test_pycocotools_fills_the_pixels_whose_centres_are_inside() -> None:
    """The rasteriser facts the vertex convention rests on: pixel (r, c) is the square [c, c + 1] × [r, r + 1]."""
    square = rasterise(((0, 0, 10, 0, 10, 10, 0, 10),), 14, 14)
    assert square[:10, :10].all() and square.sum() == 100
    for offset, first in [(0.4, 2), (0.5, 3)]:  # an edge on a pixel centre leaves that pixel out (top / left)
        v = (2 + offset, 8 + offset)
        shifted = rasterise(((v[0], v[0], v[1], v[0], v[1], v[1], v[0], v[1]),), 14, 14)
        assert np.array_equal(np.flatnonzero(shifted.any(axis=0)), np.arange(first, first + 6))


def test_a_single_pixel_is_a_diamond_on_its_edge_midpoints() -> None:
    mask = np.zeros((5, 6), bool)
    mask[2, 3] = True
    (diamond,) = encode(mask)
    assert sorted(zip(diamond[0::2], diamond[1::2], strict=True)) == [(3, 2.5), (3.5, 2), (3.5, 3), (4, 2.5)]
    assert np.array_equal(rasterise((diamond,), 5, 6), mask)


def test_a_square_follows_its_pixel_edges() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    (octagon,) = encode(mask)
    xs, ys = octagon[0::2], octagon[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 20, 5, 15) and len(octagon) == 16


def test_a_40px_disc_round_trips() -> None:
    """Contours through pixel centres (the old encoding) lose half a pixel all round: IoU 0.94 here."""
    mask = cv2.circle(np.zeros((60, 60), np.uint8), (30, 30), 20, (1,), -1).astype(bool)
    assert iou(rasterise(encode(mask), 60, 60), mask) >= MIN_IOU


def test_a_donut_keeps_its_hole_in_its_one_polygon() -> None:
    """Outer contours alone (the old encoding) fill the hole."""
    mask = np.zeros((80, 80), bool)
    mask[10:70, 10:70] = True
    mask[30:50, 25:45] = False
    polygons = encode(mask)
    back = rasterise(polygons, 80, 80)
    assert len(polygons) == 1 and not back[30:50, 25:45].any() and np.array_equal(back, mask)


def test_an_island_in_a_hole_is_its_own_polygon_and_merge_keeps_the_hole() -> None:
    mask = np.zeros((90, 90), bool)
    mask[5:85, 5:85] = True
    mask[20:70, 20:70] = False  # hole
    mask[30:60, 30:60] = True  # island in the hole
    mask[40:50, 40:50] = False  # hole in the island
    polygons = encode(mask)
    assert len(polygons) == 2
    assert np.array_equal(rasterise(polygons, 90, 90), mask)


def test_an_empty_mask_has_no_polygons() -> None:
    assert encode(np.zeros((7, 9), bool)) == ()


def test_vertices_only_where_the_outline_turns() -> None:
    """Collinear points merged; about as many vertices as OpenCV's CHAIN_APPROX_SIMPLE, not a per-pixel staircase."""
    for seed in range(10):
        for mask in hole_free_masks(seed) + holed_masks(seed):
            polygons = encode(mask)
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            assert sum(len(p) // 2 for p in polygons) <= 2 * sum(len(c) for c in contours) + 4 * len(contours)
            for p in polygons:
                xy = np.asarray(p).reshape(-1, 2)
                d_in, d_out = xy - np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0) - xy
                assert (d_in[:, 0] * d_out[:, 1] != d_in[:, 1] * d_out[:, 0]).all()


def test_encode_masks_gives_one_polygon_set_per_mask() -> None:
    masks = np.zeros((3, 40, 50), bool)
    masks[0, 5:9, 5:9] = masks[1, 0, 0] = True
    encoded = encode_masks(masks, POLYGON)
    assert [len(e.polygons) for e in encoded] == [1, 1, 0]
    assert all((e.height, e.width, e.encoding) == (40, 50, POLYGON) for e in encoded)
