"""Which detections start tracks (``service.pipeline.tracking._new_objects``): one object, one track, whatever
class each detection says; which detections are one object (``_one_per_object``); which tracks have drifted onto a
matched one's object (``_duplicates``); how well a detection fits a track (``_match_scores``: its memory's mask, or
where its last sighting's motion expects it; ``_box_scores`` for a mask that is a sliver of its box); which lost
tracks new detections re-find (``_refind``); which tracks are still tentative (``_tentative``)."""

from __future__ import annotations

import numpy as np
import pytest

from service.pipeline.image import DecodedImage
from service.pipeline.results import REGION
from service.pipeline.tracking import (
    FULL_VIEW,
    MOTION_SIGHTINGS,
    SAME_COLOUR,
    _box_scores,
    _colours,
    _duplicates,
    _fill,
    _low_res_boxes,
    _mask_iou,
    _match_scores,
    _new_objects,
    _one_per_object,
    _refind,
    _tentative,
    _Track,
    _unlike,
)

T = 0.5
RED, BLUE = np.array([200.0, 30.0, 30.0], np.float32), np.array([30.0, 30.0, 200.0], np.float32)


def test_unmatched_detections_apart_from_everything_start_tracks() -> None:
    to_tracks = np.array([[0.9, 0.0], [0.1, 0.2], [0.0, 0.0]])
    among = np.eye(3)
    assert _new_objects(to_tracks, among, matched={0}, threshold=T) == [1, 2]


def test_a_detection_on_a_tracked_object_starts_nothing_even_when_another_detection_took_the_match() -> None:
    # detections 0 ("square") and 1 ("hexagon") on the same object: 0 matched track 0, 1 overlaps that track too
    to_tracks = np.array([[0.8], [0.6]])
    among = np.array([[1.0, 0.7], [0.7, 1.0]])
    assert _new_objects(to_tracks, among, matched={0}, threshold=T) == []


def test_overlapping_new_detections_start_one_track_the_higher_scored() -> None:
    to_tracks = np.zeros((3, 0))  # no tracks yet
    among = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.1], [0.0, 0.1, 1.0]])
    assert _new_objects(to_tracks, among, matched=set(), threshold=T) == [0, 2]


def test_a_detection_below_the_threshold_everywhere_is_a_new_object() -> None:
    to_tracks = np.array([[0.49]])
    among = np.array([[1.0]])
    assert _new_objects(to_tracks, among, matched=set(), threshold=T) == [0]
    assert _new_objects(to_tracks, among, matched=set(), threshold=0.4) == []


def test_an_unmatched_track_on_a_matched_tracks_object_has_drifted() -> None:
    # tracks 0 and 1 on one object (IoU 0.8), 0 matched; track 2 elsewhere and unmatched; track 3 the caller's
    among = np.array([[1.0, 0.8, 0.0, 0.9], [0.8, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.9, 0.0, 0.0, 1.0]])
    assert _duplicates(among, matched={0}, candidates=[0, 1, 2], threshold=T) == [1]
    assert _duplicates(among, matched=set(), candidates=[0, 1, 2], threshold=T) == []  # nothing matched: no judge
    assert _duplicates(among, matched={1}, candidates=[0, 1, 2], threshold=0.85) == []  # below the threshold


def _square(top: int, left: int, side: int = 4, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _track(track_id: int = 1, source: str = "class") -> _Track:
    return _Track(track_id, "star", 0, source, None, 0.9, 0, memory=None)


def test_a_sighting_expects_the_object_where_its_velocity_takes_it() -> None:
    t = _track()
    t.sighted(_square(4, 4), 0, RED)
    assert t.sighting is not None and t.sighting.velocity is None
    assert (t.sighting.expected(7) == _square(4, 4)).all()  # seen once: no speed yet, expected where it was
    t.sighted(_square(6, 8), 2, RED)  # 1 row, 2 columns per frame
    assert t.sighting.velocity == pytest.approx([1.0, 2.0])
    assert (t.sighting.expected(5) == _square(9, 14)).all()
    t.sighted(_square(6, 8), 4, RED)  # stood still for two frames: the least-squares speed over 0, 2, 4 halves
    assert t.sighting.velocity == pytest.approx([0.5, 1.0])
    assert (t.sighting.expected(8) == _square(8, 12)).all()


def test_the_velocity_is_fitted_to_the_sightings_that_showed_the_whole_object() -> None:
    t = _track()
    for i in range(20):  # 1 column per frame; on frame 18 half of it hidden, so its centroid 1.5 columns behind
        mask = _square(4, i, side=4)
        if i == 18:
            mask[:, i + 2 :] = False
        t.sighted(mask, i, RED)
    assert t.sighting is not None and len(t.sighting.path) == MOTION_SIGHTINGS
    assert t.sighting.velocity == pytest.approx([0.0, 1.0])  # the half-hidden sighting left out of the fit


def test_an_empty_mask_is_no_sighting_and_an_expected_mask_loses_what_leaves_the_frame() -> None:
    t = _track()
    t.sighted(np.zeros((32, 32), bool), 0, RED)
    assert t.sighting is None
    t.sighted(_square(10, 24), 0, RED)
    t.sighted(_square(10, 26), 1, RED)  # 2 columns per frame, towards the right edge
    assert t.sighting is not None
    assert t.sighting.expected(3).sum() == 4 * 2  # columns 30, 31 of 30..33 stay in the frame
    assert not t.sighting.expected(20).any()  # gone


def test_a_detection_continues_a_track_whose_memory_lost_it_where_its_motion_expects_it() -> None:
    moving, other = _track(1), _track(2)
    moving.sighted(_square(4, 4), 0, RED)
    moving.sighted(_square(4, 6), 1, RED)
    detection = _square(4, 12)[None]  # frame 4: where 2 columns per frame take it
    lost = np.zeros((2, 32, 32), bool)  # their memories show nothing on the frame
    to_tracks, gain = _match_scores(detection, lost, [moving, other], index=4)
    assert to_tracks[0].tolist() == [1.0, 0.0] and gain[0].tolist() == [1.0, 0.0]


def test_where_two_tracks_could_continue_a_detection_the_one_its_motion_expects_there_wins_it() -> None:
    # two tracks' memories both show the detection's object; only the first one's last sighting expects it there
    kept, stray = _track(1), _track(2)
    kept.sighted(_square(8, 8), 3, RED)
    stray.sighted(_square(20, 20), 3, RED)
    detection = _square(8, 8)
    to_tracks, gain = _match_scores(detection[None], np.stack([detection, detection]), [kept, stray], index=4)
    assert to_tracks[0].tolist() == [1.0, 1.0]  # either could continue it
    assert gain[0].tolist() == [1.0, 0.0]  # the assignment gives it to the one whose motion agrees
    assert _match_scores(detection[None], np.zeros((0, 32, 32), bool), [], index=4)[0].shape == (1, 0)


def test_a_track_never_sighted_is_matched_by_its_memory() -> None:
    region = _track(3)  # the caller's own region: no detection has shown it
    detection = _square(8, 8)
    to_tracks, gain = _match_scores(detection[None], detection[None], [region], index=4)
    assert to_tracks[0].tolist() == [1.0] and gain[0].tolist() == [1.0]


def test_a_track_the_detector_started_is_answered_once_confirmed_and_ends_unseen_if_missed_before() -> None:
    young, missed, confirmed, region = _track(1), _track(2), _track(3), _track(4, source=REGION)
    missed.confirmed = False  # the latest detection frame did not show it
    confirmed.hits = 2
    old = _track(5)
    old.answered, old.confirmed = True, False  # answered before: LOST now, never tentative again
    hidden, dropped = _tentative([young, missed, confirmed, region, old], confirm_after=2)
    assert hidden == {0, 1} and dropped == {1}
    assert _tentative([young, missed], confirm_after=1) == (set(), set())  # 1: every track is answered at once


def test_detections_of_one_object_named_twice_keep_the_higher_scored_one() -> None:
    star = _square(4, 4, side=6)
    triangle = star.copy()
    triangle[4, 4] = False  # the same pixels but one: IoU 35/36
    apart = _square(20, 20)
    among = _mask_iou(*[np.stack([star, triangle, apart])] * 2)
    assert _one_per_object(among, 0.7) == [0, 2]
    assert _one_per_object(among, 0.99) == [0, 1, 2]  # below the threshold: two objects


def test_a_sliver_of_its_box_is_matched_by_the_box_of_the_tracks_mask_and_where_it_is_expected() -> None:
    sliver = _square(8, 8, side=2)  # SAM's mask of a large box prompt: 4 of its 64 pixels
    box = np.array([[8.0, 8.0, 16.0, 16.0]])
    assert _fill(sliver[None], box).tolist() == [4 / 64]
    t = _track()
    t.sighted(_square(20, 20, side=8), 3, RED)  # last sighted elsewhere, so its motion expects it there
    on_it = _square(8, 8, side=8)[None]  # its memory's mask fills the detection's box
    by_box, box_gain = _box_scores(box, on_it, [t], index=4)
    assert by_box.tolist() == [[1.0]] and box_gain.tolist() == [[0.0]]
    assert _match_scores(sliver[None], on_it, [t], index=4)[0].tolist() == [[4 / 64]]  # by the mask alone: no match


def test_a_new_detection_refinds_the_lost_track_of_its_label_near_where_its_motion_expects_it() -> None:
    gone, other_label, far = _track(1), _track(2), _track(3)
    gone.sighted(_square(4, 4), 0, RED)
    gone.sighted(_square(4, 6), 1, RED)  # 2 columns per frame: on frame 5 expected at column 14
    other_label.label = "circle"
    other_label.sighted(_square(4, 14), 1, RED)
    far.sighted(_square(24, 24), 1, RED)
    detections = np.stack([_square(5, 14), _square(24, 4), _square(4, 15, side=1)])
    labels, colours = ["star", "star", "star"], np.stack([RED] * 3)
    # detection 0 re-finds track 1 (1 row off: 0.25 sizes; track 2 is as near but another label); 1 is 5 sizes from
    # any; 2 is a 16th of the area
    assert _refind([0, 1, 2], detections, colours, labels, [gone, other_label, far], index=5) == {0: 0}
    assert _refind([0], detections, colours, ["circle", "star", "star"], [gone, other_label, far], index=5) == {0: 1}
    assert _refind([1], detections, colours, labels, [gone, far], index=5) == {}
    assert _refind([0], detections, colours, labels, [_track(4)], index=5) == {}  # never sighted: nothing to go by


def test_a_lost_track_is_refound_under_another_label_but_never_in_another_colour() -> None:
    gone = _track(1)
    gone.sighted(_square(4, 4), 0, RED)
    gone.sighted(_square(4, 6), 1, RED)  # expected at column 14 on frame 5
    detection = _square(5, 14)[None]
    assert _refind([0], detection, RED[None], ["hexagon"], [gone], index=5) == {0: 0}  # the track keeps "star"
    assert _refind([0], detection, BLUE[None], ["star"], [gone], index=5) == {}
    near = RED + np.float32(SAME_COLOUR / 2)  # within the gate: re-found, at a cost that grows with the distance
    assert _refind([0], detection, near[None], ["star"], [gone], index=5) == {0: 0}


def test_a_track_takes_its_colour_from_a_sighting_that_shows_most_of_it() -> None:
    t = _track()
    t.sighted(_square(4, 4, side=10), 0, RED)
    hidden = _square(4, 4, side=10)
    hidden[:, 6:] = False  # 60 of 100 pixels: partly hidden, so its colour may be the occluder's
    t.sighted(hidden, 1, BLUE)
    assert t.sighting is not None and t.sighting.colour.tolist() == RED.tolist() and t.sighting.area == 100
    assert 60 < FULL_VIEW * 100 <= 80
    shown = _square(4, 4, side=10)
    shown[:2] = False  # 80 of the largest 100: seen well again
    t.sighted(shown, 2, BLUE)
    assert t.sighting.colour.tolist() == BLUE.tolist()


def test_colours_are_the_median_rgb_under_each_low_res_mask_and_gate_the_tracks_by_distance() -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)  # a 64 x 48 frame; SAM's low-res frame is an 8 x 8 square of it
    rgb[:24, :32] = (200, 30, 30)  # the top left quarter red, one pixel of it white
    rgb[0, 0] = (255, 255, 255)
    rgb[24:, 32:] = (30, 30, 200)
    top_left, bottom_right, empty = _square(0, 0, 4, 8), _square(4, 4, 4, 8), np.zeros((8, 8), bool)
    colours = _colours(rgb, np.stack([top_left, bottom_right, empty]))
    assert colours.tolist() == [RED.tolist(), BLUE.tolist(), [0.0, 0.0, 0.0]]
    red, region = _track(1), _track(2, source=REGION)
    red.sighted(top_left, 0, RED)
    assert _unlike(colours, [red, region]).tolist() == [[False, False], [True, False], [True, False]]


def test_mask_ious_of_no_masks_are_empty() -> None:
    none, two = np.zeros((0, 32, 32), bool), np.stack([_square(4, 4), _square(20, 20)])
    assert _mask_iou(none, none).shape == (0, 0) and _mask_iou(two, none).shape == (2, 0)


def test_a_box_reaches_sams_low_res_frame_by_each_axis_of_the_image() -> None:
    # sam2 resizes a 640 x 480 frame to a square: a box around the whole image is the whole low-res frame
    image = DecodedImage(np.zeros((480, 640, 3), np.uint8), "raw", "0" * 64)
    boxes = _low_res_boxes(np.array([[0.0, 0.0, 640.0, 480.0], [320.0, 240.0, 400.0, 300.0]]), image, 64)
    assert boxes.tolist() == [[0.0, 0.0, 64.0, 64.0], [32.0, 32.0, 40.0, 40.0]]
