"""What the pipeline answers: labeled instances with encoded masks (Segment) and cached images (EncodeImage)."""

from __future__ import annotations

import dataclasses

import numpy as np

from service.pipeline.image import DecodedImage
from service.pipeline.review import NOT_REVIEWED, Review
from service.pipeline.vocabulary import TextMatch
from service.processing.masks import EncodedMask

# Where an instance came from: the detector (for a class, a text or exemplars), a region prompt, or the concept
# segmenter (SAM 3, for a text).
DETECTOR, REGION, TEXT, EXEMPLAR, CONCEPT = "detector", "region", "text", "exemplar", "concept"


@dataclasses.dataclass(frozen=True)
class InstanceResult:
    """One labeled instance. box: (4,) float32 original-image pixels XYXY."""

    label: str
    class_id: int
    score: float
    box: np.ndarray
    mask: EncodedMask
    mask_score: float
    source: str  # DETECTOR | REGION | TEXT | EXEMPLAR | CONCEPT
    region_index: int
    text_match: TextMatch | None = None  # for TEXT: which text, and how it matched
    review: Review = NOT_REVIEWED  # whether a person should check it, and why (service.pipeline.review)
    mask_handle: str = ""  # its kept low-res mask (options.keep_masks), for a later region's previous_mask


@dataclasses.dataclass(frozen=True)
class SegmentResult:
    request_id: str
    image: DecodedImage
    instances: list[InstanceResult]
    timings: dict[str, float]  # stage -> seconds
    cached: bool = False  # the image's features came from the embedding cache


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    handle: str
    image: DecodedImage
    cached: bool
    timings: dict[str, float]


def drop_flagged(instances: list[InstanceResult]) -> list[InstanceResult]:
    """The instances review did not flag (a request's ``drop_flagged``)."""
    return [i for i in instances if not i.review.needed]
