"""Image decoding: formats by magic bytes, header size checks, EXIF orientation, mode conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidImage
from service.pipeline.image import ImageLimits, declared_size, decode_image, image_from_raw, sniff_format
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
