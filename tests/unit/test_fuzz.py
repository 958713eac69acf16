"""Fuzzing (hypothesis) of the two places hostile bytes reach first: image decoding and request validation.
Every input either passes or fails with the domain's InvalidInput/InvalidImage; nothing crashes, nothing takes
more than 2 s, memory stays bounded. Plus a decompression bomb, rejected from its header."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidImage, InvalidInput
from service.pipeline.image import ImageLimits, decode_image
from service.pipeline.prompts import (
    Exemplar,
    ImageInput,
    Limits,
    Options,
    Region,
    SegmentQuery,
    check_inside,
    check_query,
    plan,
)
from service.pipeline.review import ReviewOptions, ReviewRules

LIMITS = ImageLimits(max_bytes=20 << 20, max_pixels=40_000_000, max_side=16384)
REQUEST_LIMITS = Limits(
    max_class_prompts=256, max_region_prompts=256, max_points_per_region=64, max_instances=300,
    default_score_threshold=0.25, default_iou_threshold=0.7, default_max_instances=100, max_image_pixels=40_000_000,
    mask_min_region_area=100, mask_clip_to_box=True, mask_box_margin=0.1, max_text_prompts=64, max_text_chars=256,
    max_exemplars=16, review=ReviewRules(0.5, 0.8, 0.9, 64, 3, 0.6),
)  # fmt: skip
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded("PNG"), _encoded("JPEG"), _encoded("WEBP")]


def _decode_or_invalid(data: bytes) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        image = decode_image(data, LIMITS)
        assert image.rgb.dtype == np.uint8 and image.rgb.ndim == 3 and image.rgb.shape[2] == 3
    except InvalidImage:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 256 << 20, peak  # bounded: nothing near the declared-size allocations a bomb would cause


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_fail_cleanly(data):
    _decode_or_invalid(data)


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_real_images_decode_or_fail_cleanly(seed, flips, cut):
    data = bytearray(SEEDS[seed])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_invalid(bytes(data))


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
names = st.text(max_size=40)
region = st.builds(
    Region,
    box=st.one_of(st.none(), st.tuples(finite, finite, finite, finite)),
    points=st.lists(st.tuples(finite, finite, st.integers(-2, 3)), max_size=4).map(tuple),
    label=names,
)
options = st.builds(
    Options,
    score_threshold=st.one_of(st.none(), finite),
    iou_threshold=st.one_of(st.none(), finite),
    max_instances=st.one_of(st.none(), st.integers(-5, 1000)),
    review=st.builds(ReviewOptions, score_below=st.one_of(st.none(), finite),
                     min_mask_area=st.one_of(st.none(), st.integers(-10, 10**9)), drop_flagged=st.booleans()),
)  # fmt: skip
queries = st.builds(
    SegmentQuery,
    image=st.just(ImageInput(encoded=b"\x89PNG")),
    classes=st.lists(names, max_size=6).map(tuple),
    regions=st.lists(region, max_size=4).map(tuple),
    options=options,
    request_id=st.text(max_size=140),
    texts=st.lists(names, max_size=4).map(tuple),
    exemplars=st.lists(st.builds(Exemplar, box=st.tuples(finite, finite, finite, finite), label=names),
                       max_size=3).map(tuple),
)  # fmt: skip


@FUZZ
@given(query=queries, open_vocabulary=st.booleans())
def test_request_validation_accepts_or_names_the_field(query, open_vocabulary):
    """As the pipeline validates: check_query, then the plan against a closed vocabulary or, for an
    open-vocabulary detector, the request's own (its classes and texts)."""
    from service.pipeline.vocabulary import request_vocabulary

    start = time.perf_counter()
    try:
        check_query(query, REQUEST_LIMITS)
        vocabulary = request_vocabulary(query.classes, query.texts) if open_vocabulary else ("person", "car", "dog")
        check_inside(query, 640, 480)
        plan(query, REQUEST_LIMITS, vocabulary, open_vocabulary=open_vocabulary)
    except InvalidInput as e:
        assert str(e) and ":" in str(e)  # "<field>: what is wrong"
    assert time.perf_counter() - start < 2.0


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_protobuf_bytes_never_crash_the_conversion(data):
    from google.protobuf.message import DecodeError

    from service.api import convert
    from service.proto.detseg.v1 import detseg_pb2 as pb

    try:
        request = pb.SegmentRequest.FromString(data)
    except DecodeError:
        return
    try:
        query = convert.query_from_proto(request)
        check_query(query, REQUEST_LIMITS)
    except InvalidInput:
        pass


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_a_decompression_bomb_png_is_rejected_from_its_header_in_under_100_ms(figures):
    """10,000 x 10,000 pixels of zeros (300 MB decoded, over the 40 MP limit, under the side limit) in a small file."""
    side = 10_000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 3)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(bomb, LIMITS)
    seconds = time.perf_counter() - start
    figures[f"decompression bomb PNG ({len(bomb) / 1e6:.1f} MB, {side}x{side}): rejected in"] = (
        f"{seconds * 1e3:.1f} ms"
    )
    assert seconds < 0.1
