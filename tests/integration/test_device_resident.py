"""Device-resident SAM (what the torch runner does on a GPU), run on the CPU: features stay tensors in the runner
and the embedding cache, low-res masks are upsampled, thresholded and counted as tensors, only final masks cross.
The same answers as the host path, through the real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models.profiles import resolve_models
from service.models.tensors import SegmenterSpec
from service.processing.segmentation import SegmenterProcessing
from service.proto.detseg.v1 import detseg_pb2 as pb
from tests.conftest import serving, ultralytics_asset
from tests.helpers import RAW_MASKS, mask_iou, rle_mask


def test_upsampling_on_the_device_equals_the_host_path() -> None:
    """sam2's bilinear upsampling (torch) vs OpenCV's (host): the same masks but for pixels whose logit is ~0, the
    same stability scores, and the column-major layout pycocotools reads."""
    processing = SegmenterProcessing(SegmenterSpec(image_size=256))
    rng = np.random.default_rng(0)
    low_res = (rng.standard_normal((5, 64, 64)) * 4).astype(np.float32)
    host = processing.postprocess(low_res, (301, 457))
    device = processing.postprocess(torch.from_numpy(low_res), (301, 457))
    assert device.masks.shape == host.masks.shape == (5, 301, 457)
    assert device.masks.transpose(1, 2, 0).flags.f_contiguous
    assert (device.masks != host.masks).mean() < 1e-4
    np.testing.assert_allclose(device.stability, host.stability, atol=1e-3)


def test_sam_input_is_pre_processed_on_the_runners_device() -> None:
    """A device-resident runner names its device as SAM's input device: the image crosses as uint8 and is resized
    and normalised there, with sam2's own transforms (here the CPU: the same floats as the host path)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (301, 457, 3), np.uint8)
    host = SegmenterProcessing(SegmenterSpec(image_size=256)).preprocess(rgb)
    there = SegmenterProcessing(SegmenterSpec(image_size=256, input_device="cpu")).preprocess(rgb)
    assert isinstance(host, np.ndarray) and isinstance(there, torch.Tensor) and there.device.type == "cpu"
    np.testing.assert_array_equal(there.numpy(), host)


@pytest.mark.parametrize("image", ["bus.jpg", "zidane.jpg"])
def test_device_resident_runner_answers_as_the_host_runner(settings, stub, image: str) -> None:
    from service.runners.torch import TorchRunner

    def resident() -> TorchRunner:
        runner = TorchRunner.load(resolve_models(settings), settings, device_resident=True)
        assert runner.device_resident and runner.segmenter.input_device == "cpu"  # SAM's input is made there
        return runner

    # Bytes of its own (JPEG ignores trailing bytes): the session server's cache must not learn the plain photo.
    data = ultralytics_asset(image).read_bytes() + b"\0device-resident"
    request = pb.SegmentRequest(
        image=pb.Image(encoded=data), options=pb.SegmentOptions(score_threshold=0.05, refinement=RAW_MASKS)
    )
    expected = stub.Segment(request, timeout=300)
    with serving(settings, resident) as resident_stub:
        got = resident_stub.Segment(request, timeout=300)
        # A cached re-prompt reads the device-resident features from the embedding cache.
        handle = resident_stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=data)), timeout=300).handle
        box = expected.instances[0].box
        region = pb.RegionPrompt(box=box, label="again")
        again = resident_stub.Segment(
            pb.SegmentRequest(image=pb.Image(handle=handle), regions=[region], options=request.options), timeout=300
        )
    assert len(expected.instances) >= 3
    assert [i.label for i in got.instances] == [i.label for i in expected.instances]
    for a, b in zip(got.instances, expected.instances, strict=True):
        assert mask_iou(rle_mask(a.mask), rle_mask(b.mask)) >= 0.999
        assert a.mask_score == pytest.approx(b.mask_score, abs=1e-4)
        assert a.review.stability_score == pytest.approx(b.review.stability_score, abs=1e-3)
    assert "encode" not in {t.stage for t in again.provenance.timings}  # the features came from the cache
    assert mask_iou(rle_mask(again.instances[0].mask), rle_mask(expected.instances[0].mask)) >= 0.99
