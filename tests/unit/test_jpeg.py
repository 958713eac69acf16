"""JPEG pixels through TorchCodec (service.pipeline.image): what Pillow decodes, byte for byte, on every kind of JPEG
Pillow writes, in the displayed frame; the JPEGs it leaves to Pillow, and bad data refused as before.

The oracle is Pillow itself (``ImageOps.exif_transpose`` then RGB), the decoder these images went through before.
On a GPU machine, ``DETSEG_TEST_DEVICE=cuda`` runs the same comparisons on nvJPEG, which computes its own IDCT and
chroma upsampling: there the difference is measured (``tests.benchmarks.jpeg_bench``), not required to be zero.
"""

from __future__ import annotations

import concurrent.futures
import io
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from service.errors import ConfigurationError, InvalidImage
from service.models.roles import ModelDescriptor, ModelRole
from service.models.tensors import DetectorSpec, SegmenterSpec
from service.pipeline import image as image_module
from service.pipeline.image import ImageLimits, check_jpeg_device, decode_image
from service.pipeline.shared_cache import ModelIdentity
from tests.helpers import synthetic_rgb

LIMITS = ImageLimits(max_bytes=10 << 20, max_pixels=4_000_000, max_side=4096)


def pillow(data: bytes) -> np.ndarray:
    """The oracle: Pillow's pixels of ``data`` in the displayed frame, as RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def jpeg(rgb: np.ndarray, mode: str = "RGB", **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", **options)
    return buf.getvalue()


def through_torchcodec(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each device TorchCodec decodes on (so a test knows which decoder gave the pixels)."""
    calls: list[str] = []
    decode = image_module._jpeg_pixels

    def recorded(data: bytes, device: str) -> np.ndarray:
        calls.append(device)
        return decode(data, device)

    monkeypatch.setattr(image_module, "_jpeg_pixels", recorded)
    return calls


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 80),
    width=st.integers(1, 80),
    seed=st.integers(0, 2**16),
    quality=st.integers(1, 100),
    subsampling=st.sampled_from([0, 1, 2]),
    progressive=st.booleans(),
    restart=st.sampled_from([0, 1, 7]),
    gray=st.booleans(),
)
def test_torchcodec_gives_pillows_pixels_on_any_jpeg_pillow_writes(
    height, width, seed, quality, subsampling, progressive, restart, gray
):
    rgb = synthetic_rgb(height, width, seed)
    options = {"quality": quality, "subsampling": subsampling, "progressive": progressive}
    if restart:
        options["restart_marker_blocks"] = restart
    data = jpeg(rgb, "L" if gray else "RGB", **options)
    decoded = decode_image(data, LIMITS).rgb
    assert decoded.flags.c_contiguous and decoded.dtype == np.uint8
    assert np.array_equal(decoded, pillow(data))


@pytest.mark.parametrize("orientation", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # 0 and 9: not orientations, ignored
def test_every_exif_orientation_turns_the_pixels_as_pillow_does(orientation, monkeypatch):
    calls = through_torchcodec(monkeypatch)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(synthetic_rgb(30, 52, seed=orientation), exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, LIMITS).rgb
    assert calls == ["cpu"]
    assert decoded.flags.c_contiguous
    assert decoded.shape == ((52, 30, 3) if orientation in (5, 6, 7, 8) else (30, 52, 3))
    assert np.array_equal(decoded, pillow(data))


def test_an_orientation_only_xmp_carries_is_left_to_pillow(monkeypatch):
    calls = through_torchcodec(monkeypatch)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = jpeg(synthetic_rgb(30, 52), xmp=xmp)
    decoded = decode_image(data, LIMITS).rgb
    assert calls == []  # TorchCodec reads EXIF's orientation only
    assert decoded.shape == (52, 30, 3)
    assert np.array_equal(decoded, pillow(data))


def test_cmyk_jpegs_keep_pillows_conversion(monkeypatch):
    calls = through_torchcodec(monkeypatch)
    data = jpeg(synthetic_rgb(24, 40), "CMYK", quality=90)
    decoded = decode_image(data, LIMITS).rgb
    assert calls == []
    assert np.array_equal(decoded, pillow(data))


def test_torchcodec_decodes_at_least_the_images_it_is_given(monkeypatch):
    calls = through_torchcodec(monkeypatch)
    decode_image(jpeg(synthetic_rgb(24, 40)), LIMITS)
    decode_image(jpeg(synthetic_rgb(24, 40), "L"), LIMITS)
    assert calls == ["cpu", "cpu"]


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_a_truncated_jpeg_is_refused_as_corrupt_and_the_next_decodes(keep):
    data = jpeg(synthetic_rgb(120, 160), quality=90)
    with pytest.raises(InvalidImage, match=r"^image\.encoded: corrupt or truncated JPEG data$"):
        decode_image(data[: int(len(data) * keep)], LIMITS)
    assert np.array_equal(decode_image(data, LIMITS).rgb, pillow(data))


def test_scan_data_cut_short_but_closed_by_an_end_marker_decodes_grey_padded_as_pillow_does(monkeypatch):
    """The one damage libjpeg only warns about (README: not detected); TorchCodec decodes it as Pillow does."""
    calls = through_torchcodec(monkeypatch)
    data = jpeg(synthetic_rgb(120, 160), quality=90)
    cut = data[: len(data) // 2] + b"\xff\xd9"
    decoded = decode_image(cut, LIMITS).rgb
    assert calls == ["cpu"]
    assert np.array_equal(decoded, pillow(cut)) and (decoded[-1, -1] == 128).all()


def garbled(seed: int, flips: int) -> bytes:
    """A JPEG with ``flips`` bytes of its scan data replaced at random (seeded)."""
    data = bytearray(jpeg(synthetic_rgb(48, 64, seed), quality=90))
    start = data.index(b"\xff\xda") + 14  # past the start-of-scan header
    rng = np.random.default_rng(seed)
    for at in rng.integers(start, len(data) - 2, flips):
        data[at] = int(rng.integers(0, 256))
    return bytes(data)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), flips=st.integers(1, 40))
def test_garbled_scan_data_is_refused_or_decoded_as_pillow_does(seed, flips):
    """libjpeg decodes some damage with a warning (both decoders do), and refuses other damage."""
    data = garbled(seed, flips)
    try:
        expected = pillow(data)
    except OSError:
        with pytest.raises(InvalidImage, match=r"^image\.encoded: corrupt or truncated JPEG data$"):
            decode_image(data, LIMITS)
        return
    assert np.array_equal(decode_image(data, LIMITS).rgb, expected)


def test_damage_torchcodec_refuses_and_pillow_decodes_is_decoded_by_pillow():
    data = garbled(30, 31)  # found by the test above: TorchCodec stops ("skipped over more data than is available")
    with pytest.raises(RuntimeError):
        image_module._jpeg_pixels(data, "cpu")
    assert np.array_equal(decode_image(data, LIMITS).rgb, pillow(data))


def test_only_the_cpu_and_cuda_devices_this_machine_has_decode_jpegs():
    assert check_jpeg_device("cpu") == "cpu"
    with pytest.raises(ConfigurationError, match=r"^jpeg_device: 'gpu' is not a torch device"):
        check_jpeg_device("gpu")
    with pytest.raises(ConfigurationError, match=r"^jpeg_device: 'cuda:99' is not a CUDA device of this machine"):
        check_jpeg_device("cuda:99")


def test_jpegs_decoded_on_a_gpu_name_nvjpeg_in_the_shared_tiers_keys():
    """nvJPEG's pixels are its own, so features and detections computed from them never answer a replica that
    decodes on the host; the host's keys are the ones of before (Pillow's pixels)."""
    names = ("circle", "square")
    runner = SimpleNamespace(
        models=[
            ModelDescriptor(ModelRole.DETECTOR, "d", "yolo11n.yaml", "1", "a" * 64, 640, names),
            ModelDescriptor(ModelRole.SEGMENTER, "s", "sam2.1_hiera_t", "1", "b" * 64, 1024),
        ],
        backend="torch",
        detector=DetectorSpec(names, 640, 32, 512),
        segmenter=SegmenterSpec(1024),
    )
    host, gpu = ModelIdentity.of(runner), ModelIdentity.of(runner, None, "cuda:1")
    assert host == ModelIdentity.of(runner, None, "cpu")
    assert host.segmenter != gpu.segmenter and host.detector != gpu.detector
    assert ModelIdentity.of(runner, None, "cuda") == gpu  # nvJPEG's pixels, whichever GPU


def test_threads_decoding_at_once_get_each_images_own_pixels():
    """The server decodes on its event loop's executor threads, with the GIL released inside TorchCodec."""
    images = [jpeg(synthetic_rgb(90 + k, 120 - k, seed=k), quality=60 + k) for k in range(16)]
    expected = [pillow(data) for data in images]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(lambda data: decode_image(data, LIMITS).rgb, images * 4))
    assert all(np.array_equal(d, expected[k % 16]) for k, d in enumerate(decoded))


@pytest.mark.parametrize("first", [b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>", b""])
def test_an_exif_orientation_after_another_app1_segment_is_applied(first, monkeypatch):
    """Pillow reads the first APP1 segment that is EXIF, TorchCodec (libjpeg) the first APP1 segment only: a JPEG with
    XMP (or any APP1) before its EXIF was served unrotated, while its CMYK twin, and the same file given to the client
    as a PIL image, were rotated."""
    calls = through_torchcodec(monkeypatch)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(synthetic_rgb(30, 52, seed=3), exif=exif.tobytes(), quality=95)
    segment = b"\xff\xe1" + (len(first) + 2).to_bytes(2, "big") + first
    data = data[:2] + segment + data[2:]  # right after SOI, before the EXIF segment
    decoded = decode_image(data, LIMITS).rgb
    assert decoded.shape == (52, 30, 3) and np.array_equal(decoded, pillow(data))
    assert calls == []  # left to Pillow
