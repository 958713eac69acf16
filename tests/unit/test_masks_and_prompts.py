"""Mask encodings and prompt validation, without models."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.errors import InvalidInput
from service.pipeline.masks import PNG, POLYGON, RLE, encode_masks
from service.pipeline.prompts import resolve_classes


def test_rle_is_exactly_what_pycocotools_produces():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 37, 53)) > 0.6
    encoded = encode_masks(masks, RLE)
    for m, e in zip(masks, encoded, strict=True):
        expected = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert e.rle_counts == expected["counts"] and (e.height, e.width) == (37, 53)
        assert np.array_equal(mask_utils.decode({"size": [37, 53], "counts": e.rle_counts}).astype(bool), m)


def test_polygon_and_png_of_a_square():
    m = np.zeros((1, 20, 30), bool)
    m[0, 5:15, 10:20] = True
    (poly,) = encode_masks(m, POLYGON)
    xs, ys = poly.polygons[0][0::2], poly.polygons[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 19, 5, 14)
    (png,) = encode_masks(m, PNG)
    assert png.png.startswith(b"\x89PNG")


def test_empty_batch_encodes_to_nothing():
    assert encode_masks(np.zeros((0, 4, 4), bool), RLE) == []


def test_class_names_match_loosely_and_unknown_lists_the_vocabulary():
    vocab = ["person", "traffic light", "cell phone"]
    assert resolve_classes(["Traffic_Light", " PERSON ", "person", "cell-phone"], vocab) == [1, 0, 2]
    with pytest.raises(InvalidInput, match=r"classes\[0\]: unknown class 'zebra'; the detector knows: person"):
        resolve_classes(["zebra"], vocab)
