"""The shifted shapes world: deterministic, exact ground truth, a new "cross" class, and a domain shift that is
measured against the plain world (lower shape contrast, more background texture)."""

from __future__ import annotations

import hashlib
import itertools

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from service.shapes import attributes, video, world
from service.shapes.dataset import coco_annotations
from service.shapes.shifted import (
    CROSS,
    SHIFTED_CLASSES,
    _render,
    coco_categories,
    render_shifted_scene,
    shifted_category,
    shifted_scenes,
    split_seed,
)
from service.shapes.world import MIN_VISIBLE, Scene

COMPARED = 16  # scenes of each world in the contrast and texture comparisons


@pytest.fixture(scope="module")
def rendered() -> list[tuple[Scene, list[np.ndarray]]]:
    """50 train scenes, each with its instances' full (unoccluded) masks."""
    return [_render(split_seed("train", i)) for i in range(50)]


@pytest.fixture(scope="module")
def train(rendered) -> list[Scene]:
    return [scene for scene, _ in rendered]


@pytest.fixture(scope="module")
def shifted_val() -> list[Scene]:
    return shifted_scenes("val", COMPARED)


@pytest.fixture(scope="module")
def plain_val() -> list[Scene]:
    return [world.render_scene(world.split_seed("val", i)) for i in range(COMPARED)]


def _digest(scene: Scene) -> str:
    h = hashlib.sha256(scene.image.tobytes())
    for inst in scene.instances:
        h.update(inst.mask.tobytes())
        h.update(repr((inst.category_id, inst.box)).encode())
    return h.hexdigest()


def _disk(diameter: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))


def _contrasts(scene: Scene) -> list[float]:
    """Per instance: Euclidean RGB distance between the mean of its pixels (2 px in from its edge) and the mean of
    the background 4–8 px around it (no shape's pixels), skipping instances with under 20 pixels of either."""
    union = np.any([inst.mask for inst in scene.instances], axis=0)
    image = scene.image.astype(np.float64)
    out = []
    for inst in scene.instances:
        mask = inst.mask.astype(np.uint8)
        inner = cv2.erode(mask, _disk(5)).astype(bool)
        ring = cv2.dilate(mask, _disk(17)).astype(bool) & ~cv2.dilate(mask, _disk(7)).astype(bool) & ~union
        if inner.sum() >= 20 and ring.sum() >= 20:
            out.append(float(np.linalg.norm(image[inner].mean(0) - image[ring].mean(0))))
    return out


def _background_texture(scene: Scene) -> float:
    """Mean |Laplacian of Gaussian (sigma 1.5 px)| of the grey image over background pixels 3 px or more from any
    shape: energy at periods of a few pixels, where texture lives and per-pixel sensor noise mostly does not."""
    union = np.any([inst.mask for inst in scene.instances], axis=0).astype(np.uint8)
    background = ~cv2.dilate(union, np.ones((7, 7), np.uint8)).astype(bool)
    grey = cv2.GaussianBlur(scene.image.astype(np.float32).mean(2), (0, 0), 1.5)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F))[background].mean())


def _edge_step(scene: Scene) -> float:
    """How far a shape's outermost pixels (those next to background) have stepped from the surrounding background
    to the shape's colour: 1 for a sharp edge, about 0.5–0.75 after a Gaussian blur of sigma 0.8–2 px. Projected on
    each shape's inner-minus-ring colour difference (as in ``_contrasts``), pooled over the scene's shapes."""
    union = np.any([inst.mask for inst in scene.instances], axis=0)
    next_to_background = cv2.dilate((~union).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    image = scene.image.astype(np.float64)
    along, total = 0.0, 0.0
    for inst in scene.instances:
        mask = inst.mask.astype(np.uint8)
        inner = cv2.erode(mask, _disk(5)).astype(bool)
        ring = cv2.dilate(mask, _disk(17)).astype(bool) & ~cv2.dilate(mask, _disk(7)).astype(bool) & ~union
        edge = inst.mask & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool) & next_to_background
        if min(inner.sum(), ring.sum(), edge.sum()) >= 20:
            step = image[inner].mean(0) - image[ring].mean(0)
            along += float((image[edge].mean(0) - image[ring].mean(0)) @ step)
            total += float(step @ step)
    return along / total


def test_same_seed_same_bytes_and_annotations_other_seeds_differ():
    seed = split_seed("train", 7)
    assert _digest(render_shifted_scene(seed)) == _digest(render_shifted_scene(seed))
    assert _digest(render_shifted_scene(seed)) != _digest(render_shifted_scene(seed + 1))


def test_masks_are_exact_boxes_bound_them_and_every_instance_stays_mostly_visible(rendered):
    for scene, full_masks in rendered[:20]:
        assert scene.image.dtype == np.uint8 and scene.image.shape == (scene.height, scene.width, 3)
        assert 256 <= scene.width <= 640 and 256 <= scene.height <= 640
        for i, (inst, full) in enumerate(zip(scene.instances, full_masks, strict=True)):
            assert inst.mask.shape == (scene.height, scene.width) and inst.mask.sum() > 0
            later = full_masks[i + 1 :]
            assert np.array_equal(inst.mask, full & ~np.any(later, axis=0) if later else full)  # painted on top
            assert inst.mask.sum() >= MIN_VISIBLE * full.sum()
            ys, xs = np.nonzero(inst.mask)
            assert inst.box == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            assert all(isinstance(v, float) for v in inst.box)


def test_crosses_are_a_new_class_drawn_for_about_one_shape_in_five(train):
    assert SHIFTED_CLASSES[: len(world.CLASSES)] == world.CLASSES and SHIFTED_CLASSES[CROSS] == "cross"
    ids = [inst.category_id for scene in train for inst in scene.instances]
    assert set(ids) == set(range(len(SHIFTED_CLASSES))), sorted(set(ids))
    share = ids.count(CROSS) / len(ids)
    assert 0.1 <= share <= 0.35 and len(ids) > 150, (share, len(ids))
    crosses = [inst for scene in train for inst in scene.instances if inst.category_id == CROSS]
    assert {shifted_category(inst) for inst in crosses} == {"cross"}
    # a plus sign: its area is 20/28 of its convex hull's (convex shapes ~1, the star ~0.56); unoccluded ones only
    solidity = []
    for inst in crosses:
        x0, y0, x1, y1 = (int(v) for v in inst.box)
        contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if len(contours) == 1 and min(x0, y0) > 0 and x1 < inst.mask.shape[1] and y1 < inst.mask.shape[0]:
            solidity.append(inst.mask.sum() / cv2.contourArea(cv2.convexHull(contours[0])))
    assert len(solidity) >= 10 and np.median(solidity) == pytest.approx(20 / 28, abs=0.06), solidity


def test_shapes_are_lower_contrast_than_in_the_plain_world_yet_distinguishable(shifted_val, plain_val):
    shifted = [c for scene in shifted_val for c in _contrasts(scene)]
    plain = [c for scene in plain_val for c in _contrasts(scene)]
    assert len(shifted) > 50 and len(plain) > 50
    assert np.mean(shifted) < 0.3 * np.mean(plain), (np.mean(shifted), np.mean(plain))
    assert min(shifted) > 10, min(shifted)  # low contrast, never none


def test_backgrounds_carry_more_fine_texture_than_in_the_plain_world(shifted_val, plain_val):
    shifted = np.mean([_background_texture(scene) for scene in shifted_val])
    plain = np.mean([_background_texture(scene) for scene in plain_val])
    assert shifted > 2 * plain, (shifted, plain)


def test_the_whole_image_is_blurred_so_shape_edges_are_soft(shifted_val, plain_val):
    shifted = np.mean([_edge_step(scene) for scene in shifted_val])
    plain = np.mean([_edge_step(scene) for scene in plain_val])
    assert shifted < 0.85 and plain > 0.95, (shifted, plain)


def test_split_seeds_never_collide_with_each_other_or_the_other_worlds():
    others = [*world.SPLIT_SEED_BASE.values(), *attributes.SPLIT_SEED_BASE.values(), *video.SPLIT_SEED_BASE.values()]
    spans = sorted((split_seed(split, 0), split_seed(split, 999_999)) for split in ("train", "val", "test"))
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(spans))  # a million scenes per split
    for (lo, hi), base in itertools.product(spans, others):  # every other world's split spans a million seeds too
        assert hi < base or lo >= base + 1_000_000, (lo, hi, base)
    assert [s.seed for s in shifted_scenes("test", 2, start=5)] == [split_seed("test", 5), split_seed("test", 6)]


def test_coco_annotations_load_in_pycocotools_with_the_cross_category(train):
    items = train[:10]
    dataset = coco_annotations(items)
    dataset["categories"] = coco_categories()
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHIFTED_CLASSES)
    for scene in items:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=scene.seed))
        assert len(anns) == len(scene.instances)
        for ann, inst in zip(anns, scene.instances, strict=True):
            assert ann["category_id"] == inst.category_id + 1
            assert np.array_equal(coco.annToMask(ann).astype(bool), inst.mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == inst.box
    assert any(inst.category_id == CROSS for scene in items for inst in scene.instances)
