"""Which detections start tracks (``service.pipeline.tracking._new_objects``): one object, one track, whatever
class each detection says; and which tracks end as duplicates of a matched one (``_duplicates``)."""

from __future__ import annotations

import numpy as np

from service.pipeline.tracking import _duplicates, _new_objects

T = 0.5


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


def test_an_unmatched_track_on_a_matched_tracks_object_is_a_duplicate() -> None:
    # tracks 0 and 1 on one object (IoU 0.8), 0 matched; track 2 elsewhere and unmatched; track 3 the caller's
    among = np.array([[1.0, 0.8, 0.0, 0.9], [0.8, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.9, 0.0, 0.0, 1.0]])
    assert _duplicates(among, matched={0}, candidates=[0, 1, 2], threshold=T) == [1]
    assert _duplicates(among, matched=set(), candidates=[0, 1, 2], threshold=T) == []  # nothing matched: no judge
    assert _duplicates(among, matched={1}, candidates=[0, 1, 2], threshold=0.85) == []  # below the threshold
