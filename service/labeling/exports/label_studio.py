"""Label Studio tasks with brush-label predictions, and the labeling config they need (see
``service.labeling.exports`` for what every writer takes)."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.labeling.exports.common import category_ids, check_categories, check_well_formed, write_files
from service.labeling.records import LabeledImage

LABEL_STUDIO_TASKS_FILE = "tasks.json"
LABEL_STUDIO_CONFIG_FILE = "labeling_config.xml"
# Label Studio tag names: the <Image> object and the <BrushLabels> control of ``label_studio_config``.
LABEL_STUDIO_IMAGE, LABEL_STUDIO_BRUSH = "image", "tag"


@dataclasses.dataclass(frozen=True)
class LabelStudioExport:
    """What ``write_label_studio`` wrote: ``tasks``, the JSON list of tasks to import; ``config``, the labeling
    config XML the project needs (its tag names are the ones the tasks' results refer to)."""

    tasks: Path
    config: Path


def label_studio_config(categories: Sequence[str]) -> str:
    """The labeling config XML for ``write_label_studio``'s tasks: ``<Image name="image" value="$image"/>`` and
    ``<BrushLabels name="tag" toName="image">`` with one ``<Label value=...>`` per category, in order."""
    from label_studio_sdk.label_interface import LabelInterface
    from label_studio_sdk.label_interface.create import labels

    check_categories(categories)
    config = str(
        LabelInterface.create(
            {LABEL_STUDIO_IMAGE: "Image", LABEL_STUDIO_BRUSH: labels(list(categories), tag_type="BrushLabels")}
        )
    )
    check_well_formed(config, LABEL_STUDIO_CONFIG_FILE)  # label-studio-sdk's serializer escapes; parse back to be sure
    return config


def image_url(prefix: str, file_name: str) -> str:
    """``prefix + file_name``, the name percent-encoded ("/" kept) where the prefix is a web address or a path Label
    Studio serves: in ``/data/local-files/?d=`` a name's "&", "#", "+" or "%" otherwise cut or changed the path
    (Label Studio's local-files storage quotes it so itself). A cloud storage URI (``s3://``, ``gs://``,
    ``azure-blob://``) takes its object key as written."""
    scheme = urllib.parse.urlsplit(prefix).scheme
    return prefix + (urllib.parse.quote(file_name, safe="/") if scheme in ("", "http", "https") else file_name)


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

    One task per image: ``data.image`` = ``image_url_prefix + file_name`` (``image_url``: the prefix is whatever Label
    Studio resolves: a URL, ``s3://bucket/dir/``, or ``/data/local-files/?d=<dir>/`` for local file serving) and
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

    category_ids(images, categories)
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
            LABEL_STUDIO_IMAGE: image_url(image_url_prefix, image.file_name),
            "needs_review": any(inst.needs_review for inst, _ in instances),
            "review_reasons": reasons,
        }
        tasks.append({"data": data, "predictions": [prediction]})
    export = LabelStudioExport(out / LABEL_STUDIO_TASKS_FILE, out / LABEL_STUDIO_CONFIG_FILE)
    write_files({export.tasks: json.dumps(tasks).encode("utf-8"), export.config: config.encode("utf-8")})
    return export
