"""Bad input → INVALID_ARGUMENT naming the problem, before any model runs; the server keeps serving."""

from __future__ import annotations

import io
import math
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.gen.detseg.v1 import detseg_pb2 as pb
from tests.conftest import ultralytics_asset
from tests.helpers import encode, synthetic_rgb

GOOD = encode(synthetic_rgb(120, 160, seed=7))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height (no real pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _request(image: pb.Image | None = None, **fields: object) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=image or pb.Image(encoded=GOOD), **fields)


def _box(x0: float, y0: float, x1: float, y1: float) -> pb.RegionPrompt:
    return pb.RegionPrompt(box=pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1))


_JPEG = ultralytics_asset("bus.jpg").read_bytes()

CASES = {
    "no image": (pb.SegmentRequest(), ["image", "missing"]),
    "empty bytes": (_request(pb.Image(encoded=b"")), ["image.encoded", "empty"]),
    "random bytes": (
        _request(pb.Image(encoded=np.random.default_rng(0).bytes(4096))),
        ["image.encoded", "not a recognised image"],
    ),
    "truncated jpeg": (_request(pb.Image(encoded=_JPEG[: len(_JPEG) // 3])), ["image.encoded", "truncated", "JPEG"]),
    "gif": (_request(pb.Image(encoded=_other_format("GIF"))), ["GIF", "not supported", "JPEG, PNG, WebP"]),
    "tiff": (_request(pb.Image(encoded=_other_format("TIFF"))), ["TIFF", "not supported"]),
    "png declaring 100000x100000": (
        _request(pb.Image(encoded=_png_declaring(100000, 100000))),
        ["image.encoded", "100000x100000"],
    ),
    "raw rgb wrong length": (
        _request(pb.Image(raw=pb.RawImage(data=b"\x00" * 100, width=10, height=10))),
        ["image.raw.data", "100 bytes", "300"],
    ),
    "raw rgb zero size": (_request(pb.Image(raw=pb.RawImage(data=b"", width=0, height=5))), ["image.raw", "no pixels"]),
    "unknown class": (_request(classes=["person", "unicorn"]), ["classes[1]", "unicorn", "person, bus, car"]),
    "box with NaN": (_request(regions=[_box(math.nan, 0, 10, 10)]), ["regions[0].box", "finite"]),
    "box reversed": (_request(regions=[_box(50, 10, 20, 40)]), ["regions[0].box", "reversed"]),
    "box outside image": (_request(regions=[_box(10, 10, 500, 100)]), ["regions[0].box", "outside", "160x120"]),
    "region without prompt": (_request(regions=[pb.RegionPrompt(label="x")]), ["regions[0]", "box, points"]),
    "point label 2": (
        _request(regions=[pb.RegionPrompt(points=[pb.Point(x=5, y=5, label=2)])]),
        ["regions[0].points[0].label", "1 (positive) or 0 (negative)"],
    ),
    "point outside": (
        _request(regions=[pb.RegionPrompt(points=[pb.Point(x=500, y=5, label=1)])]),
        ["regions[0].points[0]", "outside"],
    ),
    "too many classes": (_request(classes=["person"] * 257), ["classes", "257", "limit is 256"]),
    "too many regions": (_request(regions=[_box(1, 1, 5, 5)] * 257), ["regions", "257", "limit is 256"]),
    "too many points": (
        _request(regions=[pb.RegionPrompt(points=[pb.Point(x=1, y=1, label=1)] * 65)]),
        ["regions[0].points", "65", "limit is 64"],
    ),
    "score threshold > 1": (
        _request(options=pb.SegmentOptions(score_threshold=1.5)),
        ["options.score_threshold", "[0, 1]"],
    ),
    "max instances 0": (_request(options=pb.SegmentOptions(max_instances=0)), ["options.max_instances", "[1, 300]"]),
    "unknown mask encoding": (_request(options=pb.SegmentOptions(mask_encoding=99)), ["options.mask_encoding"]),
    "bad request id": (_request(request_id="a b/c"), ["request_id"]),
    "empty text": (_request(texts=["car", "  "]), ["texts[1]", "empty"]),
    "empty class": (_request(classes=["car", ""]), ["classes[1]", "empty"]),
    "exemplar box reversed": (
        _request(exemplars=[pb.Exemplar(box=pb.BoundingBox(x_min=50, y_min=10, x_max=20, y_max=40))]),
        ["exemplars[0].box", "reversed"],
    ),
    "too many exemplars": (
        _request(exemplars=[pb.Exemplar(box=pb.BoundingBox(x_min=1, y_min=1, x_max=5, y_max=5))] * 33),
        ["exemplars", "33 given", "limit is 32"],
    ),
    "10,000 texts": (_request(texts=["car"] * 10_000), ["texts", "10000 given", "limit is 64"]),
    "a 100 KB text": (_request(texts=["x" * 100_000]), ["texts[0]", "100000 characters", "limit is 256"]),
    "refinement margin negative": (
        _request(options=pb.SegmentOptions(refinement=pb.MaskRefinement(box_margin=-1))),
        ["options.refinement.box_margin", "[0, 10]"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_before_any_model_runs(stub, runner, case):
    request, words = CASES[case]
    calls_before = dict(runner.calls)
    with pytest.raises(grpc.RpcError) as err:
        stub.Segment(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = err.value.details()
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in message and "/" not in message.replace("/s", "")
    assert dict(runner.calls) == calls_before, "no model may run for bad input"
    # ...and the server still answers the next good request.
    assert stub.Segment(_request(options=pb.SegmentOptions(max_instances=1)), timeout=120).image.width == 160
