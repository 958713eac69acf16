"""Image decoding and validation: bytes in, RGB uint8 (H, W, 3) out, or InvalidImage.

Checks happen cheapest-first and before any pixel is decoded: byte size, format by magic bytes
(JPEG, PNG, WebP only), then the pixel count declared in the header, then (PNG) that the compressed data holds
every row the header declares. EXIF orientation is applied, so every coordinate detseg returns is in the
displayed frame. Grayscale, palette, RGBA (composited over white), 16-bit and CMYK images are converted to
8-bit RGB.

Pixels: JPEGs whose header Pillow reads as YCbCr or grayscale (nearly all; not those whose orientation only XMP
carries, which TorchCodec does not read) are decoded by TorchCodec (``decode_jpeg``: libjpeg-turbo on the CPU, nvJPEG
on a CUDA device), the decoder the PyTorch ecosystem moved to from torchvision's. On the CPU it gives Pillow's pixels
byte for byte (tests/unit/test_jpeg.py) in 0.26 (12 MP) to 0.88 (1 MP) of Pillow's time, since it decodes straight
into the (H, W, 3) array and releases the GIL (benchmarks/JPEG.md). Every other image, CMYK JPEGs included, is
decoded by Pillow, and so are damaged JPEGs TorchCodec refuses (it stops at damage that libjpeg decodes with a
warning through Pillow): what is refused stays what Pillow refuses.

Bytes are parsed by Pillow's own format plugins, never through ``PIL.Image.open``: ultralytics replaces that
function process-wide with a wrapper that, for bytes Pillow cannot identify, runs its requirement checker
(which may pip-install a package). Nothing here can install, download or start a process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin
from torchcodec.decoders import decode_jpeg

from service.errors import ConfigurationError, InvalidImage
from service.pixels import upright_rgb

# Allowed formats: (magic-byte test, PIL format name, our name).
_ALLOWED = (
    (lambda b: b.startswith(b"\xff\xd8\xff"), "JPEG", "jpeg"),
    (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "PNG", "png"),
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", "WEBP", "webp"),
)
# Recognised but refused, so the message can say what was sent.
_REFUSED = (
    (lambda b: b[:6] in (b"GIF87a", b"GIF89a"), "GIF"),
    (lambda b: b[:4] in (b"II*\x00", b"MM\x00*"), "TIFF"),
    (lambda b: b[:2] == b"BM", "BMP"),
    (lambda b: b[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"), "HEIF/AVIF"),
)
ALLOWED_FORMATS = "JPEG, PNG, WebP"
# Pillow's plugin class per allowed format: parsing the header is constructing one (what Image.open does inside).
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}
# JPEG colour modes (as Pillow's header reader names them) whose pixels TorchCodec decodes: YCbCr (and RGB) and
# grayscale. CMYK and YCCK keep Pillow's conversion.
_TORCHCODEC_MODES = ("RGB", "L")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_side: int


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A validated image.

    Attributes:
        rgb: (H, W, 3) uint8, C-contiguous, displayed orientation (EXIF applied).
        format: "jpeg", "png", "webp" or "raw".
        sha256: hex digest of the bytes received.
    """

    rgb: np.ndarray
    format: str
    sha256: str

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def sniff_format(data: bytes, field: str = "image.encoded") -> str:
    """Returns the PIL format name of allowed bytes, or raises InvalidImage naming what was sent."""
    for test, pil_name, _ in _ALLOWED:
        if test(data):
            return pil_name
    for test, name in _REFUSED:
        if test(data):
            raise InvalidImage(f"{field}: {name} is not supported; send {ALLOWED_FORMATS}")
    raise InvalidImage(f"{field}: not a recognised image (expected {ALLOWED_FORMATS} bytes)")


def _check_size(width: int, height: int, limits: ImageLimits, field: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"{field}: image has no pixels ({width}x{height})")
    if width > limits.max_side or height > limits.max_side:
        raise InvalidImage(f"{field}: {width}x{height} exceeds the largest side allowed ({limits.max_side} px)")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"{field}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )


def decode_image(
    data: bytes,
    limits: ImageLimits,
    field: str = "image.encoded",
    sha256: str | None = None,
    jpeg_device: str = "cpu",
) -> DecodedImage:
    """Decodes JPEG/PNG/WebP bytes into a validated RGB image (see module docstring).

    ``sha256``: the bytes' hex digest when the caller has it already (not recomputed). ``jpeg_device``: the torch
    device TorchCodec decodes JPEGs on ("cpu", or "cuda"/"cuda:N" for nvJPEG); the pixels end on the host."""
    if not data:
        raise InvalidImage(f"{field}: empty; send {ALLOWED_FORMATS} bytes or image.raw")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"{field}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    pil_format = sniff_format(data, field)
    ours = next(name for _, pil, name in _ALLOWED if pil == pil_format)
    declared = declared_size(data, pil_format)
    if declared is not None:  # checked from our own header read, before Pillow allocates anything
        _check_size(*declared, limits, field)
    if pil_format == "PNG":
        check_png_complete(data, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _OPENERS[pil_format](io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImage(f"{field}: declared size exceeds the limit of {limits.max_pixels} pixels") from None
    except _CORRUPT:
        raise InvalidImage(f"{field}: corrupt {ours.upper()} header") from None
    _check_size(img.width, img.height, limits, field)  # from the header, before decoding
    try:
        rgb = _torchcodec_pixels(data, img, jpeg_device) if pil_format == "JPEG" else None
        if rgb is None:
            img.load()
            rgb = upright_rgb(img)
    except (*_CORRUPT, Image.DecompressionBombError):
        raise InvalidImage(f"{field}: corrupt or truncated {ours.upper()} data") from None
    return DecodedImage(rgb=rgb, format=ours, sha256=sha256 or hashlib.sha256(data).hexdigest())


# What Pillow raises on bytes it cannot read: its image plugins raise OSError, SyntaxError or ValueError, but its EXIF
# reader (TiffImagePlugin, run by exif_transpose and the orientation check) raises whatever the bad entry causes
# (struct.error, TypeError for a tag of another type, KeyError, ZeroDivisionError for a rational of 0/0).
_CORRUPT = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)


def declared_size(data: bytes, pil_format: str) -> tuple[int, int] | None:
    """(width, height) read from the header alone; None if the header is not where we look (Pillow decides)."""
    try:
        if pil_format == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if pil_format == "WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                w, h = int.from_bytes(data[24:27], "little"), int.from_bytes(data[27:30], "little")
                return w + 1, h + 1
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        if pil_format == "JPEG":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except struct.error:
        return None
    return None


# Samples per pixel by PNG colour type, and the Adam7 interlace passes as (x0, y0, dx, dy).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20  # bytes inflated at a time: the check holds at most this much decompressed data


def check_png_complete(data: bytes, field: str = "image.encoded") -> None:
    """Raises InvalidImage unless the PNG's image data inflates to every row its header declares.

    Pillow treats the end of the zlib stream as the end of the image, so a PNG that declares 6000x6000 and
    carries 64 rows would otherwise decode "successfully" into mostly uninitialised pixels. The check streams
    the IDAT chunks through zlib in 1 MiB steps, counting bytes (no image buffer), and stops as soon as the
    declared amount is reached or the data ends; a truncated file is refused after inflating only what it has.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidImage(f"{field}: corrupt PNG header")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise InvalidImage(f"{field}: corrupt PNG header (colour type {colour}, bit depth {depth})")
    bits = _PNG_CHANNELS[colour] * depth

    def scanlines(w: int, h: int) -> int:  # bytes of h filtered rows of w pixels
        return h * (1 + (w * bits + 7) // 8) if w > 0 and h > 0 else 0

    if interlace:
        expected = sum(
            scanlines((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7
        )
    else:
        expected = scanlines(width, height)
    inflater, inflated, pos = zlib.decompressobj(), 0, 8
    try:
        while pos + 8 <= len(data) and inflated < expected and not inflater.eof:
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            body = data[pos + 8 : pos + 8 + length]
            pos += 12 + length
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                continue
            while body and inflated < expected:
                inflated += len(inflater.decompress(body, _INFLATE_STEP))
                body = inflater.unconsumed_tail
    except zlib.error:
        raise InvalidImage(f"{field}: corrupt PNG data (the compressed stream is invalid)") from None
    if inflated < expected:
        raise InvalidImage(
            f"{field}: truncated PNG data: the image data holds {inflated} of the {expected} bytes its "
            f"{width}x{height} header declares"
        )


def image_from_raw(
    data: bytes, width: int, height: int, limits: ImageLimits, sha256: str | None = None, field: str = "image.raw"
) -> DecodedImage:
    """Validates raw interleaved RGB bytes (row-major, width * height * 3; at most ``max_bytes``, as encoded bytes
    are) and wraps them."""
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            f"{field}.data: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes (max_image_bytes); send "
            "the image encoded (PNG is lossless)"
        )
    _check_size(width, height, limits, field)
    expected = width * height * 3
    if len(data) != expected:
        raise InvalidImage(
            f"{field}.data: {len(data)} bytes, expected width*height*3 = {width}*{height}*3 = {expected}"
        )
    rgb = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    return DecodedImage(rgb=rgb, format="raw", sha256=sha256 or hashlib.sha256(data).hexdigest())


def check_jpeg_device(device: str) -> str:
    """``device`` when JPEGs can be decoded there (the Settings' ``jpeg_device``: "cpu", or a CUDA device this
    process sees), else ConfigurationError naming the setting."""
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ConfigurationError(f"jpeg_device: {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if where.type == "cpu":
        return device
    if where.type != "cuda" or not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count():
        raise ConfigurationError(f"jpeg_device: {device!r} is not a CUDA device of this machine; decode on cpu")
    return device


def _torchcodec_pixels(data: bytes, header: Image.Image, device: str) -> np.ndarray | None:
    """A JPEG's pixels through TorchCodec (``_jpeg_pixels``), or None where Pillow decodes it: a colour mode or an
    orientation TorchCodec does not read, or damage it refuses that Pillow may decode (with libjpeg's warning)."""
    if header.mode not in _TORCHCODEC_MODES or _orientation(header) != _first_app1_orientation(data):
        return None
    try:
        return _jpeg_pixels(data, device)
    except RuntimeError:
        return None


def _jpeg_pixels(data: bytes, device: str) -> np.ndarray:
    """JPEG bytes (YCbCr or grayscale) → (H, W, 3) uint8, C-contiguous, decoded by TorchCodec on ``device``, in the
    displayed frame: TorchCodec applies the EXIF orientation as ``ImageOps.exif_transpose`` does (a transposing
    one leaves a strided view, copied here). Bad data raises RuntimeError (TorchCodec returns no partial image)."""
    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB", device=device)
    assert isinstance(chw, torch.Tensor)  # one image in, one out
    return np.ascontiguousarray(chw.permute(1, 2, 0).cpu().numpy())


def _orientation(header: Image.Image) -> int:
    """The orientation Pillow reads (``exif_transpose`` applies): its EXIF's (the first APP1 segment that is EXIF),
    else its XMP's; 1 where none."""
    return int(header.getexif().get(ExifTags.Base.Orientation) or 1)


def _first_app1_orientation(data: bytes) -> int:
    """The orientation TorchCodec applies, as libjpeg reads a JPEG's metadata: the EXIF orientation of the first APP1
    segment when that one is EXIF (an XMP segment before it hides it), else 1."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more metadata
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1:
            payload = data[i + 4 : i + 2 + length]
            if not payload.startswith(b"Exif\x00\x00"):
                break
            exif = Image.Exif()
            exif.load(payload)
            return int(exif.get(ExifTags.Base.Orientation) or 1)
        i += 2 + length
    return 1
