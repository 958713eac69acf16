"""The open-vocabulary demo profile ("demo-open": YOLOE-11n trained on the attribute shapes world with MiniLM
phrases + mini SAM 2) through the real gRPC server on held-out test scenes: free text with real semantics.

AP50 comes from pycocotools COCOeval over one category per phrase (``service.training.evaluate_open``); every
request carries a whole phrase group as its ``texts`` (YOLOE scores each class on its own, so one request with
all phrases answers as one request per phrase would, NMS being per text).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.client import RequestFailed
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.rich_status import violated_field
from service.shapes.attributes import attribute_scenes, render_attribute_scene
from service.training.evaluate_open import (
    FP_BOUND,
    SERVING_SCORE,
    Phrase,
    PhraseDetections,
    absent_false_positives,
    absent_false_positives_by_phrase,
    ap50_by_phrase,
    phrase_groups,
)
from tests.conftest import serving
from tests.helpers import encode, mask_iou, rle_mask

pytestmark = pytest.mark.slow  # 60 held-out scenes through the open demo models

SCENES = 60
SERVED = None  # a request without a score threshold: the profile's calibrated default (evaluate_open.SERVING_SCORE)
LOW_SCORE = 0.05  # AP requests: lower than serving, above the long tail (at most 300 instances a request)


@pytest.fixture(scope="module")
def open_demo_stub(settings):
    with serving(settings.replace(models="demo-open")) as stub:
        yield stub


@pytest.fixture(scope="module")
def held_out():
    return attribute_scenes("test", SCENES)


def _ask(stub, scene, texts, score: float | None, max_instances: int = 300) -> pb.SegmentResponse:
    """``score`` None: the request names no score threshold, the server's default applies."""
    options = pb.SegmentOptions(max_instances=max_instances)
    if score is not None:
        options.score_threshold = score
    request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), texts=list(texts), options=options)
    return stub.Segment(request, timeout=300)


_REFUSED: dict[str, bool] = {}  # text → the server refuses it (INVALID_ARGUMENT: its phrase reader cannot read it)


def _refused(stub, scene, text: str) -> bool:
    if text not in _REFUSED:
        try:
            _ask(stub, scene, [text], SERVED)
            _REFUSED[text] = False
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            _REFUSED[text] = True
    return _REFUSED[text]


def _detections(stub, scenes, phrases: list[Phrase], score: float | None) -> PhraseDetections:
    """Each phrase's answers on each scene; a phrase the server refuses finds nothing (as a client would have it)."""
    texts = [p.text for p in phrases if not _refused(stub, scenes[0], p.text)]
    boxes, scores = {}, {}
    for scene in scenes:
        response = _ask(stub, scene, texts, score)
        for text in (p.text for p in phrases):
            mine = [i for i in response.instances if i.text_match.text == text]
            boxes[scene.seed, text] = np.array(
                [[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in mine], np.float32
            ).reshape(-1, 4)
            scores[scene.seed, text] = np.array([i.score for i in mine], np.float32)
    return PhraseDetections(boxes, scores)


@pytest.fixture(scope="module")
def trained_and_held_out(open_demo_stub, held_out):
    groups = phrase_groups()
    phrases = groups["trained"] + groups["held_out"]
    return groups, _detections(open_demo_stub, held_out, phrases, LOW_SCORE)


def test_trained_and_held_out_phrases_reach_their_ap50_targets(trained_and_held_out, held_out, figures):
    groups, dets = trained_and_held_out
    trained, _ = ap50_by_phrase(held_out, groups["trained"], dets)
    unseen, per = ap50_by_phrase(held_out, groups["held_out"], dets)
    figures[f"demo-open AP50 through gRPC ({SCENES} test scenes): trained / held-out colour-shape"] = (
        f"{trained:.3f} / {unseen:.3f} ({', '.join(f'{k} {v:.2f}' for k, v in per.items())})"
    )
    assert trained >= 0.85
    assert unseen >= 0.5


def test_phrases_naming_absent_things_find_almost_nothing(open_demo_stub, held_out, figures):
    groups = phrase_groups()
    served = _detections(open_demo_stub, held_out[:30], groups["trained"], SERVED)
    fp = absent_false_positives(held_out[:30], groups["trained"], served)
    figures["demo-open false positives per request for an absent trained phrase (30 scenes)"] = (
        f"{fp['fp_per_request']:.3f} ({fp['false_positives']} in {fp['queries']} requests)"
    )
    assert fp["fp_per_request"] <= 0.1


def test_paraphrases_never_trained_on_are_read_into_the_trained_words(open_demo_stub, held_out, figures):
    """Issue 20 finding 13: the 40 evaluation paraphrases (``service.shapes.paraphrases``: colour, shape and size
    words and frames no training ever saw) through the server's phrase reader. Measured with evaluate_open on 300
    scenes: AP50 0.431 before the reader, 0.795 with it; absent-phrase false positives per request, worst phrase,
    0.433 before, 0.201 with it ("something round", then embedded as sent), 0.192 once what the reader cannot
    read is refused ("lavender circle", read as "purple circle"), 0.063 with the recoloured fine-tune at score 0.25
    (session 27: "three-sided shape", read as "triangle"; AP50 0.798). Each answer says what its text was read as."""
    groups = phrase_groups()
    phrases = groups["paraphrases"] + groups["held_out_paraphrases"]
    dets = _detections(open_demo_stub, held_out, phrases, LOW_SCORE)
    said, _ = ap50_by_phrase(held_out, groups["paraphrases"], dets)
    unseen, _ = ap50_by_phrase(held_out, groups["held_out_paraphrases"], dets)
    refused = sorted(p.text for p in phrases if _REFUSED[p.text])
    figures[f"demo-open paraphrase AP50 through gRPC ({SCENES} scenes): paraphrases / of held-out combinations"] = (
        f"{said:.3f} / {unseen:.3f}; refused: {len(refused)} ({', '.join(refused)})"
    )
    assert said >= 0.7 and unseen >= 0.7

    scene = _scenes_with(("blue", "star"), count=1)[0]
    read = _ask(open_demo_stub, scene, ["cerulean star"], SERVED)
    assert {i.text_match.read_as for i in read.instances} == {"blue star"}
    plain = _ask(open_demo_stub, scene, ["blue star"], SERVED).instances
    # answered as "blue star" alone is: the same boxes, scores within float error
    assert [i.box for i in read.instances] == [i.box for i in plain]
    assert [i.score for i in read.instances] == pytest.approx([i.score for i in plain], abs=1e-5)
    # A text's label and read_as are its own whatever else the request asks: with the class "Blue Star" (the same
    # entry) the text "blue star" was labelled "Blue Star" and read as "blue star"; alone, "blue star" and "".
    request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), classes=["Blue Star"], texts=["blue star"])
    mixed = open_demo_stub.Segment(request, timeout=300).instances
    texts = [i for i in mixed if i.source == pb.INSTANCE_SOURCE_TEXT]
    assert texts and {(i.label, i.text_match.read_as) for i in texts} == {("blue star", "")}
    assert {i.label for i in mixed if i.source == pb.INSTANCE_SOURCE_DETECTOR} == {"Blue Star"}


def test_every_absent_phrase_finds_almost_nothing_at_the_served_default(open_demo_stub, held_out, figures):
    """Issue 20 finding 13: at most FP_BOUND false positives per request for every absent paraphrase of the 40
    evaluation paraphrases, not only on average, each asked where it describes nothing, with no score threshold in
    the request. At the shared default 0.25 two missed (evaluate_open, 300 test scenes: "three-sided shape" 0.063,
    "four-cornered shape" 0.061); demo-open now answers at the threshold calibrated on validation scenes
    (``evaluate_open.calibrate``), which ListModels reports. The trained phrases and held-out combinations are
    reported beside them (the finding bounds the paraphrases; on 300 test scenes the worst trained phrase, "purple
    square", drew 0.072)."""
    models = open_demo_stub.ListModels(pb.ListModelsRequest(), timeout=60)
    assert models.defaults.score_threshold == pytest.approx(SERVING_SCORE)
    groups = phrase_groups()
    worst = {}
    for name in ("paraphrases", "trained", "held_out"):  # a request per group and scene (at most 64 texts a request)
        served = _detections(open_demo_stub, held_out, groups[name], SERVED)
        per = absent_false_positives_by_phrase(held_out, groups[name], served)
        worst[name] = max(per.items(), key=lambda kv: kv[1])
    figures[f"demo-open worst absent phrase, false positives per request at the served default ({SCENES} scenes)"] = (
        "; ".join(f"{name} {fp:.3f} ({text!r})" for name, (text, fp) in worst.items())
    )
    assert worst["paraphrases"][1] <= FP_BOUND, worst


def test_a_text_outside_the_phrase_grammar_is_refused_and_says_why(open_demo_stub):
    """Embedded as sent, "something round" found small yellow squares and hexagons at 0.67 (0.20 false positives
    per request where no circle is): a wrong answer, not an error. The server now refuses what its phrase reader
    cannot read, naming the field, the word and the grammar, before any detection; it keeps serving. The field is
    also in the status details (a google.rpc.BadRequest field violation) for programs, read by the client."""
    scene = _scenes_with(("blue", "star"), count=1)[0]
    for texts, field, why in (
        (["blue star", "something round"], "texts[1]", "not words of the grammar: 'round'"),
        (["pearl square"], "texts[0]", "'pearl'"),
        (["red or blue star"], "texts[0]", "two colours (blue, red)"),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            _ask(open_demo_stub, scene, texts, SERVED)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = raised.value.details()
        assert message.startswith(f"{field}: {texts[int(field[6])]!r} cannot be read"), message
        assert why in message and "shapes: circle, square, triangle, star, hexagon" in message, message
        assert violated_field(raised.value.trailing_metadata()) == field
    request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), classes=["circle", "a round thing"])
    with pytest.raises(grpc.RpcError) as raised:
        open_demo_stub.Segment(request, timeout=300)
    assert raised.value.details().startswith("classes[1]: 'a round thing' cannot be read")
    assert RequestFailed.from_rpc(raised.value).field == "classes[1]"
    assert _ask(open_demo_stub, scene, ["blue star"], SERVED).instances  # still serving


def test_labels_and_masks_end_to_end_on_trained_phrases(open_demo_stub, held_out, figures):
    """Each instance of a trained colour-shape, as the served answer to every trained phrase at the serving
    threshold: the best-overlapping returned instance (box IoU >= 0.5) must carry its phrase; its SAM 2 mask is
    compared with the ground truth."""
    texts = [p.text for p in phrase_groups()["trained"]]
    matched = correct = 0
    ious = []
    for scene in held_out[:30]:
        response = _ask(open_demo_stub, scene, texts, SERVED)
        for inst in scene.instances:
            want = f"{inst.colour} {inst.shape}"
            if want not in texts:
                continue
            best, best_iou = None, 0.5
            for r in sorted(response.instances, key=lambda r: -r.score):
                iou = _box_iou(inst.box, (r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max))
                if iou >= best_iou:
                    best, best_iou = r, iou
                    break
            if best is None:
                continue
            matched += 1
            if best.label == want:
                correct += 1
                ious.append(mask_iou(rle_mask(best.mask), inst.mask))
    accuracy, mean_iou = correct / max(matched, 1), float(np.mean(ious)) if ious else 0.0
    figures["demo-open end to end on trained phrases (30 scenes): label accuracy / mean mask IoU"] = (
        f"{accuracy:.3f} / {mean_iou:.3f} ({matched} matched instances)"
    )
    assert matched >= 50 and accuracy >= 0.9 and mean_iou >= 0.8


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_green_star_and_red_star_each_find_only_their_own(open_demo_stub, figures):
    """On the first 8 test scenes holding both (green star is a held-out combination, red star a trained one):
    each prompt answers with its own objects, hardly ever with the other's, and finds most of its own. Measured
    with the shipped model: 1 of 15 answers crossed (a "red star" answer on a small green star), so "only its own
    objects" holds on 7 of the 8 scenes; the bound below is 10 % of answers."""
    own = {"green star": [0, 0], "red star": [0, 0]}  # [found, present]
    answers = crossed = stray = 0
    for scene in _scenes_with(("green", "star"), ("red", "star"), count=8):
        for text, other in (("green star", "red star"), ("red star", "green star")):
            response = _ask(open_demo_stub, scene, [text], SERVED)
            boxes = [(r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max) for r in response.instances]
            mine = [i.box for i in scene.instances if i.colour_shape == text]
            theirs = [i.box for i in scene.instances if i.colour_shape == other]
            answers += len(boxes)
            crossed += sum(any(_box_iou(t, b) >= 0.5 for t in theirs) for b in boxes)
            stray += sum(not any(_box_iou(t, b) >= 0.5 for t in mine) for b in boxes)
            own[text][0] += sum(any(_box_iou(t, b) >= 0.5 for b in boxes) for t in mine)
            own[text][1] += len(mine)
    recall = {text: found / present for text, (found, present) in own.items()}
    figures["demo-open green star vs red star (8 scenes holding both): crossed / stray / answers; recall"] = (
        f"{crossed} / {stray} / {answers}; green {recall['green star']:.2f}, red {recall['red star']:.2f}"
    )
    assert crossed <= 0.1 * answers and stray <= 0.1 * answers
    assert recall["red star"] >= 0.9 and recall["green star"] >= 0.6


def _scenes_with(*combos: tuple[str, str], count: int) -> list:
    """The first ``count`` test scenes holding every (colour, shape) of ``combos``."""
    out = []
    for index in range(5000):
        scene = render_attribute_scene(12_000_000 + index)
        have = {(i.colour, i.shape) for i in scene.instances}
        if all(c in have for c in combos):
            out.append(scene)
            if len(out) == count:
                return out
    raise AssertionError(f"fewer than {count} test scenes hold {combos}")


def _exemplar_detections(stub, scenes, references=None) -> PhraseDetections:
    """One request per scene whose exemplars are the first instance of each colour-shape combination present,
    labelled with the combination's phrase (so held-out combinations are found by example, never by name): boxed
    on the scene itself, or with ``references`` on the first other reference scene holding the combination (sent
    as the exemplar's image), as ``evaluate_open.ServedOpenDetector.detect_exemplars`` does."""
    boxes, scores = {}, {}
    for scene in scenes:
        exemplars = []
        for text in dict.fromkeys(i.colour_shape for i in scene.instances):
            if references is None:
                source, image = scene, None
            else:
                source = next(r for r in references if r.seed != scene.seed and text in {
                    i.colour_shape for i in r.instances})  # fmt: skip
                image = pb.Image(encoded=encode(source.image))
            box = _box(next(i for i in source.instances if i.colour_shape == text).box)
            exemplars.append(pb.Exemplar(box=box, label=text, image=image))
        options = pb.SegmentOptions(score_threshold=LOW_SCORE, max_instances=300)
        request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), exemplars=exemplars, options=options)
        response = stub.Segment(request, timeout=300)
        assert all(i.source == pb.INSTANCE_SOURCE_EXEMPLAR for i in response.instances)
        for exemplar in exemplars:
            mine = [i for i in response.instances if i.label == exemplar.label]
            boxes[scene.seed, exemplar.label] = np.array(
                [[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in mine], np.float32
            ).reshape(-1, 4)
            scores[scene.seed, exemplar.label] = np.array([i.score for i in mine], np.float32)
    return PhraseDetections(boxes, scores)


def _box(xyxy) -> pb.BoundingBox:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def test_exemplars_find_more_of_the_same_colour_and_shape(open_demo_stub, held_out, figures):
    """The exemplar encoder (SAVPE, trained with everything else frozen): one box of a "red star" finds the red
    stars, large and small, and not the other stars or other red shapes; held-out combinations too."""
    groups = phrase_groups()
    dets = _exemplar_detections(open_demo_stub, held_out[:30])
    trained, _ = ap50_by_phrase(held_out[:30], groups["trained"], dets)
    unseen, _ = ap50_by_phrase(held_out[:30], groups["held_out"], dets)
    figures["demo-open exemplar AP50 through gRPC (30 test scenes): trained / held-out colour-shape"] = (
        f"{trained:.3f} / {unseen:.3f}"
    )
    assert trained >= 0.85 and unseen >= 0.5


def test_exemplars_boxed_on_another_image_find_their_kind(open_demo_stub, held_out, figures):
    """The catalog use: the exemplar is boxed on another scene. SAVPE was trained on same-image prompts only, so
    scores are lower (a held-out green star boxed elsewhere often scores below the serving threshold 0.25) but the
    ranking holds: measured with evaluate_open on 300 scenes, AP50 0.883 trained / 0.892 held-out."""
    groups = phrase_groups()
    dets = _exemplar_detections(open_demo_stub, held_out[:30], references=held_out)
    trained, _ = ap50_by_phrase(held_out[:30], groups["trained"], dets)
    unseen, _ = ap50_by_phrase(held_out[:30], groups["held_out"], dets)
    figures["demo-open reference-image exemplar AP50 through gRPC (30 test scenes): trained / held-out"] = (
        f"{trained:.3f} / {unseen:.3f}"
    )
    assert trained >= 0.75 and unseen >= 0.5


def test_the_open_demo_model_takes_class_names_texts_and_exemplars(open_demo_stub):
    """What `make serve` offline answers (profile "auto" falls back to demo-open): every prompt kind."""
    models = open_demo_stub.ListModels(pb.ListModelsRequest(), timeout=60)
    assert {pb.PROMPT_KIND_CLASSES, pb.PROMPT_KIND_TEXTS, pb.PROMPT_KIND_EXEMPLARS} <= set(models.prompt_kinds)
    scene = _scenes_with(("red", "star"), count=1)[0]
    image = pb.Image(encoded=encode(scene.image))
    response = open_demo_stub.Segment(pb.SegmentRequest(image=image, classes=["red star"]), timeout=120)
    assert response.instances and {i.label for i in response.instances} == {"red star"}
