"""A dataset through the service: one request per image with the prompts the dataset implies.

- ``classes``: the dataset's category names as ``classes`` (an open detector takes any names; a closed one is
  asked for the names it knows, and the dataset's other categories count as missed: ``classes_to_ask``);
- ``texts``: the category names as free ``texts`` (each instance answers the text it was found for);
- ``boxes``: every ground-truth box as a region prompt labelled with its category (SAM's masks alone: the
  detector is skipped, so the figures measure segmentation given perfect boxes; an image without ground truth is
  not sent).

Requests go over one StreamSegment call (the server bounds how many are in flight).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator

import grpc

from service.client import Client, Instance, Region, RequestFailed, segment_request
from service.evaluation.dataset import EvalDataset, EvalImage
from service.printable import normalise_class_name
from service.proto.detseg.v1 import detseg_pb2 as pb


class Prompt(enum.Enum):
    CLASSES = "classes"
    TEXTS = "texts"
    BOXES = "boxes"


@dataclasses.dataclass(frozen=True)
class Predicted:
    """A returned instance and the dataset category it answers (None: a label the dataset does not have)."""

    instance: Instance
    category_id: int | None


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    image_id: int
    instances: tuple[Predicted, ...]
    error: str | None = None  # the server's message when the request failed (the image then counts as empty)


def classes_to_ask(dataset: EvalDataset, detector: pb.ModelInfo | None) -> list[str]:
    """The dataset's category names a ``classes`` request asks for: all of them of an open-vocabulary detector (or
    a server without a detector), else those in the detector's vocabulary (compared as the server compares them,
    ``normalise_class_name``)."""
    names = list(dataset.categories.values())
    if detector is None or detector.open_vocabulary:
        return names
    known = {normalise_class_name(v) for v in detector.vocabulary}
    return [n for n in names if normalise_class_name(n) in known]


def readable_names(client: Client, dataset: EvalDataset, asked: list[str], kind: str = "classes") -> list[str]:
    """Of the category names asked as ``kind`` ("classes" or "texts"), those the server accepts. A detector with a
    phrase reader (the demo's attribute grammar) refuses a class it cannot read, a closed detector's text matcher a
    text that matches none of its classes, with INVALID_ARGUMENT naming the field ``classes[i]`` / ``texts[i]``
    (``RequestFailed.field``); such a name is left out (it counts as missed, like a closed detector's unknown
    category), one refusal at a time, on the first image (at score threshold 1: nothing is segmented). Sent whole,
    one such name failed every image."""
    asked = list(asked)
    if not dataset.images or not asked:
        return asked
    data = dataset.images[0].path.read_bytes()
    while asked:
        try:
            classes, texts = (asked, []) if kind == "classes" else ([], asked)
            client.segment(data, classes=classes, texts=texts, score_threshold=1.0, request_id=f"eval-{kind}")
            return asked
        except RequestFailed as e:
            refused = re.fullmatch(rf"{kind}\[(\d+)\]", e.field or "")
            if e.code != grpc.StatusCode.INVALID_ARGUMENT or refused is None:
                raise
            del asked[int(refused.group(1))]
    return asked


def prompted(dataset: EvalDataset, prompt: Prompt) -> list[EvalImage]:
    """The images a request is sent for: all of them, but with ``boxes`` those with a box to give (an image without
    ground truth has no prompt; a request without regions would run the detector, whose answers counted as false
    positives)."""
    if prompt is not Prompt.BOXES:
        return list(dataset.images)
    return [i for i in dataset.images if _boxes(dataset, i)]


def _boxes(dataset: EvalDataset, image: EvalImage) -> list[Region]:
    """The image's ground-truth boxes as region prompts labelled with their categories, clipped to the image (a
    box drawn past the edge by half a pixel failed the whole request); a box empty once clipped is not asked (its
    instance counts as missed)."""
    out = []
    for a in dataset.annotations(image.id):
        box = image.clipped_box(a["bbox"])
        if box is not None:
            out.append(Region(box=box, label=dataset.categories[a["category_id"]]))
    return out


def requests(
    dataset: EvalDataset, prompt: Prompt, score_threshold: float | None, names: list[str] | None = None
) -> Iterator[pb.SegmentRequest]:
    """One request per ``prompted`` image; ``names``: the classes or texts asked (default: every category name)."""
    asked = list(dataset.categories.values()) if names is None else names
    for image in prompted(dataset, prompt):
        data, request_id = image.path.read_bytes(), f"eval-{image.id}"
        if prompt is Prompt.BOXES:
            yield segment_request(data, regions=_boxes(dataset, image), request_id=request_id)
        elif prompt is Prompt.TEXTS:
            yield segment_request(data, texts=asked, score_threshold=score_threshold, request_id=request_id)
        else:
            yield segment_request(data, classes=asked, score_threshold=score_threshold, request_id=request_id)


def category_of(instance: Instance, prompt: Prompt, dataset: EvalDataset) -> int | None:
    """The dataset category an instance answers: the text it was found for (texts), else its label."""
    return dataset.category_id(instance.text if prompt is Prompt.TEXTS and instance.text else instance.label)


def predict(
    client: Client,
    dataset: EvalDataset,
    prompt: Prompt,
    score_threshold: float | None = None,
    names: list[str] | None = None,
) -> list[ImagePrediction]:
    """One ImagePrediction per dataset image, in dataset order (an image ``prompted`` leaves out has none);
    ``names`` as for ``requests``."""
    answered: dict[int, ImagePrediction] = {}
    asked = prompted(dataset, prompt)
    for item in client.segment_many(requests(dataset, prompt, score_threshold, names)):
        image = asked[item.index]
        if item.result is None:
            answered[image.id] = ImagePrediction(image.id, (), str(item.error))
            continue
        size = (item.result.width, item.result.height)
        if size != (image.width, image.height):  # masks of another size match nothing: say so instead
            error = (
                f"the image is {size[0]}x{size[1]} as the server reads it (EXIF orientation applied), "
                f"the dataset says {image.width}x{image.height}"
            )
            answered[image.id] = ImagePrediction(image.id, (), error)
            continue
        found = tuple(Predicted(i, category_of(i, prompt, dataset)) for i in item.result.instances)
        answered[image.id] = ImagePrediction(image.id, found)
    return [answered.get(i.id, ImagePrediction(i.id, ())) for i in dataset.images]
