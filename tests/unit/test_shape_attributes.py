"""The attribute shapes world: colour and size words true to the pixels, held-out combinations, distractors,
and the phrase sampling the open-vocabulary detector is trained with."""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import pytest

from service.shapes.attributes import (
    COLOUR_JITTER,
    COLOURS,
    FINE_CLASSES,
    HELD_OUT,
    LARGE_AREA,
    PALETTE,
    SIDE,
    SMALL_AREA,
    attribute_scenes,
    nearest_colour,
    render_attribute_scene,
    split_seed,
    yolo_fine_label_lines,
)
from service.shapes.world import CLASSES, MIN_VISIBLE, render_scene
from service.training.train_open_detector import (
    ALL_PHRASES,
    COLOUR_FREE_LEVELS,
    HELD_OUT_HUE,
    LEVELS,
    MAX_TEXTS,
    PhraseSampler,
    grey,
    hue_of,
    hue_turn,
    phrase,
)


def _digest(scene) -> str:
    h = hashlib.sha256(scene.image.tobytes())
    for inst in scene.instances:
        h.update(inst.mask.tobytes())
        h.update(repr((inst.shape, inst.colour, inst.size, inst.box)).encode())
    return h.hexdigest()


def test_the_original_world_is_unchanged():
    """The shipped demo models and their quality tests depend on render_scene staying byte-identical."""
    scene = render_scene(11)
    h = hashlib.sha256(scene.image.tobytes())
    for inst in scene.instances:
        h.update(inst.mask.tobytes())
        h.update(repr((inst.category_id, inst.box)).encode())
    assert h.hexdigest() == "576e393aeb7d4822593241cb4e19d2676466e894b289a74a06f967e327af9514"


def test_same_seed_same_scene():
    seed = split_seed("train", 5)
    assert _digest(render_attribute_scene(seed)) == _digest(render_attribute_scene(seed))
    assert _digest(render_attribute_scene(seed)) != _digest(render_attribute_scene(seed + 1))


def test_palette_colours_are_far_apart():
    rgb = {name: np.asarray(value, np.float64) for name, value in PALETTE.items()}
    closest = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    assert closest > 4 * COLOUR_JITTER * np.sqrt(3) / 2, closest  # jitter cannot carry one colour into another


def test_colour_words_match_the_rendered_pixels():
    checked = 0
    for scene in attribute_scenes("val", 30) + attribute_scenes("test", 10):
        for inst in scene.instances:
            median = np.median(scene.image[inst.mask].astype(np.float64), axis=0)
            assert nearest_colour(median) == inst.colour, (scene.seed, inst.colour, median)
            assert np.linalg.norm(median - np.asarray(PALETTE[inst.colour])) < 2 * COLOUR_JITTER * np.sqrt(3)
            checked += 1
    assert checked > 150


def test_size_words_match_the_area_and_masks_the_boxes():
    for scene in attribute_scenes("train", 30):
        assert scene.height == scene.width and SIDE[0] <= scene.width <= SIDE[1]
        for inst in scene.instances:
            lo, hi = SMALL_AREA if inst.size == "small" else LARGE_AREA
            assert lo <= inst.area_fraction <= hi
            # the visible part: at least MIN_VISIBLE of the drawn shape (which may lose up to 20 % at the border)
            visible = inst.mask.sum() / (scene.width * scene.height)
            assert MIN_VISIBLE * 0.8 * inst.area_fraction <= visible <= inst.area_fraction * 1.05 + 0.001
            ys, xs = np.nonzero(inst.mask)
            assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    sizes = {i.size for s in attribute_scenes("train", 10) for i in s.instances}
    assert sizes == {"small", "large"}


@pytest.mark.slow  # renders a few hundred scenes
def test_held_out_combinations_appear_only_in_the_test_split():
    def combos(split: str, n: int) -> set[tuple[str, str]]:
        return {(i.colour, i.shape) for s in attribute_scenes(split, n) for i in s.instances}

    train, val, test = combos("train", 250), combos("val", 100), combos("test", 60)
    assert not train & set(HELD_OUT) and not val & set(HELD_OUT)
    assert train | set(HELD_OUT) == set(itertools.product(COLOURS, CLASSES))  # every other combination is trained
    assert set(HELD_OUT) <= test


def test_scenes_hold_distractors():
    same_shape = same_colour = 0
    items = attribute_scenes("train", 60)
    for scene in items:
        pairs = list(itertools.combinations(scene.instances, 2))
        same_shape += any(a.shape == b.shape and a.colour != b.colour for a, b in pairs)
        same_colour += any(a.colour == b.colour and a.shape != b.shape for a, b in pairs)
    assert same_shape > len(items) / 2 and same_colour > len(items) / 2


def test_yolo_labels_name_the_fine_class():
    scene = attribute_scenes("train", 1)[0]
    for line, inst in zip(yolo_fine_label_lines(scene), scene.instances, strict=True):
        fine_id, *xywh = line.split()
        assert FINE_CLASSES[int(fine_id)] == (inst.size, inst.colour, inst.shape)
        assert all(0 < float(v) <= 1 for v in xywh)


def test_phrase_sampling_gives_each_box_one_true_phrase_and_only_true_negatives():
    sampler = PhraseSampler(MAX_TEXTS)
    random.seed(0)
    seen_levels = set()
    for scene in attribute_scenes("train", 40):
        fine = [FINE_CLASSES[i.fine_id] for i in scene.instances]
        labels = sampler({"cls": np.array([[i.fine_id] for i in scene.instances], np.float32)})
        texts, cls = labels["texts"], labels["cls"].reshape(-1).astype(int)
        assert len(texts) == MAX_TEXTS == len(set(texts)) and set(texts) <= set(ALL_PHRASES)
        level = next(lv for lv in LEVELS if phrase(lv, *fine[0]) == texts[cls[0]])
        seen_levels.add(level)
        for f, c in zip(fine, cls, strict=True):
            assert texts[c] == phrase(level, *f)  # its phrase at the image's level
        true_texts = {phrase(lv, *f) for lv in LEVELS for f in fine}
        negatives = set(texts) - {texts[c] for c in cls}
        assert not negatives & true_texts  # nothing trained as absent is in the image
        assert not {t for t in texts if any(t.endswith(f"{c} {k}") for c, k in HELD_OUT)}
    assert len(seen_levels) >= 4


def test_recolouring_changes_only_colour_free_levels_and_never_renders_a_held_out_pair():
    """``--recolour``: images trained at "star" / "small hexagon" are shown grey or hue-turned; images at levels
    that name a colour are left as they are, as is every image without the flag (the shipped file's recipe); a
    hue turn never brings a shape within HELD_OUT_HUE of a colour it is held out in."""
    scenes = attribute_scenes("train", 30)
    for recolour in (False, True):
        sampler = PhraseSampler(MAX_TEXTS, recolour=recolour)
        random.seed(0)
        changed_levels = set()
        for scene in scenes:
            fine = [FINE_CLASSES[i.fine_id] for i in scene.instances]
            image = np.ascontiguousarray(scene.image[..., ::-1])  # BGR, as ultralytics holds it
            labels = sampler({"cls": np.array([[i.fine_id] for i in scene.instances], np.float32), "img": image})
            cls = labels["cls"].reshape(-1).astype(int)
            level = next(lv for lv in LEVELS if phrase(lv, *fine[0]) == labels["texts"][cls[0]])
            if not np.array_equal(labels["img"], image):
                changed_levels.add(level)
        assert changed_levels == (set(COLOUR_FREE_LEVELS) if recolour else set())

    random.seed(1)
    hexagon = [("small", "blue", "hexagon"), ("large", "red", "star")]
    for _ in range(500):
        turn = hue_turn(hexagon)
        assert turn is not None
        for _, colour, shape in hexagon:
            for held_colour, held_shape in HELD_OUT:
                if held_shape == shape:
                    d = (hue_of(colour) + turn - hue_of(held_colour)) % 360
                    assert min(d, 360 - d) >= HELD_OUT_HUE
    grey_image = grey(np.array([[[215, 70, 30]]], np.uint8))  # BGR blue
    assert grey_image.tolist() == [[[75, 75, 75]]]  # ITU-R 601 luma in every channel
