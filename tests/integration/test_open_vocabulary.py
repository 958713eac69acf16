"""An open-vocabulary detector (seeded random-init YOLOE-11n): the vocabulary comes with each request.

Its class text features come from all-MiniLM-L6-v2 through a fixed projection to 512 (the "minilm-512:seed0"
text encoder the checkpoint names). Random weights: boxes mean nothing, so these tests check that every request
gets answers for its own vocabulary, as ultralytics' own YOLOE predictor gives them on the same weights and
features, also when requests with different vocabularies run at the same time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import grpc
import numpy as np
import pytest
import torch

from service.models import testing
from service.models.text import ClassTextEncoder, SentenceEncoder
from service.proto.detseg.v1 import detseg_pb2 as pb
from tests.conftest import DEVICE, serving, ultralytics_asset
from tests.helpers import assert_same_instances, encode, load_rgb, synthetic_rgb

pytestmark = pytest.mark.slow  # its own server with a YOLOE detector

CONF, IOU, MAX_DET = 0.4, 0.7, 30


def _request(data: bytes, texts=(), classes=(), **options) -> pb.SegmentRequest:
    opts = pb.SegmentOptions(score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET, **options)
    return pb.SegmentRequest(image=pb.Image(encoded=data), texts=list(texts), classes=list(classes), options=opts)


def _answer(response: pb.SegmentResponse) -> list[tuple]:
    return [(i.label, round(i.score, 4), round(i.box.x_min, 1), round(i.box.y_max, 1)) for i in response.instances]


def _reference_text_predict(path, vocabulary: tuple[str, ...], rgb: np.ndarray, features=None):
    """ultralytics' own YOLOE prediction after ``set_classes`` with the same weights and text features ((1, N, D);
    default: the test profile's MiniLM ones)."""
    from ultralytics import YOLOE

    if features is None:
        features = ClassTextEncoder.for_detector("minilm-512:seed0", SentenceEncoder.load()).encode(vocabulary)
        features = torch.from_numpy(features)[None]
    reference_model = YOLOE(str(path))
    head = reference_model.model.model[-1]
    with torch.no_grad():
        embeddings = head.get_tpe(features.to(next(head.parameters()).dtype))
    reference_model.set_classes(list(vocabulary), embeddings.float())
    return _per_class_reference(reference_model, rgb, vocabulary)


def _per_class_reference(reference_model, rgb: np.ndarray, vocabulary: tuple[str, ...]):
    """ultralytics' own preprocessing and forward pass (its predictor, set up by a ``predict`` call), then
    ultralytics' NMS on each class's scores alone, merged highest score first: detseg answers each prompt as that
    prompt alone (one box may answer several), where ``predict`` keeps each box's best class only."""
    from ultralytics.engine.results import Results
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    reference_model.predict(
        bgr, imgsz=640, conf=CONF, iou=IOU, max_det=MAX_DET, rect=False, device=DEVICE, verbose=False
    )  # fmt: skip
    predictor = reference_model.predictor
    with torch.no_grad():
        batch = predictor.preprocess([bgr])
        raw = predictor.inference(batch)
    while isinstance(raw, list | tuple):  # (predictions, extras) for some heads
        raw = raw[0]
    raw = raw.float().cpu()
    rows = []
    for k in range(len(vocabulary)):
        (det,) = non_max_suppression(raw[:, [0, 1, 2, 3, 4 + k]], CONF, IOU, max_det=MAX_DET)
        det[:, 5] = k
        rows.append(det)
    det = torch.cat(rows)
    det = det[det[:, 4].argsort(descending=True, stable=True)]
    det[:, :4] = scale_boxes(batch.shape[2:], det[:, :4], bgr.shape[:2])
    return Results(bgr, path="", names=dict(enumerate(vocabulary)), boxes=det)


def _assert_same_as_reference(response, reference, vocabulary, figures, figure: str) -> None:
    labels = [vocabulary[c] for c in reference.boxes.cls.int().tolist()]
    assert sorted(i.label for i in response.instances) == sorted(labels)
    assert all(
        i.source == pb.INSTANCE_SOURCE_TEXT and i.text_match.kind == pb.TEXT_MATCH_KIND_OPEN for i in response.instances
    )
    _assert_same_boxes_and_scores(response, reference, 3, figures, figure, labels)


@pytest.mark.parametrize("vocabulary", [("red double-decker bus", "person", "shoe"), ("window",)])
def test_boxes_match_ultralytics_yoloe_predict_on_the_same_weights_and_features(
    open_stub, settings, figures, vocabulary
):
    path = testing.make_test_open_detector(settings.cache_dir / "test-models")
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    reference = _reference_text_predict(path, vocabulary, rgb)
    response = open_stub.Segment(_request(encode(rgb), texts=vocabulary), timeout=300)
    figure = f"open vocabulary parity vs YOLOE.predict ({len(vocabulary)} texts): boxes, max |Δ| px"
    _assert_same_as_reference(response, reference, vocabulary, figures, figure)


def test_a_yoloe_segmentation_checkpoint_serves_its_boxes_and_classes(open_settings, figures):
    """The segmentation variant (official YOLOE checkpoints are ``-seg``): its head's mask coefficients are
    dropped (SAM 2 makes the masks); boxes and scores as ultralytics' own predict on the same weights."""
    path = testing.make_test_open_detector(open_settings.cache_dir / "test-models", architecture="yoloe-11n-seg.yaml")
    vocabulary = ("person", "bus")
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    with serving(open_settings.replace(detector=str(path))) as stub:
        response = stub.Segment(_request(encode(rgb), texts=vocabulary), timeout=300)
        (detector,) = [m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.role == 1]
    assert detector.name == path.name and detector.open_vocabulary
    reference = _reference_text_predict(path, vocabulary, rgb)
    figure = "open vocabulary parity vs YOLOE.predict (YOLOE-11n-seg, 2 texts): boxes, max |Δ| px"
    _assert_same_as_reference(response, reference, vocabulary, figures, figure)


def _assert_same_boxes_and_scores(response, reference, at_least: int, figures, figure: str, labels=None) -> None:
    """Our instances vs an ultralytics Results: as many, each reference row matched to our nearest box of its label
    (``labels``: the rows' labels; None: any), scores within 2e-3, boxes within 1 px; ours highest score first
    (rows whose scores are within float noise may come in either order)."""
    ref_boxes = reference.boxes.xyxy.cpu().numpy()
    ref_scores = reference.boxes.conf.cpu().numpy()
    ours = np.array([[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in response.instances]).reshape(-1, 4)
    assert len(ref_boxes) >= at_least and len(ours) == len(ref_boxes)
    assert [i.score for i in response.instances] == sorted((i.score for i in response.instances), reverse=True)
    free = list(range(len(ours)))
    deviation = 0.0
    for k, (box, score) in enumerate(zip(ref_boxes, ref_scores, strict=True)):
        mine = [j for j in free if labels is None or response.instances[j].label == labels[k]]
        j = min(mine, key=lambda j: float(np.abs(ours[j] - box).max()))
        free.remove(j)
        assert abs(response.instances[j].score - score) <= 2e-3
        deviation = max(deviation, float(np.abs(ours[j] - box).max()))
    figures[figure] = f"{len(ours)}, {deviation:.2e}"
    assert deviation <= 1.0


def test_requests_with_different_vocabularies_at_the_same_time_get_their_own_answers(open_stub, open_runner):
    data = encode(synthetic_rgb(480, 640, seed=11))
    vocabularies = [("cat", "lamp"), ("bicycle",), ("cat", "lamp"), ("green star", "bicycle", "kettle")]
    solo = [
        _answer(open_stub.Segment(_request(data, texts=v, refinement=pb.MaskRefinement(disabled=True)), timeout=300))
        for v in vocabularies
    ]
    open_stub.Segment(_request(encode(synthetic_rgb(64, 64, seed=12)), texts=["x"]), timeout=300)  # another image
    passes = open_runner.detect_batcher.batches
    fresh = encode(synthetic_rgb(480, 640, seed=13))  # not cached: every request runs the detector

    def ask(vocabulary):
        return open_stub.Segment(_request(fresh, texts=vocabulary), timeout=300)

    with concurrent.futures.ThreadPoolExecutor(len(vocabularies) * 2) as pool:
        together = list(pool.map(ask, vocabularies * 2))
    assert open_runner.detect_batcher.batches - passes >= 3  # three distinct vocabularies never share a pass
    alone = [_answer(ask(v)) for v in vocabularies]
    for vocabulary, answer, single in zip(vocabularies * 2, together, alone * 2, strict=True):
        assert {i.label for i in answer.instances} <= set(vocabulary)
        assert _answer(answer) == single
    assert solo  # the cached image answered too (its detector outputs are kept per vocabulary)


def test_the_cache_keeps_detector_outputs_per_vocabulary(open_stub, open_runner):
    data = encode(synthetic_rgb(200, 300, seed=14))
    before = open_runner.calls["detect"]
    first = open_stub.Segment(_request(data, texts=["cat"]), timeout=300)
    open_stub.Segment(_request(data, texts=["dog"]), timeout=300)
    again = open_stub.Segment(_request(data, texts=["cat"]), timeout=300)
    assert open_runner.calls["detect"] - before == 2
    assert _answer(again) == _answer(first)


def test_a_class_and_a_text_naming_the_same_thing_are_each_answered(open_stub):
    response = open_stub.Segment(
        _request(ultralytics_asset("bus.jpg").read_bytes(), classes=["window"], texts=["Window"]), timeout=300
    )
    by_class = [i for i in response.instances if i.source == pb.INSTANCE_SOURCE_DETECTOR]
    by_text = [i for i in response.instances if i.source == pb.INSTANCE_SOURCE_TEXT]
    assert by_class and len(by_class) == len(by_text)
    assert {i.label for i in by_class} == {"window"} and {i.text_match.text for i in by_text} == {"Window"}
    assert {i.label for i in by_text} == {"Window"}  # an open-vocabulary text's label is the text itself (proto)


def test_list_models_and_bad_requests(open_stub, open_runner):
    response = open_stub.ListModels(pb.ListModelsRequest(), timeout=30)
    (detector,) = [m for m in response.models if m.role == pb.MODEL_ROLE_DETECTOR]
    assert detector.open_vocabulary and detector.name == "test-yoloe-11n"
    assert pb.PROMPT_KIND_TEXTS in response.prompt_kinds
    calls = dict(open_runner.calls)
    for request, words in (
        (
            pb.SegmentRequest(image=pb.Image(encoded=encode(synthetic_rgb(32, 32)))),
            ["classes, texts", "open-vocabulary"],
        ),
        (_request(encode(synthetic_rgb(32, 32)), classes=["cat", " "]), ["classes[1]", "empty"]),
    ):
        with pytest.raises(grpc.RpcError) as err:
            open_stub.Segment(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(w in err.value.details() for w in words), err.value.details()
    assert {k: v for k, v in open_runner.calls.items() if k != "embed_classes"} == {
        k: v for k, v in calls.items() if k != "embed_classes"
    }


@pytest.fixture(scope="module")
def onnx_open_stub(open_settings):
    """The same models exported to ONNX (class embeddings as a detector input) and run with ONNX Runtime."""
    with serving(open_settings.replace(backend="onnx")) as stub:
        yield stub


def mixed_prompt_requests() -> list[pb.SegmentRequest]:
    """Texts, same-image and reference-image exemplars and mixes of them, on bus.jpg and zidane.jpg."""
    bus, zidane = (ultralytics_asset(n).read_bytes() for n in ("bus.jpg", "zidane.jpg"))
    options = pb.SegmentOptions(score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET)
    texts = ["red double-decker bus", "person", "shoe"]
    return [
        pb.SegmentRequest(image=pb.Image(encoded=bus), texts=texts, options=options),
        pb.SegmentRequest(image=pb.Image(encoded=zidane), texts=["window"], options=options),
        pb.SegmentRequest(image=pb.Image(encoded=bus), exemplars=[_exemplar()], options=options),
        pb.SegmentRequest(
            image=pb.Image(encoded=zidane), texts=["tie"], exemplars=[_exemplar(image=pb.Image(encoded=bus))],
            options=options,
        ),
    ]  # fmt: skip


def test_the_onnx_runner_answers_texts_and_exemplars_as_torch(open_stub, onnx_open_stub, figures):
    stats: dict = {}
    for request in mixed_prompt_requests():
        torch_answer = open_stub.Segment(request, timeout=300)
        onnx_answer = onnx_open_stub.Segment(request, timeout=300)
        assert [(i.label, i.source) for i in onnx_answer.instances] == [
            (i.label, i.source) for i in torch_answer.instances
        ]
        assert_same_instances(torch_answer, onnx_answer, stats)
    assert stats["n"] >= 10 and onnx_answer.provenance.backend == "onnx"
    figures["open vocabulary ONNX Runtime vs torch (4 requests: texts, exemplars, mixed)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, min mask IoU {stats['iou']:.4f}"
    )


BUS_PERSON = (221.0, 405.0, 344.0, 857.0)  # a person on bus.jpg, original pixels XYXY


def _exemplar(box=BUS_PERSON, label="pedestrian", image: pb.Image | None = None) -> pb.Exemplar:
    x0, y0, x1, y1 = box
    return pb.Exemplar(box=pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1), label=label, image=image)


def _reference_visual_predict(settings, target: np.ndarray, refer: np.ndarray | None):
    """ultralytics' own visual-prompt prediction on the same weights (one box, class 0)."""
    from ultralytics import YOLOE
    from ultralytics.models.yolo.yoloe import YOLOEVPDetectPredictor

    model = YOLOE(str(testing.make_test_open_detector(settings.cache_dir / "test-models")))
    prompts = {"bboxes": np.array([BUS_PERSON], np.float32), "cls": np.array([0])}
    extra = {} if refer is None else {"refer_image": np.ascontiguousarray(refer[..., ::-1])}
    return model.predict(
        np.ascontiguousarray(target[..., ::-1]), visual_prompts=prompts, predictor=YOLOEVPDetectPredictor,
        imgsz=640, conf=CONF, iou=IOU, max_det=MAX_DET, rect=False, agnostic_nms=False, device=DEVICE,
        verbose=False, **extra,
    )[0]  # fmt: skip


@pytest.mark.parametrize("where", ["same image", "reference image"])
def test_exemplars_match_ultralytics_visual_prompt_predict(open_stub, settings, figures, where):
    bus = load_rgb(ultralytics_asset("bus.jpg"))
    target = bus if where == "same image" else load_rgb(ultralytics_asset("zidane.jpg"))
    reference = _reference_visual_predict(settings, target, None if where == "same image" else bus)
    image = None if where == "same image" else pb.Image(encoded=encode(bus))
    response = open_stub.Segment(
        pb.SegmentRequest(
            image=pb.Image(encoded=encode(target)),
            exemplars=[_exemplar(image=image)],
            options=pb.SegmentOptions(score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET),
        ),
        timeout=300,
    )
    assert all(i.label == "pedestrian" and i.source == pb.INSTANCE_SOURCE_EXEMPLAR for i in response.instances)
    figure = f"exemplar parity vs YOLOE visual-prompt predict ({where}): boxes, max |Δ| px"
    _assert_same_boxes_and_scores(response, reference, 1, figures, figure)


def test_a_reference_image_by_handle_answers_as_its_bytes_and_mixes_with_texts(open_stub, open_runner):
    bus = ultralytics_asset("bus.jpg").read_bytes()
    target = ultralytics_asset("zidane.jpg").read_bytes()
    handle = open_stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=bus)), timeout=300).handle
    options = pb.SegmentOptions(score_threshold=0.3, max_instances=MAX_DET)
    answers = [
        open_stub.Segment(
            pb.SegmentRequest(
                image=pb.Image(encoded=target), texts=["tie"], exemplars=[_exemplar(image=image)], options=options
            ),
            timeout=300,
        )
        for image in (pb.Image(encoded=bus), pb.Image(handle=handle))
    ]
    assert _answer(answers[0]) == _answer(answers[1])
    calls = open_runner.calls["embed_exemplars"]
    open_stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=target), exemplars=[_exemplar(image=pb.Image(handle=handle))]),
        timeout=300,
    )
    assert open_runner.calls["embed_exemplars"] == calls  # the catalog photo's exemplar is embedded once
    sources = {(i.source, i.label) for i in answers[0].instances}
    assert sources <= {(pb.INSTANCE_SOURCE_TEXT, "tie"), (pb.INSTANCE_SOURCE_EXEMPLAR, "pedestrian")}
    assert any(s == pb.INSTANCE_SOURCE_EXEMPLAR for s, _ in sources)


def test_bad_exemplars_get_clear_errors_and_run_nothing(open_stub, open_runner, stub):
    target = encode(synthetic_rgb(120, 160, seed=21))
    small = pb.Image(encoded=encode(synthetic_rgb(50, 50, seed=22)))
    calls = {k: open_runner.calls[k] for k in ("detect", "encode", "decode", "embed_exemplars")}
    cases = (
        (_exemplar(image=small), grpc.StatusCode.INVALID_ARGUMENT, ["exemplars[0].box", "not within the 50x50 image"]),
        (_exemplar(box=(0, 0, 10, 10), image=pb.Image(handle="sha256:" + "1" * 64)), grpc.StatusCode.NOT_FOUND,
         ["exemplars[0].image.handle", "send the image again"]),
        (_exemplar(box=(10, 10, 5, 20)), grpc.StatusCode.INVALID_ARGUMENT, ["exemplars[0].box", "reversed"]),
    )  # fmt: skip
    for exemplar, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            open_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=target), exemplars=[exemplar]), timeout=60)
        assert err.value.code() == code and all(w in err.value.details() for w in words), err.value.details()
    assert {k: open_runner.calls[k] for k in calls} == calls
    with pytest.raises(grpc.RpcError) as err:  # the closed-vocabulary test server
        stub.Segment(
            pb.SegmentRequest(image=pb.Image(encoded=target), exemplars=[_exemplar(box=(1, 1, 9, 9))]), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "exemplars" in err.value.details()


def test_an_exemplar_box_too_small_to_embed_is_refused(open_stub, open_runner):
    """A box under one cell of the visual-prompt grid made an empty prompt mask: every such box, wherever it lay,
    got one constant embedding, and the request was answered with whatever that scored. Refused before any model
    runs (the detector stage found it, beside SAM's pre-processing and encoder: whether the encoder ran was a race)."""
    target = encode(synthetic_rgb(480, 640, seed=23))
    calls = dict(open_runner.calls)
    for box in ((300, 200, 304, 204), (1, 1, 5, 5)):
        with pytest.raises(grpc.RpcError) as err:
            open_stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=target), exemplars=[_exemplar(box=box)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exemplars[0].box: too small to embed on its 640x480 image" in err.value.details()
    assert dict(open_runner.calls) == calls
    answered = open_stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=target), exemplars=[_exemplar(box=(100, 100, 180, 160))])
    )
    assert answered.image.width == 640


def _reference_world_predict(path, vocabulary: tuple[str, ...], rgb: np.ndarray, features=None):
    """ultralytics' own YOLO-World prediction with the same weights and class embeddings (set as its
    ``set_classes`` sets them; that method itself would load CLIP). ``features``: (1, N, D) text features
    (default: the test profile's MiniLM ones)."""
    from ultralytics import YOLOWorld

    if features is None:
        features = ClassTextEncoder.for_detector("minilm-512:seed0", SentenceEncoder.load()).encode(vocabulary)
        features = torch.from_numpy(features)[None]
    reference_model = YOLOWorld(str(path))
    reference_model.model.txt_feats = torch.nn.functional.normalize(features, dim=-1)
    reference_model.model.model[-1].nc = len(vocabulary)
    reference_model.model.names = list(vocabulary)
    return _per_class_reference(reference_model, rgb, vocabulary)


def test_yolo_world_answers_concurrent_vocabularies_as_ultralytics_predicts_them(world, figures):
    path, stubs = world
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    vocabularies = [("red double-decker bus", "person", "shoe"), ("bus",), ("person", "kettle")]

    def ask(vocabulary):
        return stubs["torch"].Segment(_request(encode(rgb), texts=vocabulary), timeout=300)

    ask(("warm-up",))  # caches the image: the concurrent requests below differ only in their vocabularies
    with concurrent.futures.ThreadPoolExecutor(len(vocabularies)) as pool:
        answers = list(pool.map(ask, vocabularies))
    for vocabulary, response in zip(vocabularies, answers, strict=True):
        reference = _reference_world_predict(path, vocabulary, rgb)
        figure = f"YOLO-World parity vs ultralytics predict ({len(vocabulary)} texts, concurrent): boxes, max |Δ| px"
        _assert_same_as_reference(response, reference, vocabulary, figures, figure)


def test_yolo_world_exported_answers_as_torch_and_refuses_exemplars(world, figures):
    _, stubs = world
    stats: dict = {}
    requests = [r for r in mixed_prompt_requests() if not r.exemplars]
    for request in requests:
        torch_answer, onnx_answer = (stubs[b].Segment(request, timeout=300) for b in ("torch", "onnx"))
        assert [i.label for i in onnx_answer.instances] == [i.label for i in torch_answer.instances]
        assert_same_instances(torch_answer, onnx_answer, stats)
    figures["YOLO-World ONNX Runtime vs torch (2 requests)"] = (
        f"{stats['n']} instances, max box |diff| {stats['box']:.3g} px, min mask IoU {stats['iou']:.4f}"
    )
    for stub in stubs.values():
        kinds = stub.ListModels(pb.ListModelsRequest(), timeout=30).prompt_kinds
        assert pb.PROMPT_KIND_TEXTS in kinds and pb.PROMPT_KIND_EXEMPLARS not in kinds
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=encode(synthetic_rgb(64, 64))), exemplars=[
                _exemplar(box=(1, 1, 9, 9))]), timeout=60)  # fmt: skip
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "texts only (YOLO-World)" in err.value.details()


# OpenAI CLIP ViT-B/32's dimensions (YOLO-World's text model); MobileCLIP's architecture is not available offline.
VIT_B32 = dict(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
)  # fmt: skip


class _TextTower(torch.nn.Module):
    """A TorchScript text tower as MobileCLIP's files are: tokens → L2-normalised features."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.clip.encode_text(tokens), dim=-1)


@pytest.mark.parametrize(
    ("architecture", "text_model", "catalog_name"),
    [("yolov8n-worldv2.yaml", "clip:ViT-B/32", "clip_vit_b32"), ("yoloe-11n.yaml", "mobileclip:blt", "mobileclip_blt")],
)
def test_official_text_encoders_load_from_verified_torchscript_files(
    open_settings, tmp_path, monkeypatch, figures, architecture, text_model, catalog_name
):
    """Checkpoints naming the official text encoders: their TorchScript file comes from the catalog (sha256-checked,
    never downloaded here) and encodes the texts with CLIP's tokenizer. The file is a seeded OpenAI CLIP ViT-B/32
    (the whole model for "clip:ViT-B/32", as OpenAI publishes it; its text tower for "mobileclip:blt", standing in
    for MobileCLIP, whose architecture cannot be built offline). The boxes are ultralytics' own predict with the
    class embeddings that file gives."""
    from service.models import catalog
    from service.models.clip_text import clip_architecture, clip_tokenizer
    from service.provenance import file_sha256

    torch.manual_seed(0)
    clip = clip_architecture(**VIT_B32).eval()
    probe = clip_tokenizer()(["a photo"], 77)
    traced = (
        torch.jit.trace_module(clip, {"encode_text": probe})
        if text_model.startswith("clip")
        else torch.jit.trace(_TextTower(clip), probe)
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = catalog.CATALOG[catalog_name]
    weights = cache / entry.filename
    traced.save(str(weights))
    monkeypatch.setitem(
        catalog.CATALOG, catalog_name,
        dataclasses.replace(entry, sha256=file_sha256(weights), size_bytes=weights.stat().st_size),
    )  # fmt: skip
    path = testing.make_test_open_detector(
        open_settings.cache_dir / "test-models", architecture=architecture, text_model=text_model
    )
    s = open_settings.replace(detector=str(path), cache_dir=cache, offline=True)  # test models made anew there
    vocabulary = ("person", "bus", "shoe")
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    with serving(s) as stub:
        response = stub.Segment(_request(encode(rgb), texts=vocabulary), timeout=300)
    with torch.no_grad():
        tokens = clip_tokenizer()(list(vocabulary), 77)
        features = traced.encode_text(tokens) if text_model.startswith("clip") else traced(tokens)
        features = torch.nn.functional.normalize(features, dim=-1)[None]
    if "world" in architecture:
        reference = _reference_world_predict(path, vocabulary, rgb, features)
    else:
        reference = _reference_text_predict(path, vocabulary, rgb, features)
    figure = f"official text-encoder path ({text_model}, seeded ViT-B/32 TorchScript): boxes, max |Δ| px"
    _assert_same_as_reference(response, reference, vocabulary, figures, figure)


def test_an_exemplar_on_raw_pixels_is_embedded_per_size_not_per_bytes(open_stub, open_runner):
    """The same raw bytes declared 32x24 and then 24x32 are two images: the second exemplar reused the first's cached
    embedding (its key was the bytes' hash alone) and found what the first found. It now answers as the same pixels
    sent as a PNG do."""
    target = pb.Image(encoded=encode(synthetic_rgb(120, 160, seed=31)))
    data = synthetic_rgb(24, 32, seed=32).tobytes()
    tall = synthetic_rgb(24, 32, seed=32).reshape(32, 24, 3)  # the same bytes read as 24 wide, 32 high

    def found(image: pb.Image) -> list[tuple[float, ...]]:
        exemplar = pb.Exemplar(box=pb.BoundingBox(x_min=2, y_min=2, x_max=20, y_max=20), label="thing", image=image)
        request = pb.SegmentRequest(image=target, exemplars=[exemplar], options=pb.SegmentOptions(score_threshold=0.01))
        response = open_stub.Segment(request, timeout=120)
        return [(round(i.score, 4), i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max) for i in response.instances]

    wide = found(pb.Image(raw=pb.RawImage(data=data, width=32, height=24)))
    embedded = open_runner.calls["embed_exemplars"]
    as_tall = found(pb.Image(raw=pb.RawImage(data=data, width=24, height=32)))
    assert open_runner.calls["embed_exemplars"] == embedded + 1  # embedded anew, not the wide image's
    assert as_tall == found(pb.Image(encoded=encode(tall))) and as_tall != wide


def test_exemplar_labels_name_classes_as_class_names_do(open_stub):
    """Exemplar labels skipped the normalisation classes and texts get: "  x  " came back with its spaces, a blank
    label was a class named "   ", and "red_star" and "Red Star" were two classes of one exemplar each."""
    target = pb.Image(encoded=encode(synthetic_rgb(120, 160, seed=33)))

    def labels(*names: str) -> set[str]:
        exemplars = [_exemplar(box=(10 + 40 * k, 10, 45 + 40 * k, 50), label=n) for k, n in enumerate(names)]
        options = pb.SegmentOptions(score_threshold=0.01)
        response = open_stub.Segment(pb.SegmentRequest(image=target, exemplars=exemplars, options=options), timeout=120)
        return {i.label for i in response.instances}

    assert labels("  red_star ", "Red Star") == {"red_star"}  # one class, its first spelling, trimmed
    assert labels("", "Exemplar") == {"exemplar"}
    with pytest.raises(grpc.RpcError) as err:
        labels("thing", "   ")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("exemplars[1].label: blank"), err.value.details()


def test_a_track_starts_exemplar_by_an_unknown_handle_names_the_start_field(open_stub):
    """Every other start error names start.<field>; an exemplar image's unknown handle was NOT_FOUND naming
    exemplars[0].image.handle."""
    exemplar = _exemplar(box=(0, 0, 10, 10), image=pb.Image(handle="sha256:" + "2" * 64))
    with pytest.raises(grpc.RpcError) as err:
        list(open_stub.Track(iter([pb.TrackRequest(start=pb.TrackStart(exemplars=[exemplar]))]), timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("start.exemplars[0].image.handle: "), err.value.details()
