"""The concept segmenter's path (SAM 3): a request's texts and exemplars answered by one model, its classes and
regions, if any, by the detector path."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np

from service.errors import Unsupported
from service.pipeline.images import FoundImage, ImageStore
from service.pipeline.prompts import Limits, SegmentQuery, check_box_inside, exemplar_classes, resolve_thresholds
from service.pipeline.results import CONCEPT, REGION, InstanceResult, SegmentResult, drop_flagged
from service.pipeline.review import MaskStats, resolve_review, review
from service.pipeline.stages import stage
from service.pipeline.vocabulary import OPEN, TextMatch
from service.processing.concepts import ConceptProcessing
from service.runners.base import Runner

# The detector path for a checked query whose image has been found already (``Pipeline``).
DetectorPath = Callable[[SegmentQuery, FoundImage], Awaitable[SegmentResult]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConceptPath:
    """SAM 3 answers the texts (one pass for all) and the exemplars (one pass per label; boxes on the request's
    image only); classes and regions, if any, go through ``detector_path``. Instances: detections and concept
    answers by score (at most max_instances per prompt: class, text or exemplar label; at most the server's
    max_instances in all), then regions. SAM 3's masks are its own (no refinement)."""

    runner: Runner
    processing: ConceptProcessing
    images: ImageStore
    limits: Limits
    detector_path: DetectorPath

    async def segment(self, query: SegmentQuery) -> SegmentResult:
        """A checked query with texts or exemplars."""
        start = time.perf_counter()
        for i, e in enumerate(query.exemplars):
            if e.image is not None:
                raise Unsupported(
                    f"exemplars[{i}].image: the concept segmenter (SAM 3) takes example boxes on the request's "
                    "image only"
                )
        timings: dict[str, float] = {}
        found = await self.images.find(query.image, timings)
        image = found.image
        for i, e in enumerate(query.exemplars):
            check_box_inside(e.box, image.width, image.height, f"exemplars[{i}].box")
        rest = dataclasses.replace(query, texts=(), exemplars=())
        instances: list[InstanceResult] = []
        if rest.classes or rest.regions:
            result = await self.detector_path(rest, found)
            instances, timings = result.instances, {**timings, **result.timings}
        classes = exemplar_classes(query.exemplars)
        labels = list(dict.fromkeys(classes))
        w, h = image.width, image.height
        exemplar_boxes = [
            _normalised_cxcywh(
                np.array([e.box for e, c in zip(query.exemplars, classes, strict=True) if c == label], np.float32), w, h
            )
            for label in labels
        ]
        thresholds = resolve_thresholds(query.options, self.limits)
        p_review = resolve_review(query.options.review, self.limits.review)
        with stage(timings, "segment_concepts", texts=len(query.texts), exemplar_labels=len(labels)):
            batch = await asyncio.to_thread(self.processing.preprocess, image.rgb)
            out = await self.runner.segment_concepts(batch, query.texts, exemplar_boxes)
        with stage(timings, "encode_concept_masks"):
            concepts = await asyncio.to_thread(
                self.processing.postprocess,
                boxes=out.boxes,
                logits=out.logits,
                presence=out.presence,
                mask_logits=out.mask_logits,
                hw=(h, w),
                score_threshold=thresholds.score_threshold,
                iou_threshold=thresholds.iou_threshold,
                max_instances=thresholds.max_instances,  # per text and exemplar label
                mask_encoding=query.options.mask_encoding,
                max_total=self.limits.max_instances,
            )
        answers = []
        answered = zip(concepts.boxes, concepts.scores, concepts.text_ids, concepts.masks, strict=True)
        for n, (box, score, k, mask) in enumerate(answered):
            if k < len(query.texts):
                text = query.texts[k]
                label = text
                match = TextMatch(text_index=int(k), text=text, class_id=-1, class_name=text, similarity=1.0, kind=OPEN)
            else:
                label, match = labels[k - len(query.texts)], None
            # The mask rules on SAM 3's own masks: area and parts; no mask score of its own (mask_score is the
            # answer's score, which score_below reads) and no stability (1).
            stats = MaskStats(stability=1.0, area=int(concepts.areas[n]), components=int(concepts.parts[n]))
            flag = review(p_review, score=float(score), mask_score=None, stats=stats, text_match=match)
            answers.append(
                InstanceResult(
                    label=label,
                    class_id=-1,
                    score=float(score),
                    box=box,
                    mask=mask,
                    mask_score=float(score),
                    source=CONCEPT,
                    region_index=-1,
                    text_match=match,
                    review=flag,
                )
            )
        detected = sorted(
            [i for i in instances if i.source != REGION] + answers, key=lambda i: i.score, reverse=True
        )[
            : self.limits.max_instances  # the request's bound, as the detector path's (each prompt has its own)
        ]
        regions = [i for i in instances if i.source == REGION]
        kept = drop_flagged(detected + regions) if query.options.review.drop_flagged else detected + regions
        timings["total"] = time.perf_counter() - start
        return SegmentResult(
            request_id=query.request_id or uuid.uuid4().hex,
            image=image,
            instances=kept,
            timings=timings,
            cached=found.entry is not None,
        )


def _normalised_cxcywh(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 4) float32 XYXY pixels → (K, 4) float32 cxcywh as fractions of the image, in float32 throughout (as
    ultralytics' SAM 3 predictor computes it: equal inputs give SAM 3 bit-equal prompts)."""
    out = np.empty_like(xyxy)
    out[:, 0] = (xyxy[:, 0] + xyxy[:, 2]) / 2
    out[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2
    out[:, 2] = xyxy[:, 2] - xyxy[:, 0]
    out[:, 3] = xyxy[:, 3] - xyxy[:, 1]
    out[:, 0::2] /= np.float32(width)
    out[:, 1::2] /= np.float32(height)
    return out
