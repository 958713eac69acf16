"""Export writers, checked by loading each format back with its own tools: pycocotools (COCO), ultralytics' dataset
loader (YOLO segmentation), datumaro's CVAT importer (CVAT for images 1.1), label-studio-sdk's brush decoder and
converter (Label Studio).

Masks are (H, W) bool at original resolution; boxes XYXY original-image pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service.labeling.exports import (
    label_studio_config,
    write_coco,
    write_cvat,
    write_label_studio,
    write_yolo_seg,
)
from service.labeling.records import LabeledImage, LabeledInstance

CATEGORIES = ("disc", "box", "blob")
# Polygon round trips (YOLO) rasterise with cv2.fillPoly; the shapes here are >= 40 px across.
MIN_POLYGON_IOU = 0.99


@dataclasses.dataclass(frozen=True)
class Sample:
    """Labeled images on disk: ``image_dir`` holds them under their ``file_name``; ``masks`` maps (file_name,
    instance index) → the (H, W) bool mask the instance's RLE was made from."""

    image_dir: Path
    images: tuple[LabeledImage, ...]
    masks: dict[tuple[str, int], np.ndarray]

    def expected(self, image: LabeledImage) -> list[tuple[LabeledInstance, np.ndarray]]:
        """The instances an export keeps (non-empty masks), in order, with their masks."""
        pairs = [(inst, self.masks[image.file_name, k]) for k, inst in enumerate(image.instances)]
        return [(inst, mask) for inst, mask in pairs if mask.any()]


def disc(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    return cv2.circle(np.zeros((h, w), np.uint8), (cx, cy), r, (1,), thickness=-1).astype(bool)


def rotated_rect(h: int, w: int, centre: tuple[float, float], size: tuple[float, float], angle: float) -> np.ndarray:
    corners = cv2.boxPoints((centre, size, angle)).round().astype(np.int32)
    return cv2.fillPoly(np.zeros((h, w), np.uint8), [corners], (1,)).astype(bool)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A drawn (H, W) bool mask and what the service would have said about it."""

    mask: np.ndarray
    label: str
    score: float
    needs_review: bool = False
    review_reasons: tuple[str, ...] = ()
    source: str = "detector"

    def instance(self) -> LabeledInstance:
        """The record: RLE is pycocotools' encoding of ``mask`` (str counts), box the mask's XYXY box."""
        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        ys, xs = np.nonzero(self.mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if len(xs) else (0.0,) * 4
        return LabeledInstance(
            self.label,
            self.score,
            box,
            {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            mask_score=0.9,
            source=self.source,
            needs_review=self.needs_review,
            review_reasons=self.review_reasons,
        )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """Three images: two shapes; a two-part mask, masks clipped by the border (a rotated rectangle in the bottom-right
    corner, an axis-aligned one in the top-left) and an empty one (in a subfolder, JPEG); none (a background image)."""
    image_dir = tmp_path_factory.mktemp("labeled")
    a, b = (120, 160), (150, 200)  # (H, W)
    contents: dict[str, tuple[tuple[int, int], list[Shape]]] = {
        "a.png": (
            a,
            [
                Shape(disc(*a, 50, 60, 25), "disc", 0.93),
                Shape(
                    rotated_rect(*a, (115, 60), (60, 30), 30),
                    "box",
                    0.71,
                    needs_review=True,
                    review_reasons=("low_mask_score", "small"),
                    source="region",
                ),
            ],
        ),
        "nested/b.jpg": (
            b,
            [
                Shape(disc(*b, 45, 50, 22) | disc(*b, 100, 55, 22), "blob", 0.88, source="text"),
                Shape(rotated_rect(*b, (185, 135), (70, 50), 20), "box", 0.64, needs_review=True),
                Shape(np.pad(np.ones((25, 60), bool), ((0, b[0] - 25), (0, b[1] - 60))), "box", 0.55),
                Shape(np.zeros(b, bool), "disc", 0.5),
            ],
        ),
        "c.png": ((64, 80), []),
    }
    images, masks = [], {}
    rng = np.random.default_rng(0)
    for name, ((h, w), shapes) in contents.items():
        path = image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        instances = tuple(shape.instance() for shape in shapes)
        masks.update({(name, k): shape.mask for k, shape in enumerate(shapes)})
        images.append(LabeledImage(name, w, h, hashlib.sha256(path.read_bytes()).hexdigest(), instances))
    return Sample(image_dir, tuple(images), masks)


def test_fixture_covers_the_cases_exports_must_handle(sample: Sample) -> None:
    """Several parts, a border-touching mask and an empty mask are really in the sample."""
    blob = sample.masks["nested/b.jpg", 0]
    assert cv2.connectedComponents(blob.astype(np.uint8))[0] - 1 == 2
    border = sample.masks["nested/b.jpg", 1]
    assert border[:, -1].any() and border[-1, :].any()
    assert sample.masks["nested/b.jpg", 2][0, 0]  # its box's first pixel is set: RLEs that start with a 0 run
    assert not sample.masks["nested/b.jpg", 3].any()
    assert min(m.sum() for m in sample.masks.values() if m.any()) > 1000


# --- COCO ----------------------------------------------------------------------------------------------------------


def test_coco_masks_boxes_and_extras_load_back_with_pycocotools(sample: Sample, tmp_path: Path) -> None:
    coco = COCO(str(write_coco(sample.images, CATEGORIES, tmp_path)))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "disc"), (2, "box"), (3, "blob")]
    coco_images = coco.loadImgs(coco.getImgIds())
    assert [(i["file_name"], i["width"], i["height"]) for i in coco_images] == [
        (image.file_name, image.width, image.height) for image in sample.images
    ]
    for coco_image, image in zip(coco_images, sample.images, strict=True):
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[coco_image["id"]])), key=lambda a: a["id"])
        expected = sample.expected(image)
        assert len(anns) == len(expected)  # the empty mask is left out
        for ann, (inst, mask) in zip(anns, expected, strict=True):
            assert coco.loadCats([ann["category_id"]])[0]["name"] == inst.label
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["area"] == mask.sum()
            x0, y0, x1, y1 = inst.box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert (ann["iscrowd"], ann["score"]) == (0, inst.score)
            assert ann["attributes"] == {
                "needs_review": inst.needs_review,
                "review_reasons": list(inst.review_reasons),
                "mask_score": inst.mask_score,
                "source": inst.source,
            }


def test_coco_file_scores_ap_one_against_itself_and_the_original_masks(sample: Sample, tmp_path: Path) -> None:
    gt = COCO(str(write_coco(sample.images, CATEGORIES, tmp_path)))
    own = copy.deepcopy(gt.dataset["annotations"])
    # Results made straight from the records (original masks, ids looked up by name in the file's categories).
    cat_id = {c["name"]: c["id"] for c in gt.dataset["categories"]}
    img_id = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    originals = [
        {
            "image_id": img_id[image.file_name],
            "category_id": cat_id[inst.label],
            "segmentation": dict(inst.rle),
            "score": inst.score,
        }
        for image in sample.images
        for inst, _ in sample.expected(image)
    ]
    for results in (own, originals):
        evaluation = COCOeval(gt, gt.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)  # AP @ IoU 0.50:0.95
        assert evaluation.stats[8] == pytest.approx(1.0)  # AR @ 100 detections


# --- YOLO segmentation ---------------------------------------------------------------------------------------------


def load_yolo(data_yaml: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """data.yaml → (its contents, one label dict per image as ultralytics' YOLODataset yields it before transforms)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG, YAML

    data = YAML.load(data_yaml)
    cfg: Any = get_cfg(DEFAULT_CFG, {"task": "segment", "imgsz": 224})
    dataset: Any = build_yolo_dataset(cfg, str(Path(data["path"]) / data["train"]), 1, data, mode="val")
    assert not dataset.augment
    return data, [dataset.get_image_and_label(i) for i in range(len(dataset))]


def test_yolo_seg_dataset_loads_back_with_ultralytics(sample: Sample, tmp_path: Path) -> None:
    from ultralytics.data.utils import polygon2mask

    out = tmp_path / "yolo"
    data_yaml = write_yolo_seg(sample.images, CATEGORIES, out, sample.image_dir)
    data, labels = load_yolo(data_yaml)
    assert data["names"] == {0: "disc", 1: "box", 2: "blob"}
    assert Path(str(data["path"])) == out.resolve()
    by_file = {Path(str(label["im_file"])).relative_to(out / "images").as_posix(): label for label in labels}
    assert sorted(by_file) == sorted(image.file_name for image in sample.images)
    ious = []
    for image in sample.images:
        label, expected = by_file[image.file_name], sample.expected(image)
        assert label["ori_shape"] == (image.height, image.width)
        assert label["cls"].ravel().tolist() == [CATEGORIES.index(inst.label) for inst, _ in expected]
        instances = label["instances"]
        instances.denormalize(image.width, image.height)
        assert len(instances.segments) == len(expected)  # one polygon per instance, the two-part mask included
        for segment, (_, mask) in zip(instances.segments, expected, strict=True):
            ious.append(iou(polygon2mask((image.height, image.width), [segment.ravel()]).astype(bool), mask))
        assert (out / "images" / image.file_name).is_symlink()
        assert (out / "images" / image.file_name).resolve() == (sample.image_dir / image.file_name).resolve()
    assert min(ious) >= MIN_POLYGON_IOU, ious


def test_yolo_label_lines_are_class_then_normalised_polygon(sample: Sample, tmp_path: Path) -> None:
    write_yolo_seg(sample.images, CATEGORIES, tmp_path, sample.image_dir, image_mode="copy")
    lines = (tmp_path / "labels" / "nested" / "b.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["2", "1", "1"]
    for line in lines:
        xy = np.array(line.split()[1:], float).reshape(-1, 2)
        assert len(xy) >= 3 and xy.min() >= 0 and xy.max() <= 1
    border = np.array(lines[1].split()[1:], float).reshape(-1, 2) * (200, 150)
    assert border[:, 0].max() == pytest.approx(199.5, abs=1e-3) and border[:, 1].max() == pytest.approx(149.5, abs=1e-3)
    assert (tmp_path / "labels" / "c.txt").read_text() == ""  # background image
    copied = tmp_path / "images" / "nested" / "b.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (sample.image_dir / "nested" / "b.jpg").read_bytes()


def test_yolo_rejects_images_that_would_share_a_label_file(sample: Sample, tmp_path: Path) -> None:
    a = sample.images[0]
    twin = dataclasses.replace(a, file_name="a.jpg")
    with pytest.raises(ValueError, match="share one YOLO label file"):
        write_yolo_seg([a, twin], CATEGORIES, tmp_path, sample.image_dir)


# --- CVAT ----------------------------------------------------------------------------------------------------------


def test_cvat_masks_labels_and_attributes_import_with_datumaro(sample: Sample, tmp_path: Path) -> None:
    import datumaro as dm

    out = tmp_path / "cvat"
    write_cvat(sample.images, CATEGORIES, out, sample.image_dir)
    dataset = dm.Dataset.import_from(str(out), "cvat")
    label_names = [item.name for item in dataset.categories()[dm.AnnotationType.label]]
    assert label_names == list(CATEGORIES)
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(str(Path(image.file_name).with_suffix("")) for image in sample.images)
    for image in sample.images:
        item = items[str(Path(image.file_name).with_suffix(""))]
        assert item.media.size == (image.height, image.width)
        expected = sample.expected(image)
        assert [ann.type for ann in item.annotations] == [dm.AnnotationType.mask] * len(expected)
        for ann, (inst, mask) in zip(item.annotations, expected, strict=True):
            assert label_names[ann.label] == inst.label
            np.testing.assert_array_equal(ann.image.astype(bool), mask)
            attributes = ann.attributes
            assert attributes["score"] == pytest.approx(inst.score, abs=0.0005)
            assert attributes["mask_score"] == pytest.approx(inst.mask_score, abs=0.0005)
            assert attributes["needs_review"] is inst.needs_review
            assert attributes["review_reasons"] == ",".join(inst.review_reasons)
            assert attributes["source"] == inst.source
            assert attributes["occluded"] is False


# --- Label Studio --------------------------------------------------------------------------------------------------


def test_label_studio_config_is_valid_and_lists_the_categories() -> None:
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(label_studio_config(CATEGORIES))
    interface.validate()
    control = interface.get_control("tag")
    assert control.tag == "BrushLabels"
    assert control.to_name == ["image"]
    assert list(control.labels) == list(CATEGORIES)


def test_label_studio_predictions_decode_to_the_exact_masks(sample: Sample, tmp_path: Path) -> None:
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    export = write_label_studio(sample.images, CATEGORIES, tmp_path, "/data/local-files/?d=labeled/")
    tasks = json.loads(export.tasks.read_text())
    interface = LabelInterface(export.config.read_text())
    assert len(tasks) == len(sample.images)
    for task, image in zip(tasks, sample.images, strict=True):
        expected = sample.expected(image)
        assert task["data"]["image"] == "/data/local-files/?d=labeled/" + image.file_name
        assert task["data"]["needs_review"] is any(inst.needs_review for inst, _ in expected)
        (prediction,) = task["predictions"]
        # label-studio-sdk 2.0.5's validator reads brush RLE as (value, count) pairs and rejects its own mask2rle
        # output (fixed upstream in label-studio-sdk PR #767): validate all but the RLE, which decode_rle checks below.
        placeholder = [{**r, "value": {**r["value"], "rle": [1, 1]}} for r in prediction["result"]]
        assert interface.validate_prediction({**prediction, "result": placeholder}, return_errors=True) == []
        assert prediction["model_version"] == "detseg"
        if expected:
            assert prediction["score"] == min(inst.score for inst, _ in expected)
        assert len(prediction["result"]) == len(expected)
        for result, (inst, mask) in zip(prediction["result"], expected, strict=True):
            assert (result["type"], result["from_name"], result["to_name"]) == ("brushlabels", "tag", "image")
            assert (result["original_width"], result["original_height"]) == (image.width, image.height)
            assert result["value"]["brushlabels"] == [inst.label] and result["score"] == inst.score
            decoded = decode_rle(result["value"]["rle"]).reshape(image.height, image.width, 4)[:, :, 3]
            np.testing.assert_array_equal(decoded > 0, mask)


@pytest.mark.parametrize("name", ["R&D/shelf 1.jpg", "a#1+b.png", "100%/café.webp", "plain/x.jpg"])
def test_label_studio_image_urls_carry_any_file_name_to_label_studios_file_server(name: str) -> None:
    """Label Studio's local-files server reads the path from the ``d`` query parameter: a raw "&" cut it, "#" ended
    the URL, "+" became a space and "%" was decoded. Cloud storage URIs keep their object key as written."""
    from service.labeling.exports.label_studio import image_url

    url = image_url("/data/local-files/?d=labeled/", name)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query) == {"d": [f"labeled/{name}"]}
    web = urllib.parse.urlsplit(image_url("https://images.example.com/shelf/", name))
    assert urllib.parse.unquote(web.path) == f"/shelf/{name}" and not web.fragment
    assert image_url("s3://bucket/dir/", name) == f"s3://bucket/dir/{name}"


def test_label_studio_converter_exports_accepted_predictions_as_the_exact_masks(sample: Sample, tmp_path: Path) -> None:
    """What Label Studio exports once a labeler accepts the predictions unchanged (results copied into annotations,
    tasks given ids), converted by label-studio-sdk's Converter to per-region NumPy masks."""
    from label_studio_sdk.converter import Converter

    export = write_label_studio(sample.images, CATEGORIES, tmp_path / "ls", "s3://bucket/labeled/")
    tasks = json.loads(export.tasks.read_text())
    accepted = [
        {**task, "id": n, "annotations": [{"id": 100 + n, "result": task["predictions"][0]["result"]}]}
        for n, task in enumerate(tasks)
    ]
    exported = tmp_path / "exported.json"
    exported.write_text(json.dumps(accepted))
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    Converter(str(export.config), str(tmp_path)).convert(str(exported), str(masks_dir), "BRUSH_TO_NUMPY", is_dir=False)
    for n, image in enumerate(sample.images):
        counters: dict[str, int] = {}
        for inst, mask in sample.expected(image):
            k = counters[inst.label] = counters.get(inst.label, -1) + 1
            (path,) = masks_dir.glob(f"task-{n}-annotation-{100 + n}-by-*-tag-{inst.label}-{k}.npy")
            np.testing.assert_array_equal(np.load(path) > 0, mask)
    assert len(list(masks_dir.glob("*.npy"))) == sum(len(sample.expected(image)) for image in sample.images)


# --- shared --------------------------------------------------------------------------------------------------------

Writer = Callable[[list[LabeledImage], tuple[str, ...], Path, Path], object]
WRITERS: dict[str, Writer] = {
    "coco": lambda images, categories, out, image_dir: write_coco(images, categories, out),
    "yolo": lambda images, categories, out, image_dir: write_yolo_seg(images, categories, out, image_dir),
    "cvat": lambda images, categories, out, image_dir: write_cvat(images, categories, out, image_dir),
    "label_studio": lambda images, categories, out, image_dir: write_label_studio(images, categories, out, "/x/"),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_unknown_label_is_rejected_before_anything_is_written(sample: Sample, tmp_path: Path, writer: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="'blob' is not in categories"):
        WRITERS[writer](list(sample.images), ("disc", "box"), out, sample.image_dir)
    assert not out.exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_mask_of_another_size_than_its_image_is_rejected(sample: Sample, tmp_path: Path, writer: str) -> None:
    wrong = dataclasses.replace(sample.images[0], width=sample.images[0].width + 1)
    with pytest.raises(ValueError, match=r"mask is \[120, 160\]"):
        WRITERS[writer]([wrong], CATEGORIES, tmp_path / "out", sample.image_dir)


def test_missing_source_image_is_reported(sample: Sample, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="a.png"):
        write_cvat(sample.images, CATEGORIES, tmp_path / "out", tmp_path / "nowhere")


@pytest.mark.parametrize("image_mode", ["symlink", "copy"])
def test_exporting_over_the_image_folder_keeps_the_images(
    sample: Sample, tmp_path: Path, image_mode: Literal["symlink", "copy"]
) -> None:
    """out/images is the source folder itself: the images stay the files they were."""
    images = tmp_path / "images"
    shutil.copytree(sample.image_dir, images)
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    write_yolo_seg(sample.images, CATEGORIES, tmp_path, images, image_mode=image_mode)
    write_yolo_seg(sample.images, CATEGORIES, tmp_path, images, image_mode=image_mode)  # and again
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file() and not p.is_symlink()} == before


# --- what the writers write: escaped, printable, all or nothing ---------------------------------------------------

# Labels every format must carry through its own escaping: XML markup, JSON and YAML quoting, other scripts.
MARKUP = {"disc": 'say "hi"', "box": "a & b <c> 'd'", "blob": "café 红色: #1"}


def _relabeled(images: tuple[LabeledImage, ...]) -> list[LabeledImage]:
    return [
        dataclasses.replace(
            image, instances=tuple(dataclasses.replace(inst, label=MARKUP[inst.label]) for inst in image.instances)
        )
        for image in images
    ]


def _read_back(fmt: str, out: Path) -> tuple[list[str], list[str]]:
    """(category names, instance labels in file order) of the export in ``out``, read by the format's own tools."""
    import xml.etree.ElementTree as ET

    if fmt == "coco":
        coco = COCO(str(out / "instances.json"))
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        return list(names.values()), [names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds())]
    if fmt == "yolo":
        data, labels = load_yolo(out / "data.yaml")
        return list(data["names"].values()), [data["names"][int(c)] for label in labels for c in label["cls"].ravel()]
    if fmt == "cvat":
        import datumaro as dm

        tree = ET.parse(out / "annotations.xml")  # ElementTree itself, then datumaro's importer
        assert [e.text for e in tree.iter("name") if e.text in MARKUP.values()] == list(MARKUP.values())
        dataset = dm.Dataset.import_from(str(out), "cvat")
        names = [item.name for item in dataset.categories()[dm.AnnotationType.label]]
        items = sorted(dataset, key=lambda item: item.id)
        return names, [names[ann.label] for item in items for ann in item.annotations]
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface((out / "labeling_config.xml").read_text())
    interface.validate()
    tasks = json.loads((out / "tasks.json").read_text())
    labels = [r["value"]["brushlabels"][0] for t in tasks for r in t["predictions"][0]["result"]]
    return list(interface.get_control("tag").labels), labels


UNPRINTABLE = ("red \x01star", "circle\n\x1b[2J", "zero\u200bwidth", "line\u2028break", "\uffff")


@pytest.mark.parametrize("writer", WRITERS)
def test_labels_are_escaped_and_unprintable_ones_refused_before_anything_is_written(
    sample: Sample, tmp_path: Path, writer: str
) -> None:
    images = _relabeled(sample.images)
    categories = tuple(MARKUP.values())
    WRITERS[writer](images, categories, tmp_path / "out", sample.image_dir)
    names, labels = _read_back(writer, tmp_path / "out")
    assert names == list(categories)
    assert sorted(labels) == sorted(MARKUP[inst.label] for image in sample.images for inst, _ in sample.expected(image))
    # An unprintable label: ValueError naming the category, the kind of character and its code point; nothing written.
    for n, bad in enumerate(UNPRINTABLE):
        fresh = tmp_path / f"fresh{n}"
        with pytest.raises(ValueError, match=r"categories\[3\]: contains an? [a-z ]+ \(U\+[0-9A-F]{4}\); labels must"):
            WRITERS[writer](images, (*categories, bad), fresh, sample.image_dir)
        assert not fresh.exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_failing_export_leaves_no_partial_output(sample: Sample, tmp_path: Path, writer: str) -> None:
    """A failure found while building the export (here a file name no XML can hold) writes nothing: not into a new
    folder, not over an earlier complete export; no temporary files are left either."""
    out = tmp_path / "out"
    WRITERS[writer](list(sample.images), CATEGORIES, out, sample.image_dir)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    hostile = tmp_path / "hostile"
    shutil.copytree(sample.image_dir, hostile)
    (hostile / "a.png").rename(hostile / "a\x1b[2J.png")
    renamed = [dataclasses.replace(sample.images[0], file_name="a\x1b[2J.png"), *sample.images[1:]]
    for target in (out, tmp_path / "new"):
        with pytest.raises(ValueError, match=r"a\\x1b\[2J.png'?: contains a control character \(U\+001B\)"):
            WRITERS[writer](renamed, CATEGORIES, target, hostile)
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    if writer in ("yolo", "cvat"):  # a missing source image: refused before the folder is made
        with pytest.raises(FileNotFoundError, match="a.png"):
            WRITERS[writer](list(sample.images), CATEGORIES, tmp_path / "missing", tmp_path / "nowhere")
        assert not (tmp_path / "missing").exists()
