"""Labeled images → annotation formats: COCO instances JSON, an ultralytics YOLO segmentation dataset, CVAT for images
1.1 XML, and Label Studio tasks with brush-label predictions.

Every writer takes the same inputs: ``images`` (``LabeledImage`` records: boxes XYXY in original-image pixels, masks
COCO RLE of the whole image), ``categories`` (the label set, its order gives the ids: COCO 1..N, YOLO 0..N-1; CVAT and
Label Studio name labels) and ``out`` (a folder, created if missing; files already there with the same names are
replaced). Before anything is written every instance is checked: a label not in ``categories`` raises ValueError
naming it, as does a mask whose size is not its image's, a duplicate category, or a category or file name that is not
printable text (``service.printable``: no control or format characters; any script, quotes, ``&`` and ``<>`` are
fine).

Every writer builds its files' contents in memory first (XML through ElementTree's serializer, which escapes, and
parsed back before anything is written; JSON and YAML through their serializers), so a failure leaves nothing behind;
each file is then written to a temporary sibling and renamed into place, so a reader never sees half a file.
``service.labeling.run.write_exports`` builds a whole export folder aside and renames it into place the same way.

Instances with an empty mask are left out of every format: there is nothing to draw, COCO evaluation cannot match
them and CVAT has no empty mask element.

Formats that carry images (YOLO, CVAT) take ``image_dir``, the folder ``LabeledImage.file_name`` is relative to, and
place each image under ``out/images/<file_name>``: as a symlink to the source's resolved path by default (instant, no
space; the folder then depends on the source folder staying where it is), or as a copy with ``image_mode="copy"``
(a self-contained folder to zip or move).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from service.labeling.records import LabeledImage, LabeledInstance
from service.printable import unprintable

ImageMode = Literal["symlink", "copy"]

COCO_FILE = "instances.json"
YOLO_DATA_FILE = "data.yaml"
CVAT_FILE = "annotations.xml"
LABEL_STUDIO_TASKS_FILE = "tasks.json"
LABEL_STUDIO_CONFIG_FILE = "labeling_config.xml"
IMAGES_DIR = "images"  # where the formats that carry images (YOLO, CVAT) place them: <out>/images/<file_name>
# Label Studio tag names: the <Image> object and the <BrushLabels> control of ``label_studio_config``.
LABEL_STUDIO_IMAGE, LABEL_STUDIO_BRUSH = "image", "tag"


@dataclasses.dataclass(frozen=True)
class LabelStudioExport:
    """What ``write_label_studio`` wrote: ``tasks``, the JSON list of tasks to import; ``config``, the labeling
    config XML the project needs (its tag names are the ones the tasks' results refer to)."""

    tasks: Path
    config: Path


@dataclasses.dataclass(frozen=True)
class CvatMaskRle:
    """A mask as CVAT's ``<mask>`` element stores it: the tight box ``left``, ``top``, ``width``, ``height`` (pixels,
    inclusive of the last column and row) and ``counts``, run lengths over that crop in row-major order, the first
    run being background (0 when the crop's first pixel is set)."""

    left: int
    top: int
    width: int
    height: int
    counts: tuple[int, ...]


# --- COCO ----------------------------------------------------------------------------------------------------------


def write_coco(images: Sequence[LabeledImage], categories: Sequence[str], out: Path) -> Path:
    """Writes ``out/instances.json``, COCO instance segmentation; returns its path.

    Images get ids 1..len(images) in order, with ``file_name`` as recorded (relative to the labeled folder).
    Annotations: ``segmentation`` the instance's COCO RLE (counts as str), ``area`` its mask's pixel count, ``bbox`` the
    recorded box as XYWH (original-image pixels), ``iscrowd`` 0, ``score`` the detection score, and the detseg extras
    under ``attributes``: ``needs_review``, ``review_reasons`` (list of str), ``mask_score``, ``source``.
    """
    ids = _category_ids(images, categories)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, image in enumerate(images, start=1):
        coco_images.append({"id": image_id, "file_name": image.file_name, "width": image.width, "height": image.height})
        for inst in image.instances:
            rle = _pycocotools_rle(inst)
            area = int(mask_utils.area(rle))
            if area == 0:
                continue
            x0, y0, x1, y1 = inst.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[inst.label] + 1,  # COCO ids start at 1
                    "segmentation": {"size": [image.height, image.width], "counts": rle["counts"].decode("ascii")},
                    "area": float(area),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                    "score": inst.score,
                    "attributes": {
                        "needs_review": inst.needs_review,
                        "review_reasons": list(inst.review_reasons),
                        "mask_score": inst.mask_score,
                        "source": inst.source,
                    },
                }
            )
    coco = {
        "info": {"description": "detseg pre-labels"},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(categories)],
    }
    path = out / COCO_FILE
    _write_files({path: json.dumps(coco).encode("utf-8")})
    return path


# --- YOLO segmentation ---------------------------------------------------------------------------------------------


def write_yolo_seg(
    images: Sequence[LabeledImage],
    categories: Sequence[str],
    out: Path,
    image_dir: Path,
    *,
    image_mode: ImageMode = "symlink",
    dataset_root: Path | None = None,
) -> Path:
    """Writes an ultralytics YOLO segmentation dataset; returns the path of its ``data.yaml``.

    ``out/images/<file_name>``: the images (see the module docstring for ``image_mode``); ``out/labels/...txt``: one
    label file per image where ultralytics looks for it (``img2label_paths``: the last ``images`` folder replaced by
    ``labels``, the suffix by ``.txt``; empty for an image without instances, a background image), one line
    ``cls x1 y1 x2 y2 ...`` per instance, class index 0..N-1 and polygon vertices normalised by the image's width and
    height. ``data.yaml``: ``path`` (``dataset_root``, default ``out``, absolute: where the dataset is read from, when
    ``out`` is a folder renamed into place afterwards), ``train`` and ``val`` (both ``images``: one unsplit set),
    ``names`` ({index: label}).

    Polygons are made the way ultralytics' ``convert_coco(..., use_segments=True)`` makes them from RLE: the mask's
    outer contours (``cv2.findContours``, external, ``CHAIN_APPROX_SIMPLE``; holes are filled), parts of fewer than 3
    points dropped, several parts joined into one polygon by ``merge_multi_segment`` (zero-width bridges between
    nearest points). Vertices are the centres of the contour's pixels in the frame normalised coordinates live in
    (the image spans [0, 1]; pixel (r, c) covers [c, c + 1] × [r, r + 1] before dividing by (W, H)): pixel (r, c) →
    ((c + 0.5) / W, (r + 0.5) / H). ``convert_coco`` writes (c / W, r / H), half a pixel up and left; ultralytics
    rasterises with ``cv2.fillPoly`` after truncating to int32 (``polygon2mask``), where float rounding of c / W * W
    then loses about half the top and left boundary pixels (IoU ≈ 0.965 for a 50 px disc, measured) while centres give
    single-part masks back exactly at the original size. Extra pixels come only from the bridges.
    """
    from ultralytics.data.utils import img2label_paths

    ids = _category_ids(images, categories)
    _check_label_paths_unique(images)
    files: dict[Path, bytes] = {}
    for image in images:
        lines = []
        for inst in image.instances:
            polygon = _yolo_polygon(inst.mask())
            if polygon is None:
                continue
            xy = ((polygon + 0.5) / (image.width, image.height)).ravel()
            lines.append(" ".join([str(ids[inst.label]), *(f"{v:.6f}" for v in xy)]))
        label = Path(img2label_paths([str(out / IMAGES_DIR / image.file_name)])[0])
        files[label] = "".join(f"{line}\n" for line in lines).encode("utf-8")
    root = (dataset_root if dataset_root is not None else out).resolve()
    data = {"path": str(root), "train": IMAGES_DIR, "val": IMAGES_DIR, "names": dict(enumerate(categories))}
    path = out / YOLO_DATA_FILE
    files[path] = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")
    _place_images(images, image_dir, out / IMAGES_DIR, image_mode)
    _write_files(files)
    return path


def _yolo_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool mask → one polygon (K, 2) float64 of (column, row) pixel indices, as ``cv2.findContours`` gives
    them; None when no outer contour has 3 points."""
    from ultralytics.data.converter import merge_multi_segment

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1, 2) for c in contours if len(c) >= 3]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0].astype(np.float64)
    return np.concatenate(merge_multi_segment([p.ravel().tolist() for p in parts])).astype(np.float64)


def _check_label_paths_unique(images: Sequence[LabeledImage]) -> None:
    """ValueError when two images would share a YOLO label file (same path but for the suffix: a.jpg, a.png)."""
    seen: dict[str, str] = {}
    for image in images:
        key = str(Path(image.file_name).with_suffix(""))
        if key in seen:
            raise ValueError(f"images {seen[key]!r} and {image.file_name!r} would share one YOLO label file")
        seen[key] = image.file_name


# --- CVAT for images 1.1 -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CvatAttribute:
    """An attribute declared on every CVAT label: ``input_type`` CVAT's (number | checkbox | text); ``values`` its
    declaration (number: "min;max;step"; checkbox: the default); ``text``: an instance's value as written."""

    name: str
    input_type: str
    default: str
    values: str
    text: Callable[[LabeledInstance], str]


# Scores are written rounded to the declared step, so CVAT's range/step check accepts them.
_CVAT_ATTRIBUTES = (
    _CvatAttribute("score", "number", "0", "0;1;0.001", lambda inst: f"{inst.score:.3f}"),
    _CvatAttribute("mask_score", "number", "0", "0;1;0.001", lambda inst: f"{inst.mask_score:.3f}"),
    _CvatAttribute("needs_review", "checkbox", "false", "false", lambda inst: str(inst.needs_review).lower()),
    _CvatAttribute("review_reasons", "text", "", "", lambda inst: ",".join(inst.review_reasons)),
    _CvatAttribute("source", "text", "", "", lambda inst: inst.source),
)


def write_cvat(
    images: Sequence[LabeledImage],
    categories: Sequence[str],
    out: Path,
    image_dir: Path,
    *,
    image_mode: ImageMode = "symlink",
) -> Path:
    """Writes ``out/annotations.xml`` (CVAT for images 1.1) and ``out/images/<file_name>``; returns the XML's path.

    The folder is what CVAT's dataset import and datumaro's ``cvat`` importer read (the importer needs the images
    under ``images/`` next to the XML); the XML alone uploads as annotations to a CVAT task holding the same images.

    ``<meta><task>`` lists the labels, each declaring the attributes every shape carries: ``score`` and ``mask_score``
    (number, "0;1;0.001", values rounded to that step), ``needs_review`` (checkbox), ``review_reasons`` (text, comma
    separated), ``source`` (text). Each ``<image id name width height>`` (ids 0.. in order) holds one ``<mask>`` per
    instance: CVAT's own lossless mask element (CVAT 2.x writes and reads it, datumaro 1.12's importer decodes it), RLE
    over the mask's tight box (see ``CvatMaskRle``), ``source="auto"``, ``occluded="0"``. Masks rather than polygons
    because a mask comes back pixel for pixel and a several-part instance stays one annotation. Uploaded into an
    existing task, the attributes are kept only where that task's labels declare them as ``<meta>`` does.
    """
    _category_ids(images, categories)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    for key, value in (("name", "detseg pre-labels"), ("size", str(len(images))), ("mode", "annotation")):
        ET.SubElement(task, key).text = value
    labels = ET.SubElement(task, "labels")
    for name in categories:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "any"
        attributes = ET.SubElement(label, "attributes")
        for spec in _CVAT_ATTRIBUTES:
            attr = ET.SubElement(attributes, "attribute")
            for key, value in (
                ("name", spec.name),
                ("mutable", "False"),
                ("input_type", spec.input_type),
                ("default_value", spec.default),
                ("values", spec.values),
            ):
                ET.SubElement(attr, key).text = value
    for index, image in enumerate(images):
        element = ET.SubElement(
            root, "image", id=str(index), name=image.file_name, width=str(image.width), height=str(image.height)
        )
        for inst in image.instances:
            rle = _cvat_mask_rle(inst.mask())
            if rle is None:
                continue
            mask = ET.SubElement(
                element,
                "mask",
                label=inst.label,
                source="auto",
                occluded="0",
                rle=", ".join(map(str, rle.counts)),
                left=str(rle.left),
                top=str(rle.top),
                width=str(rle.width),
                height=str(rle.height),
                z_order="0",
            )
            for spec in _CVAT_ATTRIBUTES:
                ET.SubElement(mask, "attribute", name=spec.name).text = spec.text(inst)
    ET.indent(root)
    path = out / CVAT_FILE
    xml = _xml_bytes(root, CVAT_FILE)
    _place_images(images, image_dir, out / IMAGES_DIR, image_mode)
    _write_files({path: xml})
    return path


def _cvat_mask_rle(mask: np.ndarray) -> CvatMaskRle | None:
    """(H, W) bool mask → its CVAT ``<mask>`` RLE over its tight box; None for an empty mask."""
    left, top, width, height = cv2.boundingRect(mask.astype(np.uint8))
    if width == 0:
        return None
    flat = mask[top : top + height, left : left + width].ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    counts = ([0] if flat[0] else []) + runs.tolist()
    return CvatMaskRle(left, top, width, height, tuple(counts))


# --- Label Studio --------------------------------------------------------------------------------------------------


def label_studio_config(categories: Sequence[str]) -> str:
    """The labeling config XML for ``write_label_studio``'s tasks: ``<Image name="image" value="$image"/>`` and
    ``<BrushLabels name="tag" toName="image">`` with one ``<Label value=...>`` per category, in order."""
    from label_studio_sdk.label_interface import LabelInterface
    from label_studio_sdk.label_interface.create import labels

    _check_categories(categories)
    config = str(
        LabelInterface.create(
            {LABEL_STUDIO_IMAGE: "Image", LABEL_STUDIO_BRUSH: labels(list(categories), tag_type="BrushLabels")}
        )
    )
    _check_well_formed(config, LABEL_STUDIO_CONFIG_FILE)  # label-studio-sdk's serializer escapes; parse back to be sure
    return config


def write_label_studio(
    images: Sequence[LabeledImage],
    categories: Sequence[str],
    out: Path,
    image_url_prefix: str,
    *,
    model_version: str = "detseg",
) -> LabelStudioExport:
    """Writes ``out/tasks.json`` (Label Studio tasks to import as pre-annotations) and ``out/labeling_config.xml``
    (``label_studio_config(categories)``); returns both paths.

    One task per image: ``data.image`` = ``image_url_prefix + file_name`` (the prefix is whatever Label Studio resolves:
    a URL, ``s3://bucket/dir/``, or ``/data/local-files/?d=<dir>/`` for local file serving; nothing is escaped) and
    ``predictions`` with one prediction (``model_version``; ``score`` the lowest instance score, so sorting tasks by
    prediction score surfaces the least certain first; left out when the image has no instance). Its ``result`` holds
    one ``brushlabels`` region per instance: ``value`` {``format``: "rle", ``rle``: label-studio-sdk's own encoding of
    the whole-image mask (``brush.mask2rle``, lossless), ``brushlabels``: [label]}, ``original_width``/``height``,
    ``from_name``/``to_name``/``type`` matching the config, and the instance's ``score``. Predictions, not annotations:
    Label Studio shows them for review and keeps them apart from what labelers submit. Review flags go into the task
    data (``needs_review``: any instance flagged; ``review_reasons``: their union, sorted) so the Data Manager can
    filter on them; brush regions have no per-region attributes.
    """
    from label_studio_sdk.converter import brush

    _category_ids(images, categories)
    config = label_studio_config(categories)
    tasks = []
    for image in images:
        instances = [(inst, inst.mask()) for inst in image.instances]
        instances = [(inst, mask) for inst, mask in instances if mask.any()]
        result = [
            {
                "id": f"r{k}",
                "type": "brushlabels",
                "from_name": LABEL_STUDIO_BRUSH,
                "to_name": LABEL_STUDIO_IMAGE,
                "original_width": image.width,
                "original_height": image.height,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": brush.mask2rle(mask.astype(np.uint8) * 255),
                    "brushlabels": [inst.label],
                },
                "score": inst.score,
            }
            for k, (inst, mask) in enumerate(instances)
        ]
        prediction: dict[str, Any] = {"model_version": model_version, "result": result}
        if instances:
            prediction["score"] = min(inst.score for inst, _ in instances)
        reasons = sorted({reason for inst, _ in instances for reason in inst.review_reasons})
        data = {
            LABEL_STUDIO_IMAGE: image_url_prefix + image.file_name,
            "needs_review": any(inst.needs_review for inst, _ in instances),
            "review_reasons": reasons,
        }
        tasks.append({"data": data, "predictions": [prediction]})
    export = LabelStudioExport(out / LABEL_STUDIO_TASKS_FILE, out / LABEL_STUDIO_CONFIG_FILE)
    _write_files({export.tasks: json.dumps(tasks).encode("utf-8"), export.config: config.encode("utf-8")})
    return export


# --- shared --------------------------------------------------------------------------------------------------------


def _check_categories(categories: Sequence[str]) -> None:
    """ValueError for an empty label set, a label listed twice, or one that is blank or not printable."""
    if not categories:
        raise ValueError("categories is empty")
    for i, name in enumerate(categories):
        problem = "is blank" if not name.strip() else _contains(unprintable(name))
        if problem:
            raise ValueError(f"categories[{i}]: {problem}; labels must be printable text")
    duplicates = sorted(name for name, count in Counter(categories).items() if count > 1)
    if duplicates:
        raise ValueError(f"categories lists {duplicates} more than once")


def _category_ids(images: Sequence[LabeledImage], categories: Sequence[str]) -> dict[str, int]:
    """Label → its index in ``categories`` (0-based), after checking every instance of ``images``: ValueError naming
    a label not in ``categories``, or an image whose instance mask is not (height, width)."""
    _check_categories(categories)
    ids = {name: i for i, name in enumerate(categories)}
    for image in images:
        problem = _contains(unprintable(image.file_name))
        if problem:
            raise ValueError(f"file_name {image.file_name!r}: {problem}; file names must be printable text")
        for inst in image.instances:
            if inst.label not in ids:
                raise ValueError(
                    f"{image.file_name}: label {inst.label!r} is not in categories {list(categories)}; "
                    "add it or drop those instances"
                )
            if list(inst.rle["size"]) != [image.height, image.width]:
                raise ValueError(
                    f"{image.file_name}: {inst.label!r} mask is {list(inst.rle['size'])} (H, W), "
                    f"the image is {[image.height, image.width]}"
                )
    return ids


def _pycocotools_rle(inst: LabeledInstance) -> dict[str, Any]:
    """The instance's RLE as pycocotools takes it: {"size": [H, W], "counts": bytes}."""
    counts = inst.rle["counts"]
    return {"size": list(inst.rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _contains(problem: str | None) -> str | None:
    return None if problem is None else f"contains {problem}"


def placed_images(images: Sequence[LabeledImage], out: Path) -> list[Path]:
    """Where ``write_yolo_seg`` and ``write_cvat`` into ``out`` place the source images (links or copies): the
    exact paths a manifest of the export leaves out."""
    return [out / IMAGES_DIR / image.file_name for image in images]


def _xml_bytes(root: ET.Element, name: str) -> bytes:
    """``root`` serialized as UTF-8 XML with a declaration, checked by ``_check_well_formed``."""
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    _check_well_formed(data, name)
    return data


def _check_well_formed(xml: str | bytes, name: str) -> None:
    """ValueError naming ``name`` when ``xml`` does not parse back (serializers escape markup, but write characters
    XML 1.0 forbids as they are)."""
    try:
        ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"{name} would not be well-formed XML ({e})") from None


def _write_files(files: dict[Path, bytes]) -> None:
    """Writes each file atomically: into a new temporary sibling (the umask's permissions, as a plain write gets),
    then renamed over ``path`` (parents created)."""
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            with tmp.open("xb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _place_images(images: Sequence[LabeledImage], image_dir: Path, dest: Path, mode: ImageMode) -> None:
    """Puts ``image_dir/<file_name>`` at ``dest/<file_name>`` for every image: a symlink to the resolved source or a
    copy (``mode``); FileNotFoundError naming a missing source, before anything is placed."""
    if mode not in ("symlink", "copy"):
        raise ValueError(f"image_mode must be 'symlink' or 'copy', got {mode!r}")
    sources = [image_dir / image.file_name for image in images]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"images not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for image, source in zip(images, sources, strict=True):
        target = dest / image.file_name
        if target.exists() and target.resolve() == source.resolve():
            continue  # already there (a link from an earlier export, or ``dest`` is the source folder itself)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if mode == "copy":
            shutil.copy2(source, target)
        else:
            target.symlink_to(source.resolve())
