"""COCO instance segmentation JSON (see ``service.labeling.exports`` for what every writer takes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from service.labeling.exports.common import category_ids, write_files
from service.labeling.records import LabeledImage, LabeledInstance

COCO_FILE = "instances.json"


def write_coco(images: Sequence[LabeledImage], categories: Sequence[str], out: Path) -> Path:
    """Writes ``out/instances.json``, COCO instance segmentation; returns its path.

    Images get ids 1..len(images) in order, with ``file_name`` as recorded (relative to the labeled folder).
    Annotations: ``segmentation`` the instance's COCO RLE (counts as str), ``area`` its mask's pixel count, ``bbox`` the
    recorded box as XYWH (original-image pixels), ``iscrowd`` 0, ``score`` the detection score, and the detseg extras
    under ``attributes``: ``needs_review``, ``review_reasons`` (list of str), ``mask_score``, ``source``.
    """
    ids = category_ids(images, categories)
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
    write_files({path: json.dumps(coco).encode("utf-8")})
    return path


def _pycocotools_rle(inst: LabeledInstance) -> dict[str, Any]:
    """The instance's RLE as pycocotools takes it: {"size": [H, W], "counts": bytes}."""
    counts = inst.rle["counts"]
    return {"size": list(inst.rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
