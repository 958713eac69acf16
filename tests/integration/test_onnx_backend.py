"""The in-process ONNX Runtime backend (``--backend onnx``) answers as the torch backend on the demo models."""

from __future__ import annotations

import grpc
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.dataset import scenes
from tests.helpers import assert_same_instances, encode
from tests.triton_helpers import start_detseg

pytestmark = pytest.mark.slow  # exports and loads the ONNX backend


@pytest.fixture(scope="module")
def onnx_stub(settings):
    srv = start_detseg(settings.replace(models="demo", backend="onnx"))
    with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)
    srv.stop()


def test_onnx_backend_matches_torch(onnx_stub, demo_stub, figures):
    stats: dict = {}
    for scene in scenes("test", 6, start=80):
        request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)))
        got = onnx_stub.Segment(request, timeout=120)
        assert got.provenance.backend == "onnx"
        assert_same_instances(demo_stub.Segment(request, timeout=120), got, stats)
    figures["ONNX Runtime backend vs torch (demo, 6 scenes)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, min mask IoU {stats['iou']:.4f}"
    )
