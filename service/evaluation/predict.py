"""A dataset through the service: one request per image with the prompts the dataset implies.

- ``classes``: the dataset's category names as ``classes`` (a closed detector must know them; an open one
  takes any names);
- ``texts``: the category names as free ``texts`` (each instance answers the text it was found for);
- ``boxes``: every ground-truth box as a region prompt labelled with its category (SAM's masks alone: the
  detector is skipped, so the figures measure segmentation given perfect boxes).

Requests go over one StreamSegment call (the server bounds how many are in flight).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator

from service.client import Client, Instance, Region, segment_request
from service.evaluation.dataset import EvalDataset
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


def requests(dataset: EvalDataset, prompt: Prompt, score_threshold: float | None) -> Iterator[pb.SegmentRequest]:
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
            yield segment_request(data, classes=names, score_threshold=score_threshold, request_id=f"eval-{image.id}")


def category_of(instance: Instance, prompt: Prompt, dataset: EvalDataset) -> int | None:
    """The dataset category an instance answers: the text it was found for (texts), else its label."""
    return dataset.category_id(instance.text if prompt is Prompt.TEXTS and instance.text else instance.label)


def predict(
    client: Client, dataset: EvalDataset, prompt: Prompt, score_threshold: float | None = None
) -> list[ImagePrediction]:
    """One ImagePrediction per dataset image, in dataset order."""
    out = []
    for item in client.segment_many(requests(dataset, prompt, score_threshold)):
        image = dataset.images[item.index]
        if item.result is None:
            out.append(ImagePrediction(image.id, (), str(item.error)))
            continue
        found = tuple(Predicted(i, category_of(i, prompt, dataset)) for i in item.result.instances)
        out.append(ImagePrediction(image.id, found))
    return out
