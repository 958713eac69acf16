"""EXIF orientation: answers are in the displayed (rotated) frame."""

from __future__ import annotations

import io

from PIL import Image

from service.proto.detseg.v1 import detseg_pb2 as pb
from tests.conftest import ultralytics_asset
from tests.helpers import load_rgb, rle_mask


def test_jpeg_with_orientation_6_yields_masks_in_the_rotated_frame(stub):
    rgb = load_rgb(ultralytics_asset("zidane.jpg"))  # 1280 wide, 720 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    request = pb.SegmentRequest(
        image=pb.Image(encoded=buf.getvalue()),
        regions=[pb.RegionPrompt(box=pb.BoundingBox(x_min=100, y_min=900, x_max=600, y_max=1200))],
        options=pb.SegmentOptions(score_threshold=0.05),
        classes=["person"],
    )
    response = stub.Segment(request, timeout=120)
    assert (response.image.width, response.image.height) == (720, 1280)
    assert response.instances
    for inst in response.instances:
        assert list(inst.mask.coco_rle.size) == [1280, 720]
        assert rle_mask(inst.mask).shape == (1280, 720)
