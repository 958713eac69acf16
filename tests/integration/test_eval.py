"""detseg eval against the demo server: figures equal pycocotools' own, mislabels move only their class, slices
partition the images, the simulated annotator is deterministic, and the report is written."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.client import Client
from service.evaluation.dataset import load_dataset
from service.evaluation.metrics import coco_results, evaluate
from service.evaluation.noc import annotate, interior_point
from service.evaluation.predict import Predicted, Prompt, predict
from service.evaluation.run import run_eval
from service.shapes.dataset import write_coco_dataset

IMAGES = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(write_coco_dataset(tmp_path_factory.mktemp("eval-data"), "test", IMAGES))


@pytest.fixture(scope="module")
def client(demo_server):
    with Client(demo_server.target) as c:
        yield c


@pytest.fixture(scope="module")
def predictions(client, dataset):
    return predict(client, dataset, Prompt.CLASSES, score_threshold=0.05)


def _cocoeval(dataset, results, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset.coco
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes(results), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_the_report_and_its_figures_equal_cocoeval_on_the_same_predictions(client, dataset, tmp_path, figures):
    out = tmp_path / "report"
    result = run_eval(client, dataset, out, noc_instances=6)
    saved = json.loads((out / "predictions.json").read_text())
    segm = _cocoeval(dataset, [{k: v for k, v in r.items() if k != "bbox"} for r in saved], "segm")
    bbox = _cocoeval(dataset, [{k: v for k, v in r.items() if k != "segmentation"} for r in saved], "bbox")
    assert (result["mask_ap"], result["mask_ap50"]) == (segm[0], segm[1])
    assert (result["box_ap"], result["box_ap50"]) == (bbox[0], bbox[1])
    assert result["mask_ap50"] > 0.8 and result["overall"]["recall"] > 0.8
    for name in ("report.html", "report.md", "figures.json", "class_iou.png", "slice_iou.png", "iou_histogram.png",
                 "pr_curves.png", "noc_curve.png", "review_tradeoff.png"):  # fmt: skip
        assert (out / name).stat().st_size > 500, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "NoC@85" in page
    figures[f"detseg eval, demo, {IMAGES} test scenes: mask AP / AP50, box AP50"] = (
        f"{result['mask_ap']:.3f} / {result['mask_ap50']:.3f}, {result['box_ap50']:.3f}"
    )


def test_a_mislabeled_prediction_lowers_exactly_its_class(dataset, predictions):
    base = evaluate(dataset, predictions, 0.25)
    # relabel the best circle detection of the first image that has one as "star"
    circle, star = dataset.category_id("circle"), dataset.category_id("star")
    changed, done = [], False
    for image in predictions:
        instances = list(image.instances)
        if not done:
            k = next((n for n, p in enumerate(instances) if p.category_id == circle and p.instance.score > 0.5), None)
            if k is not None:
                instances[k] = dataclasses.replace(instances[k], category_id=star)
                done = True
        changed.append(dataclasses.replace(image, instances=tuple(instances)))
    assert done
    after = evaluate(dataset, changed, 0.25)
    assert after["per_class"]["circle"]["recall"] < base["per_class"]["circle"]["recall"]
    assert after["ap50_per_class"]["circle"] < base["ap50_per_class"]["circle"]
    assert (
        after["per_class"]["star"]["false_positives_per_image"] > base["per_class"]["star"]["false_positives_per_image"]
    )
    for name in ("square", "triangle", "hexagon"):
        assert after["per_class"][name] == base["per_class"][name]
        assert after["ap50_per_class"][name] == base["ap50_per_class"][name]


def test_slices_partition_the_images_and_the_ground_truth(dataset, predictions):
    result = evaluate(dataset, predictions, 0.25)
    assert set(result["per_slice"]) == {"objects", "image_size"}
    for attribute, values in result["per_slice"].items():
        assert sum(v["images"] for v in values.values()) == IMAGES, attribute
        assert sum(v["ground_truth"] for v in values.values()) == result["overall"]["ground_truth"]
        assert sum(v["predictions"] for v in values.values()) == result["overall"]["predictions"]
    unknown = [dataclasses.replace(p, instances=(*p.instances, Predicted(p.instances[0].instance, None)))
               for p in predictions if p.instances]  # fmt: skip
    assert len(coco_results(dataset, unknown)) == len(coco_results(dataset, predictions))  # unknown labels ignored


def test_the_simulated_annotator_is_deterministic_and_a_perfect_mask_takes_one_click(client, dataset):
    from pycocotools import mask as mask_utils

    from service.client import Point, Region
    from service.evaluation.metrics import dataset_rle

    image = dataset.images[0]
    handle = client.encode_image(image.path)
    annotation = dataset.annotations(image.id)[0]
    gt = mask_utils.decode(dataset_rle(annotation, dataset)).astype(bool)
    first, second = annotate(client, handle, gt, 1), annotate(client, handle, gt, 1)
    assert first == second and len(first.clicks) >= 1 and first.clicks[0].positive
    perfect = 0
    for a in dataset.annotations(image.id):
        # a ground truth equal to SAM's own answer to the annotator's first click on it: iterate mask -> click at
        # its interior point -> mask until it stops changing (a few steps on these shapes)
        target = mask_utils.decode(dataset_rle(a, dataset)).astype(bool)
        for _ in range(6):
            x, y = interior_point(target)
            answer = client.segment(handle, regions=[Region(points=(Point(x + 0.5, y + 0.5),))], multimask=True)
            found = answer.instances[0].mask
            if np.array_equal(found, target):
                effort = annotate(client, handle, target, a["id"])
                assert effort.ious[0] == 1.0 and effort.noc(0.85) == 1 and effort.noc(0.90) == 1
                perfect += 1
                break
            target = found
    assert perfect >= 1


def test_clicks_reduce_the_error_on_average(client, dataset, figures):
    """The simulated annotator through the service on the demo: clicks help, monotonically over the first
    three, and no later click falls more than 0.01 below the first. Measured with the shipped segmenter (tuned on
    error-driven click sequences, SHAPES_SAM2.md): it rises to ~0.88 by click 3-4 and then holds ~0.86;
    the 2.4 M-parameter SAM 2 decodes 64x64 logits and the API sends clicks without the previous mask."""
    from service.evaluation.run import effort

    efforts = effort(client, dataset, 30)
    curve = np.mean([[e.ious[min(n, len(e.ious) - 1)] for n in range(8)] for e in efforts], axis=0)
    figures["demo annotator, 30 instances: mean IoU after clicks 1..8"] = " ".join(f"{v:.3f}" for v in curve)
    assert all(b >= a - 0.002 for a, b in itertools.pairwise(curve[:3])), curve
    assert curve[2] > curve[0] + 0.02 and min(curve[1:]) >= curve[0] - 0.01, curve


def test_the_cli_evaluates_with_an_in_process_server(dataset, tmp_path):
    annotations = next(Path(p.path).parents[1] for p in dataset.images[:1]) / "instances.json"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", str(annotations), "--models", "demo", "--offline", "--limit", "3",
         "--noc-instances", "2", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 images: mask AP" in result.stdout and (tmp_path / "r" / "report.html").exists()
    # every figure of the summary as the report rounds it (recall and NoC were printed to 16 digits)
    summary = result.stdout.splitlines()[0]
    assert re.fullmatch(
        r"3 images: mask AP \d\.\d{3} AP50 \d\.\d{3}, box AP \d\.\d{3} AP50 \d\.\d{3}; recall \d\.\d{3}, "
        r"mean mask IoU (\d\.\d{3}|–), FP/image \d+\.\d{2}; NoC@85 \d+\.\d, NoC@90 \d+\.\d",
        summary,
    ), summary


def _copy(dataset, root, transpose=()):
    """The dataset's images and JSON under ``root``; the images whose ids are in ``transpose`` stored transposed
    (what a photo's EXIF rotation does to the size the server reads)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for image in dataset.images:
        pixels = Image.open(image.path)
        if image.id in transpose:
            pixels = pixels.transpose(Image.Transpose.TRANSPOSE)
        pixels.save(root / image.file_name)
    (root / "instances.json").write_text(json.dumps(dataset.coco))
    return root / "instances.json"


def test_an_image_read_at_another_size_fails_with_why_and_is_not_scored(demo_server, dataset, tmp_path):
    """Its masks could match nothing (before: figures computed on them silently, then a numpy broadcast error in
    the simulated annotator): it counts as empty, the CLI says which and exits 1, the report lists it."""
    small = dataset.limit(3)
    odd = small.images[0]
    annotations = _copy(small, tmp_path / "data", transpose={odd.id})
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", str(annotations), "--target", demo_server.target,
         "--noc-instances", "4", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"1 of 3 images failed and count as empty (the report lists them; first: {odd.file_name}: the image " \
        f"is {odd.height}x{odd.width} as the server reads it" in result.stderr  # fmt: skip
    figures = json.loads((tmp_path / "r" / "figures.json").read_text())
    assert [f["image_id"] for f in figures["failed_images"]] == [odd.id]
    assert figures["noc"]["instances"] == 4  # clicked on the other images' instances only
    assert f"| {odd.file_name} | {odd.id} | the image is" in (tmp_path / "r" / "report.md").read_text()


def test_a_refused_request_is_listed_with_the_servers_message(client, dataset, tmp_path):
    """An image the server cannot decode is refused (INVALID_ARGUMENT): it counts as an empty image and the figures
    say so (before: it counted as an empty image without a word)."""
    small = dataset.limit(2)
    annotations = _copy(small, tmp_path / "data")
    (tmp_path / "data" / small.images[0].file_name).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    figures = run_eval(client, load_dataset(annotations), tmp_path / "r", prompt=Prompt.BOXES, noc_instances=0)
    [failed] = figures["failed_images"]
    assert failed["image_id"] == small.images[0].id
    assert failed["error"].startswith("INVALID_ARGUMENT: image.encoded")
    assert "1 image(s) failed" in (tmp_path / "r" / "report.md").read_text()


def test_boxes_prompt_sends_what_the_server_takes_and_no_request_for_an_image_without_ground_truth(client, dataset):
    """`--prompt boxes`: a box of width 0, or drawn half a pixel past the image's edge (both loadable COCO), failed
    the whole image's request (each instance then missed); an image without ground truth was sent with no regions,
    so the detector ran and its answers counted as false positives."""
    small = dataset.limit(3)
    coco = json.loads(json.dumps(small.coco))
    first, second, empty = small.images
    [a, b, *_] = [x for x in coco["annotations"] if x["image_id"] == first.id]
    a["bbox"][2] = 0
    b["bbox"][2] = first.width - b["bbox"][0] + 0.5
    coco["annotations"] = [x for x in coco["annotations"] if x["image_id"] != empty.id]
    edited = dataclasses.replace(small, coco=coco)
    predictions = predict(client, edited, Prompt.BOXES)
    assert [p.error for p in predictions] == [None] * 3
    answered = {p.image_id: p.instances for p in predictions}
    assert len(answered[first.id]) == len(edited.annotations(first.id)) - 1  # all but the empty box
    assert len(answered[second.id]) == len(edited.annotations(second.id))
    assert answered[empty.id] == ()
    assert all(p.instance.source == "region_prompt" for p in answered[first.id] + answered[second.id])


def test_texts_prompt_leaves_out_a_category_the_server_cannot_match(client, dataset, tmp_path):
    """`--prompt texts` sent every category name as a text: one the detector's classes cannot match ("dog") was
    INVALID_ARGUMENT for every image (mask AP 0, every image failed); it is left out and counts as missed, as with
    `--prompt classes`. ``classes_not_asked`` listed the detector's unknown classes whatever the prompt (``boxes``
    asks every category)."""
    small = dataset.limit(2)
    coco = {**small.coco, "categories": [*small.coco["categories"], {"id": 99, "name": "dog"}]}
    more = dataclasses.replace(small, coco=coco, categories={**small.categories, 99: "dog"})
    texts = run_eval(client, more, tmp_path / "t", prompt=Prompt.TEXTS, noc_instances=0)
    assert texts["failed_images"] == [] and texts["classes_not_asked"] == ["dog"]
    assert texts["mask_ap50"] > 0.5
    boxes = run_eval(client, more, tmp_path / "b", prompt=Prompt.BOXES, noc_instances=0)
    assert boxes["classes_not_asked"] == [] and boxes["failed_images"] == []
