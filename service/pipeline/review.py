"""Review routing: which instances a person should check, and why (pure, numpy in / dataclasses out).

Rules (each off at 0), server defaults from Settings, overridable per request (SegmentOptions.review):
- ``LOW_SCORE``: the detector's score is under ``score_below`` (detections, text, exemplar and concept answers;
  a caller's region has no detector score).
- ``LOW_MASK_SCORE``: SAM's predicted mask IoU is under ``mask_score_below`` (SAM 2 masks).
- ``UNSTABLE_MASK``: SAM's stability score is under ``stability_below``: the IoU between the mask thresholded
  at logit +1 and at logit -1 (``processing.upsampling.STABILITY_OFFSET``), as SAM's automatic mask generator
  computes it (``calculate_stability_score``) on the upsampled logits; a mask that changes with the threshold is
  uncertain.
- ``TINY_MASK``: fewer than ``min_mask_area`` pixels.
- ``FRAGMENTED_MASK``: more than ``max_mask_components`` connected parts (8-connectivity).
- ``WEAK_TEXT_MATCH``: a free text answered by a class whose name is less similar than
  ``text_similarity_below`` (closed detectors' embedding matches; exact and open-vocabulary answers are 1).
"""

from __future__ import annotations

import dataclasses
import enum
from types import EllipsisType

import cv2
import numpy as np

from service.errors import InvalidInput
from service.pipeline.vocabulary import TextMatch
from service.processing.masks import Bounds, mask_bounds


class Reason(enum.Enum):
    """Why an instance needs review; the proto's ReviewReason is ``REVIEW_REASON_<name>``, the value its
    lower-case name as clients and exports spell it."""

    LOW_SCORE = "low_score"
    LOW_MASK_SCORE = "low_mask_score"
    UNSTABLE_MASK = "unstable_mask"
    TINY_MASK = "tiny_mask"
    FRAGMENTED_MASK = "fragmented_mask"
    WEAK_TEXT_MATCH = "weak_text_match"


@dataclasses.dataclass(frozen=True)
class ReviewRules:
    """Thresholds of the rules (0 = rule off). Scores in [0, 1]; areas in pixels; components a count."""

    score_below: float
    mask_score_below: float
    stability_below: float
    min_mask_area: int
    max_mask_components: int
    text_similarity_below: float


@dataclasses.dataclass(frozen=True)
class ReviewOptions:
    """A request's rules; None = the server default. ``drop_flagged``: leave flagged instances out."""

    score_below: float | None = None
    mask_score_below: float | None = None
    stability_below: float | None = None
    min_mask_area: int | None = None
    max_mask_components: int | None = None
    text_similarity_below: float | None = None
    drop_flagged: bool = False


@dataclasses.dataclass(frozen=True)
class MaskStats:
    """What the rules read from one final mask: SAM's stability score (1.0 when not computed), pixel area and
    number of connected parts."""

    stability: float
    area: int
    components: int


@dataclasses.dataclass(frozen=True)
class Review:
    reasons: tuple[Reason, ...]
    stability: float

    @property
    def needed(self) -> bool:
        return bool(self.reasons)


NOT_REVIEWED = Review((), 1.0)


def resolve_review(asked: ReviewOptions, defaults: ReviewRules) -> ReviewRules:
    """The request's rules, unset fields taking the server's; InvalidInput naming a field out of range."""
    values = {}
    for field in dataclasses.fields(ReviewRules):
        mine = getattr(asked, field.name)
        value = getattr(defaults, field.name) if mine is None else mine
        if field.type in ("int", int):
            if value < 0:
                raise InvalidInput(f"options.review.{field.name}: {value} must be >= 0 (0 = rule off)")
        elif not 0.0 <= value <= 1.0:
            raise InvalidInput(f"options.review.{field.name}: {value} is outside [0, 1] (0 = rule off)")
        values[field.name] = value
    return ReviewRules(**values)


def mask_stats(mask: np.ndarray, stability: float, bounds: Bounds | None | EllipsisType = ...) -> MaskStats:
    """(H, W) bool final mask → its area and 8-connected part count, with the stability score given.

    ``bounds``: the window of its set pixels (``masks.mask_bounds``; None = empty), when known: only it is read."""
    if bounds is ...:
        bounds = mask_bounds(mask)
    if bounds is None:
        return MaskStats(stability=stability, area=0, components=0)
    crop = np.ascontiguousarray(bounds.crop(mask)).view(np.uint8)
    components = cv2.connectedComponents(crop, connectivity=8)[0] - 1
    return MaskStats(stability=stability, area=int(np.count_nonzero(crop)), components=int(components))


def review(
    rules: ReviewRules,
    *,
    score: float | None,
    mask_score: float | None,
    stats: MaskStats | None,
    text_match: TextMatch | None,
) -> Review:
    """The rules that fire for one instance. ``score`` None: no detector score (a caller's region);
    ``mask_score`` / ``stats`` None: no SAM mask score / mask statistics (concept answers: SAM 3's own masks)."""
    reasons = []
    if rules.score_below and score is not None and score < rules.score_below:
        reasons.append(Reason.LOW_SCORE)
    if rules.mask_score_below and mask_score is not None and mask_score < rules.mask_score_below:
        reasons.append(Reason.LOW_MASK_SCORE)
    if stats is not None:
        if rules.stability_below and stats.stability < rules.stability_below:
            reasons.append(Reason.UNSTABLE_MASK)
        if rules.min_mask_area and stats.area < rules.min_mask_area:
            reasons.append(Reason.TINY_MASK)
        if rules.max_mask_components and stats.components > rules.max_mask_components:
            reasons.append(Reason.FRAGMENTED_MASK)
    if rules.text_similarity_below and text_match is not None and text_match.similarity < rules.text_similarity_below:
        reasons.append(Reason.WEAK_TEXT_MATCH)
    return Review(tuple(reasons), stats.stability if stats is not None else 1.0)
