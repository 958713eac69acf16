"""Pixels as detseg reads them, for the server and the client-side tools alike: any Pillow image → 8-bit RGB."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → (H, W, 3) uint8. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = img.mode
    key = img.info.get("transparency")
    if mode == "RGB" and key is None:
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(img).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        if isinstance(key, int):  # a 16-bit grey PNG's colour key, in its own 16-bit units: exact
            gray[wide == key] = 255
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "RGB" and isinstance(key, tuple) and max(key) > 255:
        # A 16-bit RGB PNG's key: Pillow gives 8-bit pixels (the high byte) and the key in 16-bit units, and matched
        # it on its low byte (a key pixel stayed, an opaque one went white). The pixels whose high bytes are the
        # key's go white: the key pixel and those within 1/256 of it, as near as 8-bit pixels can say.
        rgb = np.array(img, dtype=np.uint8)
        rgb[np.all(rgb == np.array([v >> 8 for v in key], np.uint8), axis=-1)] = 255
        return rgb
    # A tRNS colour key (palette, RGB and L PNGs) is alpha too: Pillow reads those pixels as transparent.
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def upright_rgb(img: Image.Image) -> np.ndarray:
    """An image file's pixels as they are displayed (EXIF orientation applied) → (H, W, 3) uint8, as ``to_rgb``."""
    return to_rgb(ImageOps.exif_transpose(img) or img)
