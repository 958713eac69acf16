"""Mask encodings and prompt validation, without models."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.errors import InvalidInput
from service.pipeline.prompts import resolve_classes
from service.processing.masks import PNG, POLYGON, RLE, encode_masks


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
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 20, 5, 15)  # pixel edges: the square spans [10, 20)
    (png,) = encode_masks(m, PNG)
    assert png.png.startswith(b"\x89PNG")


def test_empty_batch_encodes_to_nothing():
    assert encode_masks(np.zeros((0, 4, 4), bool), RLE) == []


def test_class_names_match_loosely_and_unknown_lists_the_vocabulary():
    vocab = ["person", "traffic light", "cell phone"]
    assert resolve_classes(["Traffic_Light", " PERSON ", "person", "cell-phone"], vocab) == [1, 0, 2]
    with pytest.raises(InvalidInput, match=r"classes\[0\]: unknown class 'zebra'; the detector knows: person"):
        resolve_classes(["zebra"], vocab)


def test_mask_upsampling_equals_sam2s_and_feeds_rle_in_its_own_layout():
    """OpenCV's bilinear upsampling (the service's) against sam2's ``postprocess_masks`` (the reference)."""
    import cv2
    import torch
    from sam2.utils.transforms import SAM2Transforms

    from service.models.tensors import SegmenterSpec
    from service.processing.segmentation import SegmenterProcessing

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 64, 64)).astype(np.float32)
    logits = np.stack([cv2.GaussianBlur(m, (0, 0), 3) * 10 for m in logits])  # smooth, like decoder logits
    hw = (301, 177)
    ours = SegmenterProcessing(SegmenterSpec(image_size=256)).postprocess(logits, hw).masks
    reference = SAM2Transforms(256, 0.0).postprocess_masks(torch.from_numpy(logits[:, None]), hw)[:, 0] > 0
    assert ours.shape == (5, *hw) and ours.dtype == bool
    assert np.mean(ours != reference.numpy()) < 1e-4  # only pixels whose logit is ~0 may differ
    for m, e in zip(ours, encode_masks(ours, RLE), strict=True):
        assert np.array_equal(mask_utils.decode({"size": list(hw), "counts": e.rle_counts}).astype(bool), m)
