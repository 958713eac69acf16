"""The shapes video world: pure functions of a seed, ground truth true to the painted pixels (visible masks,
boxes, fractions), the events a tracker is tested on (entries, exits, full occlusions, distractors), MOT17 lines,
and the image worlds left as they were."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.shapes import video as video_module
from service.shapes.attributes import (
    COLOUR_JITTER,
    HELD_OUT,
    LARGE_AREA,
    PALETTE,
    SMALL_AREA,
    nearest_colour,
    render_attribute_scene,
)
from service.shapes.attributes import SPLIT_SEED_BASE as ATTRIBUTE_SEEDS
from service.shapes.attributes import split_seed as attribute_seed
from service.shapes.video import (
    OBJECTS,
    SPLIT_SEED_BASE,
    ShapesVideo,
    TrackPlan,
    VideoFrame,
    make_video,
    mot_lines,
    seqinfo_ini,
    split_of,
    split_seed,
)
from service.shapes.world import CLASSES, _outline, render_scene
from service.shapes.world import SPLIT_SEED_BASE as WORLD_SEEDS

BATCH = 10  # default videos the event statistics are taken over


@cache
def _video(split: str, index: int) -> ShapesVideo:
    return make_video(split_seed(split, index))


@cache
def _coverage(index: int) -> tuple[np.ndarray, np.ndarray]:
    return _video("val", index).coverage()


def _digest(frame: VideoFrame) -> str:
    h = hashlib.sha256(frame.image.tobytes())
    for tr in frame.objects + frame.hidden:
        h.update(tr.mask.tobytes())
        h.update(repr((tr.track_id, tr.shape, tr.colour, tr.size, tr.box, tr.visible, tr.in_frame)).encode())
    return h.hexdigest()


def _full_mask(video: ShapesVideo, plan: TrackPlan, t: int) -> tuple[np.ndarray, int]:
    """The shape's in-frame pixels and the count of all its pixels, drawn independently: on a canvas padded so the
    whole polygon lies inside (PIL clips polygons at a canvas edge in its own way)."""
    pad = int(2 * plan.radius) + 4  # an alive shape's circumscribed circle meets the frame
    cx, cy = plan.centre(t)
    img = Image.new("L", (video.width + 2 * pad, video.height + 2 * pad), 0)
    outline = _outline(CLASSES.index(plan.shape), cx + pad, cy + pad, plan.radius, plan.angle_at(t))
    ImageDraw.Draw(img).polygon(outline, fill=1)
    big = np.asarray(img, dtype=bool)
    return big[pad:-pad, pad:-pad], int(big.sum())


def test_the_image_worlds_are_unchanged():
    """Measured before service/shapes/video.py existed: the video world only imports their helpers."""
    assert hashlib.sha256(render_scene(0).image.tobytes()).hexdigest() == (
        "996f87efb6588e9aeae1f7871ebad0069538a271511a8405b6bc8e38a4bbf842"
    )
    assert hashlib.sha256(render_attribute_scene(attribute_seed("train", 0)).image.tobytes()).hexdigest() == (
        "9f9872e1510c34a18be844c19450524f00b6c3e4d086496ab609f75eab32141b"
    )


def test_split_seeds_never_collide_with_the_image_worlds():
    bases = sorted([*WORLD_SEEDS.values(), *ATTRIBUTE_SEEDS.values(), *SPLIT_SEED_BASE.values()])
    assert all(b - a >= 1_000_000 for a, b in itertools.pairwise(bases))
    assert set(SPLIT_SEED_BASE.values()).isdisjoint([*WORLD_SEEDS.values(), *ATTRIBUTE_SEEDS.values()])
    for split in SPLIT_SEED_BASE:
        assert split_of(split_seed(split, 0)) == split == split_of(split_seed(split, 999_999))


def test_the_video_module_stays_on_the_ground_floor():
    tree = ast.parse(Path(video_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {name for name in imported if name.split(".")[0] not in {"numpy", "PIL", "scipy", "service"}}
    assert outside <= {"__future__", "dataclasses", "math", "collections.abc", "statistics", "typing"}, outside
    assert all(name.startswith("service.shapes.") for name in imported if name.startswith("service"))


def test_same_seed_same_video_and_different_seeds_differ():
    a, b = make_video(split_seed("train", 3)), make_video(split_seed("train", 3))
    assert a.plans == b.plans and np.array_equal(a.background, b.background)
    for i in (0, 41, a.length - 1):
        assert _digest(a.frame(i)) == _digest(b.frame(i))
    c = make_video(split_seed("train", 4))
    assert c.plans != a.plans and _digest(c.frame(0)) != _digest(a.frame(0))


def test_a_frame_rendered_alone_equals_the_same_frame_of_the_iteration():
    streamed = [_digest(f) for f in make_video(split_seed("val", 7), frames=24)]
    fresh = make_video(split_seed("val", 7), frames=24)
    assert [_digest(fresh.frame(i)) for i in reversed(range(24))][::-1] == streamed
    assert len(streamed) == len(fresh) == 24
    with pytest.raises(IndexError):
        fresh.frame(24)


def test_masks_are_disjoint_and_are_the_painted_pixels():
    checked = 0
    for index in range(3):
        video = _video("val", index)
        quiet = dataclasses.replace(video, noise=0.0)  # the same frames without sensor noise
        background = np.clip(video.background, 0, 255).astype(np.uint8)
        for t in range(0, video.length, 17):
            frame, plain = video.frame(t), quiet.frame(t)
            assert frame.image.shape == (video.height, video.width, 3) and frame.image.dtype == np.uint8
            cover = np.zeros((video.height, video.width), np.int32)
            for tr in frame.objects + frame.hidden:
                cover += tr.mask
            assert cover.max() <= 1  # disjoint
            # outside every mask: the background alone (exactly, without noise); the noise is small
            assert np.array_equal(plain.image[cover == 0], background[cover == 0])
            noise = frame.image[cover == 0].astype(np.float64) - plain.image[cover == 0]
            assert 2 < noise.std() < 4
            for tr in frame.objects:
                median = np.median(frame.image[tr.mask].astype(np.float64), axis=0)
                assert nearest_colour(median) == tr.colour, (video.seed, t, tr.track_id, median)
                assert np.linalg.norm(median - np.asarray(PALETTE[tr.colour])) < 2 * COLOUR_JITTER * np.sqrt(3)
                # painted: the object's pixels differ from the background under them
                assert np.abs(plain.image[tr.mask].astype(np.int16) - background[tr.mask]).max() > 0
                checked += 1
            assert all(not tr.mask.any() and tr.box == (0, 0, 0, 0) for tr in frame.hidden)
    assert checked > 40


def test_boxes_fractions_and_ids_follow_the_masks():
    video = _video("val", 2)
    identity: dict[int, tuple[str, str, str]] = {}
    for t in range(0, video.length, 5):
        frame = video.frame(t)
        ids = [tr.track_id for tr in frame.objects + frame.hidden]
        assert len(ids) == len(set(ids)) and [tr.track_id for tr in frame.objects] == sorted(
            tr.track_id for tr in frame.objects
        )
        assert len(ids) <= OBJECTS[1]
        for tr in frame.objects + frame.hidden:
            plan = video.plans[tr.track_id - 1]
            assert plan.track_id == tr.track_id and plan.first <= t < plan.end
            assert identity.setdefault(tr.track_id, (tr.shape, tr.colour, tr.size)) == (tr.shape, tr.colour, tr.size)
            assert (plan.shape, plan.colour, plan.size) == (tr.shape, tr.colour, tr.size)
            assert 0 <= tr.visible <= 1 and 0 <= tr.in_frame <= 1
            full, all_pixels = _full_mask(video, plan, t)
            # the same rasterisation up to float rounding at the odd edge pixel
            assert (tr.mask & ~full).sum() <= 3
            assert abs(full.sum() / all_pixels - tr.in_frame) < 2e-3
            if tr.visible > 0:
                ys, xs = np.nonzero(tr.mask)
                assert tr.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # x1, y1 exclusive, as world
                assert abs(tr.mask.sum() / full.sum() - tr.visible) < 2e-3
    assert [p.track_id for p in video.plans] == list(range(1, len(video.plans) + 1))
    assert sorted(p.depth for p in video.plans) == list(range(len(video.plans)))


def test_the_frontmost_object_is_never_occluded():
    video = _video("val", 0)
    for t in range(0, video.length, 10):
        frame = video.frame(t)
        alive = frame.objects + frame.hidden
        front = max(alive, key=lambda tr: video.plans[tr.track_id - 1].depth)
        assert front.in_frame == 0 or front.visible == 1


def test_sizes_match_the_area_bands():
    for index in range(BATCH):
        video = _video("val", index)
        letterbox = max(video.width, video.height) ** 2
        for plan in video.plans:
            lo, hi = SMALL_AREA if plan.size == "small" else LARGE_AREA
            assert lo <= plan.area_fraction <= hi
            full, all_pixels = _full_mask(video, plan, plan.first)
            assert abs(all_pixels / letterbox - plan.area_fraction) < 0.06 * plan.area_fraction
    assert {p.size for i in range(BATCH) for p in _video("val", i).plans} == {"small", "large"}


def _hidden_runs(visible: np.ndarray, in_frame: np.ndarray) -> list[int]:
    """Lengths of the runs of frames a track is in frame but fully hidden, with visible frames before and after."""
    runs, run, seen = [], 0, False
    for v, f in zip(visible, in_frame, strict=True):
        if v > 0:
            if seen and run:
                runs.append(run)
            seen, run = True, 0
        elif f > 0 and seen:
            run += 1
        else:
            run = 0
    return runs


def test_a_batch_of_videos_has_entries_exits_occlusions_and_distractors():
    entries = exits = occlusions = distractor_videos = 0
    for index in range(BATCH):
        video = _video("val", index)
        visible, in_frame = _coverage(index)
        tracks = video.tracks()
        assert [tr.track_id for tr in tracks] == [p.track_id for p in video.plans]
        for tr in tracks:
            j = tr.track_id - 1
            assert (visible[: tr.first, j] == 0).all() and (visible[tr.last + 1 :, j] == 0).all()
            if tr.first_visible is None:
                continue
            assert visible[tr.first_visible, j] > 0 and visible[tr.last_visible, j] > 0
            entries += tr.first_visible > 0
            # an exit: last seen before the end and leaving through an edge (its in-frame part shrinking)
            if tr.last < video.length - 1:
                exits += 1
                assert in_frame[tr.last, j] < 1
            occlusions += len(_hidden_runs(visible[:, j], in_frame[:, j]))
        at_once = (visible > 0).sum(axis=1)
        assert at_once.max() <= OBJECTS[1] and at_once.mean() >= OBJECTS[0]
        pairs = [
            t for t in range(video.length)
            for a, b in itertools.combinations(np.flatnonzero(visible[t] > 0), 2)
            if video.plans[a].shape == video.plans[b].shape and video.plans[a].colour != video.plans[b].colour
        ]  # fmt: skip
        distractor_videos += bool(pairs)
        assert sum(tr.first_visible == 0 for tr in tracks) >= OBJECTS[0] - 1  # some present at frame 0
    assert entries >= BATCH and exits >= BATCH
    assert occlusions >= BATCH // 2  # objects fully hidden, then seen again under the same id
    assert distractor_videos >= BATCH // 2


def test_mot_lines_list_the_visible_objects_in_mot17_layout():
    video = make_video(split_seed("test", 1), frames=30)
    lines = mot_lines(video)
    rows = np.array([[float(v) for v in line.split(",")] for line in lines])
    assert rows.shape[1] == 9
    assert rows[:, 0].min() == 1 and rows[:, 0].max() <= 30  # 1-based frames
    assert (rows[:, 6] == 1).all() and (rows[:, 7] == 1).all() and ((rows[:, 8] > 0) & (rows[:, 8] <= 1)).all()
    expected = []
    for frame in video:
        for tr in frame.objects:
            x0, y0, x1, y1 = tr.box
            expected.append([frame.index + 1, tr.track_id, x0 + 1, y0 + 1, x1 - x0, y1 - y0, 1, 1])
    assert np.allclose(rows[:, :8], np.array(expected))
    ini = seqinfo_ini(video, "shapes-0001")
    assert "seqLength=30" in ini and f"frameRate={video.fps}" in ini and "imWidth=640" in ini


def test_the_video_is_configurable():
    video = make_video(split_seed("train", 0), frames=15, width=320, height=240, objects=(1, 3), fps=25)
    assert (video.length, video.width, video.height, video.fps) == (15, 320, 240, 25)
    for frame in video:
        assert frame.image.shape == (240, 320, 3) and len(frame.objects) + len(frame.hidden) <= 3
    with pytest.raises(ValueError):
        make_video(0, objects=(3, 2))


def test_held_out_combinations_stay_out_of_train_and_val():
    def combos(split: str, n: int) -> set[tuple[str, str]]:
        return {(p.colour, p.shape) for i in range(n) for p in make_video(split_seed(split, i), frames=40).plans}

    assert not combos("train", 15) & set(HELD_OUT) and not combos("val", 5) & set(HELD_OUT)
    assert combos("test", 15) & set(HELD_OUT)
