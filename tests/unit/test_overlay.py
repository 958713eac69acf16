"""``detseg segment --out`` draws on the picture the server segmented (``service.cli.overlay.render_overlay``)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.cli.overlay import render_overlay
from service.pipeline.image import ImageLimits, decode_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_the_overlay_shows_the_pixels_the_server_decodes_16_bit_and_transparent_images_too() -> None:
    """A plain RGB conversion drew a 16-bit grey image all white (values clipped at 255) and a transparent one black
    (its alpha dropped), where the server scales 16-bit and composites alpha over white."""
    grey = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))
    clear = Image.new("RGBA", (64, 48), (10, 20, 30, 0))
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_side=1024)
    for img in (grey, clear):
        data = _png(img)
        drawn = np.asarray(Image.open(io.BytesIO(render_overlay(data, []))))
        assert np.array_equal(drawn, decode_image(data, limits, "image").rgb)
    assert drawn.min() == 255  # the transparent one: white, as the server sees it
