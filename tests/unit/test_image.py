"""Image decoding: formats by magic bytes, header size checks, EXIF orientation, mode conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image

from service.errors import InvalidImage
from service.pipeline.image import (
    ImageLimits,
    check_png_complete,
    declared_size,
    decode_image,
    image_from_raw,
    sniff_format,
)
from tests.helpers import encode, synthetic_rgb

LIMITS = ImageLimits(max_bytes=10 << 20, max_pixels=4_000_000, max_side=4096)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_allowed_formats_decode_to_rgb_and_declare_their_size(fmt):
    rgb = synthetic_rgb(90, 130)
    data = encode(rgb, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert sniff_format(data) == fmt
    assert declared_size(data, fmt) == (130, 90)
    image = decode_image(data, LIMITS)
    assert image.rgb.shape == (90, 130, 3) and image.rgb.dtype == np.uint8 and image.rgb.flags.writeable
    assert image.format == fmt.lower()
    if fmt != "JPEG":
        assert np.array_equal(image.rgb, rgb)


def test_lossy_webp_declares_its_size():
    data = encode(synthetic_rgb(64, 48), "WEBP", quality=80)
    assert declared_size(data, "WEBP") == (48, 64)


def test_exif_orientation_6_rotates_to_the_displayed_frame():
    rgb = synthetic_rgb(100, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif.tobytes())
    image = decode_image(buf.getvalue(), LIMITS)
    assert image.rgb.shape == (200, 100, 3)


@pytest.mark.parametrize(
    ("mode", "check"),
    [
        ("L", lambda rgb: np.array_equal(rgb[..., 0], rgb[..., 2])),
        ("RGBA", lambda rgb: (rgb[0, 0] == 255).all()),  # transparent corner composited over white
        ("I;16", lambda rgb: rgb.max() == 255 and rgb.min() == 0),  # scaled, not clipped
        ("CMYK", lambda rgb: rgb.shape[2] == 3),
        ("P", lambda rgb: rgb.shape[2] == 3),
    ],
)
def test_other_modes_become_8bit_rgb(mode, check):
    base = synthetic_rgb(32, 48)
    if mode == "RGBA":
        rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
        rgba[0, 0, 3] = 0
        img = Image.fromarray(rgba)
    elif mode == "I;16":
        ramp = np.linspace(0, 65535, 32 * 48).astype(np.uint16).reshape(32, 48)
        img = Image.fromarray(ramp)
    else:
        img = Image.fromarray(base).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    rgb = decode_image(buf.getvalue(), LIMITS).rgb
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    assert check(rgb)


def test_pixel_cap_is_checked_from_the_header():
    data = encode(synthetic_rgb(64, 64))
    with pytest.raises(InvalidImage, match="64x64 = 4096 pixels exceeds the limit of 1000"):
        decode_image(data, ImageLimits(max_bytes=1 << 20, max_pixels=1000, max_side=4096))


def test_byte_cap():
    with pytest.raises(InvalidImage, match="108 bytes exceeds the limit of 10 bytes"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"0" * 100, ImageLimits(max_bytes=10, max_pixels=100, max_side=10))


def test_raw_rgb_round_trips_and_hashes_its_bytes():
    rgb = synthetic_rgb(10, 20)
    image = image_from_raw(rgb.tobytes(), 20, 10, LIMITS)
    assert np.array_equal(image.rgb, rgb) and image.format == "raw" and len(image.sha256) == 64


def test_raw_pixels_are_bounded_as_encoded_bytes_are_and_a_large_array_is_sent_as_png(monkeypatch):
    """Raw pixels passed max_image_bytes unchecked; a 12 MP array from the client (36 MB raw) was refused by gRPC's
    message limit, RESOURCE_EXHAUSTED naming nothing. Past RAW_MAX_BYTES the client sends lossless PNG."""
    from service import client_requests
    from service.client_requests import image_message

    small = ImageLimits(max_bytes=599, max_pixels=4_000_000, max_side=4096)
    rgb = synthetic_rgb(10, 20)  # 600 bytes raw
    with pytest.raises(InvalidImage, match=r"image.raw.data: 600 bytes exceeds the limit of 599 bytes"):
        image_from_raw(rgb.tobytes(), 20, 10, small)
    assert image_message(rgb).WhichOneof("source") == "raw"
    monkeypatch.setattr(client_requests, "RAW_MAX_BYTES", 599)
    sent = image_message(rgb)
    assert sent.WhichOneof("source") == "encoded" and np.array_equal(decode_image(sent.encoded, LIMITS).rgb, rgb)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _interlaced_png(rgb: np.ndarray, keep_bytes: int | None = None) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG of ``rgb`` (Pillow cannot write one); ``keep_bytes`` cuts its pixel data."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    raw = raw if keep_bytes is None else raw[:keep_bytes]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_interlaced_png_decodes_and_a_short_one_is_truncated():
    rgb = synthetic_rgb(37, 53)
    assert np.array_equal(decode_image(_interlaced_png(rgb), LIMITS).rgb, rgb)
    with pytest.raises(InvalidImage, match=r"image.encoded: truncated PNG data"):
        decode_image(_interlaced_png(rgb, keep_bytes=3000), LIMITS)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "I;16", "LA"])
def test_complete_pngs_of_every_bit_depth_pass_the_completeness_check(mode):
    base = Image.fromarray(synthetic_rgb(33, 47))
    img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    check_png_complete(buf.getvalue())
    assert decode_image(buf.getvalue(), LIMITS).rgb.shape == (33, 47, 3)


def test_png_cut_inside_its_data_is_truncated_not_corrupt():
    data = encode(synthetic_rgb(200, 300), "PNG")
    with pytest.raises(InvalidImage, match=r"truncated PNG data: the image data holds \d+ of the 180200 bytes"):
        decode_image(data[: len(data) // 2], LIMITS)


def _pil_modes():
    rgb = synthetic_rgb(40, 60)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # a transparent corner: over white, as the server composites it
    wide = rgb[..., 0].astype(np.uint16) * 257  # 16-bit grey using the whole range
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "I;16": Image.fromarray(wide, "I;16"),
        "L": Image.fromarray(rgb[..., 1]),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
    }


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "L", "P", "CMYK"])
def test_a_pil_image_sent_by_the_client_reads_as_its_file_does(mode):
    """``Client.segment(Image.open(path))`` and ``Client.segment(path)`` see the same pixels (before: the client
    converted to RGB itself, dropping alpha to black where the server composites over white, and clipping 16-bit
    values where the server scales them)."""
    from service.client_requests import image_message

    pil = _pil_modes()[mode]
    sent = decode_image(image_message(pil).encoded, LIMITS).rgb
    if mode == "CMYK":  # no format the server reads holds it: Pillow's own RGB
        np.testing.assert_array_equal(sent, np.asarray(pil.convert("RGB")))
        return
    as_file = io.BytesIO()
    pil.save(as_file, format="PNG")
    np.testing.assert_array_equal(sent, decode_image(as_file.getvalue(), LIMITS).rgb)


def test_a_pil_image_is_sent_in_its_displayed_orientation():
    """An opened photo with EXIF orientation 6 is sent upright, as the server reads the file (before: sideways)."""
    from service.client_requests import image_message

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(synthetic_rgb(100, 200)).save(buf, format="PNG", exif=exif.tobytes())
    sent = decode_image(image_message(Image.open(io.BytesIO(buf.getvalue()))).encoded, LIMITS).rgb
    np.testing.assert_array_equal(sent, decode_image(buf.getvalue(), LIMITS).rgb)
    assert sent.shape == (200, 100, 3)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_exif_entry_of_a_bad_type_is_a_corrupt_image(fmt):
    # The Make tag (0x010f) renamed ImageWidth (0x0100), a number holding text: Pillow's EXIF writer, run by
    # exif_transpose, raised struct.error, which reached the client as INTERNAL instead of INVALID_ARGUMENT
    # (found by fuzzing the header bytes).
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "cam"
    raw = bytearray(exif.tobytes())
    assert raw[16:20] == b"\x01\x0f\x00\x02"  # the first entry: Make, ASCII
    raw[17] = 0
    buf = io.BytesIO()
    Image.fromarray(synthetic_rgb(24, 32)).save(buf, format=fmt, exif=bytes(raw))
    with pytest.raises(InvalidImage, match=f"image.encoded: corrupt or truncated {fmt} data"):
        decode_image(buf.getvalue(), LIMITS)


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_a_png_colour_key_is_composited_over_white_in_every_mode(mode):
    # A tRNS colour key in an RGB or L PNG was ignored (only palette images were composited), so one picture saved
    # two ways reached the models as different pixels.
    rgb = synthetic_rgb(8, 8)
    rgb[0, 0] = (10, 20, 30) if mode != "L" else (18, 18, 18)
    img = Image.fromarray(rgb).convert(mode)
    key = {"RGB": (10, 20, 30), "L": 18, "P": img.getpixel((0, 0))}[mode]
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=key)
    decoded = decode_image(buf.getvalue(), LIMITS).rgb
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    expected = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), Image.open(buf).convert("RGBA"))
    assert np.array_equal(decoded, np.array(expected.convert("RGB")))


def _png16(values: np.ndarray, key: tuple[int, ...]) -> bytes:
    """A 16-bit grey (H, W) or RGB (H, W, 3) PNG of ``values`` with tRNS colour ``key`` (Pillow writes neither)."""
    import struct
    import zlib

    h, w = values.shape[:2]
    colour = 0 if values.ndim == 2 else 2
    rows = values.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    trns = b"".join(struct.pack(">H", v) for v in key)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"tRNS", trns) + _png_chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


def test_a_16_bit_png_colour_key_is_composited_over_white():
    """A 16-bit grey PNG's key was ignored (the key pixel kept its grey); a 16-bit RGB PNG's key was matched on its
    low byte by Pillow (the key pixel stayed grey, an opaque black one went white)."""
    grey = np.array([[32768, 0]], np.uint16)
    assert decode_image(_png16(grey, (32768,)), LIMITS).rgb.tolist() == [[[255] * 3, [0] * 3]]
    rgb = np.array([[[32768] * 3, [0] * 3]], np.uint16)
    assert decode_image(_png16(rgb, (32768,) * 3), LIMITS).rgb.tolist() == [[[255] * 3, [0] * 3]]
