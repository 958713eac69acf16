"""Open vocabulary on a real tritonserver: the class embeddings are a detector input, so every request brings its
own vocabulary (texts through the ``text_encoder`` model, exemplars through ``visual_prompt_encoder``) with no
re-export and no reload, and requests with different vocabularies may share one dynamic batch.

Seeded random-init YOLOE-11n ("test-open" profile): the answers are compared with the embedded (torch) server's
on the same requests; they carry no meaning (see test_open_vocabulary.py for what the weights are).
"""

from __future__ import annotations

import concurrent.futures
import shutil

import grpc
import pytest
import tritonclient.grpc as grpcclient

from service.models import triton_repo
from service.models.profiles import resolve_models
from service.models.roles import Role, graph_roles
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ultralytics_asset
from tests.helpers import assert_same_instances, encode, synthetic_rgb
from tests.integration.test_open_vocabulary import CONF, IOU, MAX_DET, mixed_prompt_requests
from tests.triton_helpers import start_detseg, start_triton

pytestmark = [pytest.mark.triton, pytest.mark.slow]  # starts a real tritonserver


def repository_for(settings, tmp_path_factory):
    """The ONNX runner's export of ``settings``' models (made once per weights) as a Triton repository."""
    models = resolve_models(settings)
    export = triton_repo.export_cache(models, settings)
    triton_repo.ensure_repository(models, settings, export)
    repo = tmp_path_factory.mktemp("open_repository")
    shutil.copytree(export, repo, dirs_exist_ok=True)
    return repo


@pytest.fixture(scope="module")
def open_repository(open_settings, tmp_path_factory):
    return repository_for(open_settings, tmp_path_factory)


@pytest.fixture(scope="module")
def open_triton(open_repository, tmp_path_factory):
    server = start_triton(open_repository, tmp_path_factory.mktemp("triton-state"), models=graph_roles(True, True))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton_open_stub(open_triton, settings):
    s = settings.replace(models="test-open", backend="triton", triton_url=open_triton.url)
    srv = start_detseg(s)
    with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)
    srv.stop()


def test_the_repository_takes_class_embeddings_with_a_dynamic_class_count(open_repository):
    roles = graph_roles(True, True)
    configs = {role: triton_repo.parse_config(open_repository / role / "config.pbtxt") for role in roles}
    (embeddings,) = [i for i in configs[Role.DETECTOR].input if i.name == "class_embeddings"]
    assert list(embeddings.dims) == [-1, 512]  # (batch,) classes, width: any vocabulary size
    assert configs[Role.DETECTOR].output[0].dims[0] == -1  # 4 + classes
    assert configs[Role.TEXT_ENCODER].max_batch_size == 0  # one request's texts, not a batch of requests
    params = configs[Role.TEXT_ENCODER].parameters
    assert params["detseg_text_model"].string_value == "minilm-512:seed0"
    assert params["detseg_tokenizer"].string_value == "all-MiniLM-L6-v2"


def test_triton_answers_texts_and_exemplars_as_the_embedded_path(triton_open_stub, open_stub, figures):
    stats: dict = {}
    for request in mixed_prompt_requests():
        embedded = open_stub.Segment(request, timeout=300)
        remote = triton_open_stub.Segment(request, timeout=300)
        assert [(i.label, i.source) for i in remote.instances] == [(i.label, i.source) for i in embedded.instances]
        assert_same_instances(embedded, remote, stats)
    assert stats["n"] >= 10 and remote.provenance.backend == "triton"
    figures["open vocabulary Triton vs embedded (4 requests: texts, exemplars, mixed)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, max score |diff| {stats['score']:.2g}, "
        f"min mask IoU {stats['iou']:.4f}"
    )


def _stats(server) -> dict[str, int]:
    """Per-model (successful inferences, executions) on Triton, and the models' versions."""
    with grpcclient.InferenceServerClient(server.url) as client:
        out = {}
        for role in graph_roles(True, True):
            (s,) = client.get_inference_statistics(role, as_json=True)["model_stats"]
            out[role] = (int(s["inference_stats"]["success"].get("count", 0)), s["version"])
        return out


def test_different_vocabularies_at_the_same_time_each_get_their_own_labels(
    triton_open_stub, open_stub, open_triton, open_repository
):
    vocabularies = [("cat", "lamp"), ("bicycle",), ("green star", "bicycle", "kettle"), ("window", "person")]
    images = [encode(synthetic_rgb(480, 640, seed=31)), ultralytics_asset("bus.jpg").read_bytes()]
    jobs = [(image, v) for image in images for v in vocabularies]
    graphs = {p: p.stat().st_mtime_ns for p in open_repository.rglob("model.onnx")}
    before = _stats(open_triton)

    def ask(stub, job):
        image, vocabulary = job
        options = pb.SegmentOptions(score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET)
        return stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image), texts=vocabulary, options=options), 300)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(triton_open_stub, job), jobs))
    after = _stats(open_triton)
    labelled = 0
    for job, answer in zip(jobs, together, strict=True):
        assert {i.label for i in answer.instances} <= set(job[1])
        labelled += len(answer.instances)
        assert_same_instances(ask(open_stub, job), answer, {})
    assert labelled >= 10
    # No reload, no re-export: the same graphs, the same model versions, and the detector ran for these requests.
    assert {p: p.stat().st_mtime_ns for p in open_repository.rglob("model.onnx")} == graphs
    assert {r: v for r, (_, v) in after.items()} == {r: v for r, (_, v) in before.items()}
    assert after[Role.DETECTOR][0] - before[Role.DETECTOR][0] >= len(images)
    assert after[Role.TEXT_ENCODER][0] > before[Role.TEXT_ENCODER][0]


def test_yolo_world_on_triton_answers_concurrent_vocabularies_as_the_embedded_path(
    world, open_settings, tmp_path_factory, figures
):
    """YOLO-World takes texts only: its repository has no visual-prompt encoder, and Triton serves it with four
    models; requests with different vocabularies at once get the embedded server's answers."""
    path, stubs = world
    s = open_settings.replace(detector=str(path))
    repo = repository_for(s, tmp_path_factory)
    assert not (repo / Role.VISUAL_PROMPT_ENCODER).exists()
    server = start_triton(repo, tmp_path_factory.mktemp("world-triton-state"), models=graph_roles(True, False))
    try:
        srv = start_detseg(s.replace(backend="triton", triton_url=server.url))
        try:
            with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                remote = pb_grpc.SegmentationServiceStub(ch)
                vocabularies = [("red double-decker bus", "person", "shoe"), ("bus",), ("person", "kettle")]
                image = ultralytics_asset("bus.jpg").read_bytes()
                options = pb.SegmentOptions(score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET)

                def request(vocabulary):
                    return pb.SegmentRequest(image=pb.Image(encoded=image), texts=vocabulary, options=options)

                with concurrent.futures.ThreadPoolExecutor(len(vocabularies)) as pool:
                    answers = list(pool.map(lambda v: remote.Segment(request(v), timeout=300), vocabularies))
                stats: dict = {}
                for vocabulary, answer in zip(vocabularies, answers, strict=True):
                    embedded = stubs["torch"].Segment(request(vocabulary), timeout=300)
                    assert [i.label for i in answer.instances] == [i.label for i in embedded.instances]
                    assert_same_instances(embedded, answer, stats)
        finally:
            srv.stop()
    finally:
        server.stop()
    assert stats["n"] >= 10
    figures["YOLO-World Triton vs embedded (3 concurrent vocabularies)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, min mask IoU {stats['iou']:.4f}"
    )
