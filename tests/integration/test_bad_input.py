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

from service.proto.detseg.v1 import detseg_pb2 as pb
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
    "an exemplar's image with no source": (
        _request(exemplars=[pb.Exemplar(box=pb.BoundingBox(x_max=4, y_max=4), image=pb.Image())]),
        ["exemplars[0].image: missing; set exemplars[0].image.encoded"],
    ),
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
    # partly inside (it was "lies outside the image", untrue), and wholly outside
    "box beyond image": (
        _request(regions=[_box(10, 10, 500, 100)]),
        ["regions[0].box", "is not within the 160x120 image: a box lies in x [0, 160], y [0, 120]"],
    ),
    "box outside image": (_request(regions=[_box(200, 10, 300, 100)]), ["regions[0].box", "not within the 160x120"]),
    # checked before the text encoder reads the texts (each text here is sent by no other test: not cached)
    "box outside image, with a text": (
        _request(texts=["purple delivery van"], regions=[_box(200, 10, 300, 100)]),
        ["regions[0].box", "not within the 160x120"],
    ),
    "point outside, with a text": (
        _request(texts=["orange taxi cab"], regions=[pb.RegionPrompt(points=[pb.Point(x=500, y=5, label=1)])]),
        ["regions[0].points[0]", "outside"],
    ),
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


# --- labels must be printable text ------------------------------------------------------------------------------------
# Every text that can come back as an instance's label, with each kind of character that must not (Unicode Cc, Cf,
# Zl, Zp and noncharacters; a lone surrogate cannot travel in a protobuf string): INVALID_ARGUMENT naming the field,
# the kind and the code point, through the same test as every other bad input (no model runs; the server goes on).
UNPRINTABLE = {
    "\x00": "a control character (U+0000)",
    "\x1b": "a control character (U+001B)",  # ESC: "\x1b[2J" clears a terminal that echoes the label
    "\n": "a control character (U+000A)",
    "\t": "a control character (U+0009)",
    "\x7f": "a control character (U+007F)",
    "\x85": "a control character (U+0085)",  # C1 NEL
    "\u200b": "a format character (U+200B)",  # zero-width space
    "\u202e": "a format character (U+202E)",  # right-to-left override
    "\ufeff": "a format character (U+FEFF)",  # byte order mark
    "\u2028": "a line separator (U+2028)",
    "\u2029": "a paragraph separator (U+2029)",
    "\uffff": "a noncharacter (U+FFFF)",  # not allowed in XML 1.0
}
_EXEMPLAR_BOX = pb.BoundingBox(x_min=10, y_min=10, x_max=40, y_max=40)
LABEL_FIELDS = {
    "classes[1]": lambda text: _request(classes=["person", text]),
    "texts[1]": lambda text: _request(texts=["red car", text]),
    "regions[1].label": lambda text: _request(
        regions=[_box(1, 1, 50, 50), pb.RegionPrompt(box=_EXEMPLAR_BOX, label=text)]
    ),
    "exemplars[0].label": lambda text: _request(exemplars=[pb.Exemplar(box=_EXEMPLAR_BOX, label=text)]),
}
for _field, _make in LABEL_FIELDS.items():
    for _char, _kind in UNPRINTABLE.items():
        CASES[f"{_field} with {_kind}"] = (_make(f"bad{_char}label"), [_field, f"contains {_kind}", "printable text"])


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


def test_labels_in_any_script_with_markup_characters_come_back_verbatim_and_unprintable_ones_are_refused(stub):
    """Printable is not ASCII: accents, CJK, quotes, ampersands and angle brackets are labels like any other (the
    exports escape them); the issue's own examples are refused, naming the field."""
    labels = ["café", "红色 car", 'say "hi" & <b>', "it's"]
    request = _request(regions=[_box(10 + 20 * k, 10, 25 + 20 * k, 40) for k in range(len(labels))])
    for region, label in zip(request.regions, labels, strict=True):
        region.label = label
    response = stub.Segment(request, timeout=120)
    assert sorted(i.label for i in response.instances if i.source == pb.INSTANCE_SOURCE_REGION_PROMPT) == sorted(labels)
    for request, field in (
        (_request(classes=["star\x00", "circle\n\x1b[2J"]), "classes[0]"),
        (_request(texts=["red \x01star"]), "texts[0]"),
        (_request(exemplars=[pb.Exemplar(box=_EXEMPLAR_BOX, label="bad\nlabel\x00")]), "exemplars[0].label"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: contains a control character (U+00")


def test_batch_and_stream_items_with_unprintable_labels_fail_alone(stub):
    """BatchSegment and StreamSegment items go through the same checks: the bad item gets its own
    INVALID_ARGUMENT naming the field, the good one its answer."""
    good, bad = _request(options=pb.SegmentOptions(max_instances=1)), _request(texts=["red\u202ecar"])
    batch = stub.BatchSegment(pb.BatchSegmentRequest(requests=[good, bad]), timeout=120)
    streamed = list(stub.StreamSegment(iter([bad, good]), timeout=120))
    for results, bad_index in ((batch.results, 1), (streamed, 0)):
        by_index = {r.index: r for r in results}
        assert by_index[bad_index].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert by_index[bad_index].error.message.startswith("texts[0]: contains a format character (U+202E)")
        assert by_index[1 - bad_index].WhichOneof("result") == "response"
