"""The Triton path end to end: export → model repository → a real tritonserver → detseg's Triton runner.

A real ``tritonserver`` (the one nvidia-pytriton bundles) serves the demo models exported by
``service.models.triton_repo``; a real detseg gRPC server runs with ``backend=triton`` in front of it, and
its answers are compared with the embedded (torch) server's on the same images and prompts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import shutil
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.models import triton_repo
from service.models.profiles import resolve_models
from service.models.roles import MODEL_ROLES
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.dataset import scenes
from tests.conftest import ultralytics_asset
from tests.helpers import assert_same_instances, encode, mask_iou, rle_mask
from tests.triton_helpers import ROOT, metric, start_detseg, start_triton

pytestmark = [pytest.mark.triton, pytest.mark.slow]  # starts a real tritonserver

SERVICE = "detseg.v1.SegmentationService"


@pytest.fixture(scope="module")
def demo_settings(settings):
    return settings.replace(models="demo", threads=0)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, demo_settings):
    repo = tmp_path_factory.mktemp("model_repository")
    reports = triton_repo.write_repository(resolve_models(demo_settings), demo_settings, repo)
    return repo, reports


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    server = start_triton(repository[0], tmp_path_factory.mktemp("triton-state"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton_stub(triton, demo_settings):
    s = demo_settings.replace(backend="triton", triton_url=triton.url, health_interval_seconds=0.2)
    srv = start_detseg(s)
    with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)
    srv.stop()


def request_for(image: np.ndarray, **fields) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=pb.Image(encoded=encode(image)), **fields)


def test_export_is_checked_against_torch_and_configs_fit_tritons_schema(repository, demo_settings, figures):
    import onnx

    repo, reports = repository
    figures["ONNX vs torch max |diff| (demo: detector, encoder, decoder)"] = ", ".join(
        f"{r.max_abs_diff:.2e}" for r in reports
    )
    assert all(r.max_abs_diff < 1e-2 for r in reports)
    for role in MODEL_ROLES:
        graph = onnx.load(str(repo / role / "1" / "model.onnx"), load_external_data=False).graph
        for path, platform in ((repo / role / "config.pbtxt", ""), (repo / role / "configs" / "onnxruntime.pbtxt",
                               "onnxruntime_onnx")):  # fmt: skip
            config = triton_repo.parse_config(path)  # Triton's own schema (tritonclient's model_config_pb2)
            assert config.name == role and config.platform == platform
            assert [i.name for i in config.input] == [i.name for i in graph.input]
            assert [o.name for o in config.output] == [o.name for o in graph.output]
            assert config.parameters["detseg_profile"].string_value == "demo"
        batched = triton_repo.parse_config(repo / role / "config.pbtxt")
        if triton_repo.BATCHED[role]:
            assert batched.max_batch_size == demo_settings.triton_max_batch_size
            assert batched.dynamic_batching.default_queue_policy.max_queue_size == 32
        else:
            assert batched.max_batch_size == 0 and not batched.HasField("dynamic_batching")
        # The committed configs and entry points are this very export of the demo profile.
        for committed in ("config.pbtxt", "1/model.py"):
            assert (ROOT / "model_repository" / role / committed).read_text() == (repo / role / committed).read_text()
    # The python backend's code is written with the export, so the repository serves wherever it is.
    assert (repo / "ort_backend.py").read_text() == triton_repo.BACKEND_SOURCE.read_text()


def test_triton_answers_as_the_embedded_path(triton_stub, demo_stub, figures):
    stats: dict = {}
    images = [s.image for s in scenes("test", 6)]
    images.append(np.asarray(__import__("PIL.Image").Image.open(ultralytics_asset("bus.jpg")).convert("RGB")))
    for image in images:
        request = request_for(image)
        assert_same_instances(demo_stub.Segment(request, timeout=120), triton_stub.Segment(request, timeout=120), stats)
    # Region prompts: boxes, box + clicks, clicks only (multimask): every mask agrees.
    scene = next(iter(scenes("test", 1)))
    boxes = [pb.BoundingBox(x_min=i.box[0], y_min=i.box[1], x_max=i.box[2], y_max=i.box[3]) for i in scene.instances]
    regions = [pb.RegionPrompt(box=b) for b in boxes]
    x0, y0, x1, y1 = scene.instances[0].box
    regions.append(pb.RegionPrompt(points=[pb.Point(x=(x0 + x1) / 2, y=(y0 + y1) / 2, label=1)]))
    request = request_for(scene.image, regions=regions, options=pb.SegmentOptions(multimask=True))
    embedded, remote = demo_stub.Segment(request, timeout=120), triton_stub.Segment(request, timeout=120)
    assert len(embedded.instances) == len(remote.instances) == len(regions)
    for e, t in zip(embedded.instances, remote.instances, strict=True):
        stats["iou"] = min(stats["iou"], mask_iou(rle_mask(e.mask), rle_mask(t.mask)))
    assert stats["iou"] >= 0.99
    assert remote.provenance.backend == "triton" and remote.provenance.profile == "demo"
    figures["Triton vs embedded (demo, 7 images + 1 prompt set)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, max score |diff| {stats['score']:.2g}, "
        f"min mask IoU {stats['iou']:.4f}"
    )


def test_sixteen_concurrent_requests_each_get_their_own_answer(triton, triton_stub, demo_stub, figures):
    images = [s.image for s in scenes("test", 16, start=20)]
    expected = [demo_stub.Segment(request_for(im), timeout=120) for im in images]
    executions = metric(triton, "nv_inference_exec_count", model="detector")
    requests = metric(triton, "nv_inference_request_success", model="detector")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda im: triton_stub.Segment(request_for(im), timeout=300), images))
    stats: dict = {}
    for image, want, got in zip(images, expected, answers, strict=True):
        assert got.image.sha256 == hashlib.sha256(encode(image)).hexdigest()
        assert sorted(i.label for i in got.instances if i.score > 0.3) == sorted(
            i.label for i in want.instances if i.score > 0.3
        )
        assert_same_instances(want, got, stats)
    executions = metric(triton, "nv_inference_exec_count", model="detector") - executions
    requests = metric(triton, "nv_inference_request_success", model="detector") - requests
    figures["Triton dynamic batching, 16 concurrent requests"] = (
        f"{requests:.0f} detector requests in {executions:.0f} executions; min mask IoU vs embedded {stats['iou']:.4f}"
    )
    assert requests == 16


def test_deadline_shorter_than_the_work_is_exceeded_and_triton_sees_the_cancellation(
    triton, triton_stub, demo_settings
):
    import tritonclient.grpc as grpcclient

    cancelled = metric(triton, "nv_inference_request_failure", reason="CANCELED")
    client = grpcclient.InferenceServerClient(triton.url)
    # Keep the detector busy with batches sent straight to Triton, so detseg's call has to queue.
    size = demo_settings.triton_max_batch_size  # the largest batch the detector's config takes
    batch = np.random.default_rng(0).random((size, 3, 320, 320), dtype=np.float32)
    done = []

    def load() -> None:
        tensor = grpcclient.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        client.infer("detector", [tensor])
        done.append(1)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:  # 24 requests queued: fewer than max_queue_size (32)
        busy = [pool.submit(load) for _ in range(96 // size)]
        time.sleep(0.3)
        image = next(iter(scenes("test", 1, start=60))).image  # not sent before: no embedding-cache hit
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            triton_stub.Segment(request_for(image), timeout=0.5)
        elapsed = time.monotonic() - start
        for f in busy:
            f.result(120)
    client.close()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.0
    deadline = time.monotonic() + 20
    while metric(triton, "nv_inference_request_failure", reason="CANCELED") <= cancelled:
        assert time.monotonic() < deadline, "Triton never recorded the cancelled request"
        time.sleep(0.2)
    # And detseg keeps serving.
    assert triton_stub.Segment(request_for(image), timeout=120).instances


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


def wait_health(channel: grpc.Channel, status: int, timeout: float) -> float:
    start = time.monotonic()
    while health_status(channel) != status:
        assert time.monotonic() - start < timeout, f"health did not become {status}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_triton_crash_fails_fast_flips_health_and_recovers_without_restart(
    repository, demo_settings, tmp_path, figures
):
    server = start_triton(repository[0], tmp_path)
    settings = demo_settings.replace(
        backend="triton", triton_url=server.url, health_interval_seconds=0.2, cache_max_bytes=0
    )  # no embedding cache: every request of the same image goes to Triton
    detseg = start_detseg(settings)
    image = next(iter(scenes("test", 1))).image
    try:
        with grpc.insecure_channel(detseg.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            assert stub.Segment(request_for(image), timeout=120).instances
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(stub.Segment, request_for(image), timeout=60) for _ in range(4)]
                time.sleep(0.05)
                server.kill()  # a crash, mid-run (server and its stub processes)
                for f in in_flight:  # each either finished before the crash or failed UNAVAILABLE
                    try:
                        f.result()
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.UNAVAILABLE
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Segment(request_for(image), timeout=60)
            failed_in = time.monotonic() - start
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and failed_in < 5
            assert "unavailable" in info.value.details() and "/" not in info.value.details()
            not_serving_in = wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
            server.start()  # same ports: detseg reconnects by itself
            server.wait_ready(180)
            serving_in = wait_health(channel, health_pb2.HealthCheckResponse.SERVING, 30)
            assert stub.Segment(request_for(image), timeout=120).instances
    finally:
        detseg.stop()
        server.stop()
    figures["Triton crash"] = (
        f"request failed UNAVAILABLE in {failed_in:.2f}s (deadline 60 s); health NOT_SERVING after "
        f"{not_serving_in:.2f}s; SERVING {serving_in:.2f}s after Triton was ready again"
    )


def test_full_triton_queue_answers_resource_exhausted(repository, demo_settings, tmp_path, figures):
    repo = tmp_path / "repo"
    shutil.copytree(repository[0], repo)
    defaults = triton_repo.RepositoryOptions.from_settings(demo_settings)
    tight = dataclasses.replace(defaults, max_queue_size=1, max_batch_size=1)
    config = triton_repo.parse_config(repo / "detector" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items() if k.startswith("detseg_")}
    onnx_path = repo / "detector" / "1" / "model.onnx"
    (repo / "detector" / "config.pbtxt").write_text(
        triton_repo.config_text(triton_repo.build_config("detector", onnx_path, params, tight, native=False))
    )
    server = start_triton(repo, tmp_path / "state")
    detseg = start_detseg(demo_settings.replace(backend="triton", triton_url=server.url))
    images = [s.image for s in scenes("test", 16, start=40)]
    try:
        with grpc.insecure_channel(detseg.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)

            def call(image: np.ndarray) -> str:
                try:
                    stub.Segment(request_for(image), timeout=120)
                    return "OK"
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert "queue" in e.details() and "retry" in e.details()
                    return e.code().name

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(call, images))
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
            assert stub.Segment(request_for(images[0]), timeout=120).instances  # still serving
    finally:
        detseg.stop()
        server.stop()
    figures["Triton queue of 1, 16 concurrent requests"] = (
        f"{codes.count('OK')} OK, {codes.count('RESOURCE_EXHAUSTED')} RESOURCE_EXHAUSTED"
    )
