"""CVAT for images 1.1 XML with the images beside it (see ``service.labeling.exports`` for what every writer
takes)."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from service.labeling.exports.common import IMAGES_DIR, ImageMode, category_ids, place_images, write_files, xml_bytes
from service.labeling.records import LabeledImage, LabeledInstance

CVAT_FILE = "annotations.xml"


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
    category_ids(images, categories)
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
    xml = xml_bytes(root, CVAT_FILE)
    place_images(images, image_dir, out / IMAGES_DIR, image_mode)
    write_files({path: xml})
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
