"""The client's request builders (service.client_requests): what a caller's Python values become on the wire, and
the values they refuse with an error that says what was expected."""

from __future__ import annotations

import numpy as np
import pytest

from service.client_requests import Exemplar, Point, Region, segment_request, start_message, track_requests
from service.proto.detseg.v1 import detseg_pb2 as pb

IMAGE = b"\xff\xd8 not decoded here"


@pytest.mark.parametrize("keyword", ["classes", "texts"])
def test_one_string_is_one_name_not_its_characters(keyword):
    one = segment_request(IMAGE, **{keyword: "red circle"})
    assert list(getattr(one, keyword)) == ["red circle"]
    assert list(getattr(start_message(**{keyword: "red circle"}).start, keyword)) == ["red circle"]
    many = segment_request(IMAGE, **{keyword: ("circle", "star")})
    assert list(getattr(many, keyword)) == ["circle", "star"]


def test_a_name_that_is_not_a_string_is_refused_by_its_index():
    with pytest.raises(TypeError, match=r"classes\[1\]: a string, got int 7"):
        segment_request(IMAGE, classes=["circle", 7])


def test_boxes_take_any_four_numbers():
    request = segment_request(
        IMAGE, regions=[(1, 2, 3, 4), np.array([5, 6, 7, 8], np.float32), Region(box=[9, 10, 11, 12])]
    )
    boxes = [(r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max) for r in request.regions]
    assert boxes == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
    from_array = segment_request(IMAGE, regions=np.array([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert [r.box.x_max for r in from_array.regions] == [3, 7]


@pytest.mark.parametrize("box", [(1, 2, 3), (1, 2, 3, 4, 5), "1,2,3,4", ()])
def test_a_box_of_other_than_four_numbers_is_refused_saying_what_a_box_is(box):
    with pytest.raises(ValueError, match=r"a box is 4 numbers \(x_min, y_min, x_max, y_max\)"):
        segment_request(IMAGE, regions=[Region(box=box)])


@pytest.mark.parametrize("keyword", ["regions", "exemplars"])
def test_one_bare_box_where_a_list_is_expected_says_to_wrap_it(keyword):
    with pytest.raises(TypeError, match=rf"{keyword}: each item is .* got int 10 .*{keyword}=\[\(x_min"):
        segment_request(IMAGE, **{keyword: (10, 10, 60, 60)})


def test_a_bare_box_in_exemplars_is_an_exemplar_on_the_requests_image():
    request = segment_request(IMAGE, exemplars=[(1, 2, 3, 4), Exemplar(box=(5, 6, 7, 8), label="sku")])
    assert [(e.box.x_min, e.label, e.HasField("image")) for e in request.exemplars] == [
        (1, "", False),
        (5, "sku", False),
    ]


def test_track_frames_take_one_string_and_bare_boxes_too():
    start, frame = list(track_requests([IMAGE], classes="circle", regions=[(1, 2, 3, 4)]))
    assert list(start.start.classes) == ["circle"]
    assert isinstance(frame, pb.TrackRequest) and frame.frame.prompts[0].region.box.x_max == 3


@pytest.mark.parametrize("points", [((1, 2),), Point(1, 2)])
def test_points_other_than_a_sequence_of_point_are_refused_saying_what_points_are(points):
    """(AttributeError: 'tuple' object has no attribute 'x'; TypeError: 'Point' object is not iterable.)"""
    with pytest.raises(TypeError, match=r"regions: points are a sequence of Point\(x, y\[, positive\]\)"):
        segment_request(IMAGE, regions=[Region(box=(1, 2, 30, 40), points=points)])


@pytest.mark.parametrize("frames", ["clip.mp4", b"\xff\xd8", np.zeros((4, 4, 3), np.uint8)])
def test_one_frame_where_frames_are_expected_is_refused_saying_what_frames_are(frames):
    """A path string was taken for frames named by its characters ("c": FileNotFoundError), an array for its rows."""
    with pytest.raises(TypeError, match=r"frames: an iterable of frames .*`detseg track` decodes it"):
        list(track_requests(frames, classes="circle"))
