"""A dataset through the service: one request per image with the prompts the dataset implies.

- ``classes``: the dataset's category names as ``classes`` (an open detector takes any names; a closed one is
  asked for the names it knows, and the dataset's other categories count as missed: ``classes_to_ask``);
- ``texts``: the category names as free ``texts`` (each instance answers the text it was found for);
- ``boxes``: every ground-truth box as a region prompt labelled with its category (SAM's masks alone: the
  detector is skipped, so the figures measure segmentation given perfect boxes).

Requests go over one StreamSegment call (the server bounds how many are in flight).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator

import grpc

from service.client import Client, Instance, Region, RequestFailed, segment_request
from service.evaluation.dataset import EvalDataset
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


def readable_classes(client: Client, dataset: EvalDataset, asked: list[str]) -> list[str]:
    """Of the classes asked of an open-vocabulary detector, those its server accepts. A detector with a phrase
    reader (the demo's attribute grammar) refuses a name it cannot read with INVALID_ARGUMENT naming the field
    ``classes[i]`` (``RequestFailed.field``); such a name is left out (it counts as missed, like a closed
    detector's unknown category), one refusal at a time, on the first image (at score threshold 1: nothing is
    segmented)."""
    asked = list(asked)
    if not dataset.images or not asked:
        return asked
    data = dataset.images[0].path.read_bytes()
    while asked:
        try:
            client.segment(data, classes=asked, score_threshold=1.0, request_id="eval-classes")
            return asked
        except RequestFailed as e:
            refused = re.fullmatch(r"classes\[(\d+)\]", e.field or "")
            if e.code != grpc.StatusCode.INVALID_ARGUMENT or refused is None:
                raise
            del asked[int(refused.group(1))]
    return asked


def requests(
    dataset: EvalDataset, prompt: Prompt, score_threshold: float | None, classes: list[str] | None = None
) -> Iterator[pb.SegmentRequest]:
    """``classes``: what a ``classes`` request asks for (default: every category name)."""
    names = list(dataset.categories.values())
    for image in dataset.images:
        data = image.path.read_bytes()
        if prompt is Prompt.BOXES:
            regions = [
                Region(box=(x, y, x + w, y + h), label=dataset.categories[a["category_id"]])
                for a in dataset.annotations(image.id)
                for x, y, w, h in [a["bbox"]]
            ]
            yield segment_request(data, regions=regions, request_id=f"eval-{image.id}")
        elif prompt is Prompt.TEXTS:
            yield segment_request(data, texts=names, score_threshold=score_threshold, request_id=f"eval-{image.id}")
        else:
            asked = names if classes is None else classes
            yield segment_request(data, classes=asked, score_threshold=score_threshold, request_id=f"eval-{image.id}")


def category_of(instance: Instance, prompt: Prompt, dataset: EvalDataset) -> int | None:
    """The dataset category an instance answers: the text it was found for (texts), else its label."""
    return dataset.category_id(instance.text if prompt is Prompt.TEXTS and instance.text else instance.label)


def predict(
    client: Client,
    dataset: EvalDataset,
    prompt: Prompt,
    score_threshold: float | None = None,
    classes: list[str] | None = None,
) -> list[ImagePrediction]:
    """One ImagePrediction per dataset image, in dataset order; ``classes`` as for ``requests``."""
    out = []
    for item in client.segment_many(requests(dataset, prompt, score_threshold, classes)):
        image = dataset.images[item.index]
        if item.result is None:
            out.append(ImagePrediction(image.id, (), str(item.error)))
            continue
        answered = (item.result.width, item.result.height)
        if answered != (image.width, image.height):  # masks of another size match nothing: say so instead
            error = (
                f"the image is {answered[0]}x{answered[1]} as the server reads it (EXIF orientation applied), "
                f"the dataset says {image.width}x{image.height}"
            )
            out.append(ImagePrediction(image.id, (), error))
            continue
        found = tuple(Predicted(i, category_of(i, prompt, dataset)) for i in item.result.instances)
        out.append(ImagePrediction(image.id, found))
    return out
