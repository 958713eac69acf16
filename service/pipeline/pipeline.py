"""The detect-then-segment orchestration: numpy in, labeled encoded masks out. No transport here."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import uuid

import numpy as np

from service.errors import InvalidInput, NotFound, Unsupported
from service.pipeline.cache import PREFIX, CacheEntry, EmbeddingCache, handle_for
from service.pipeline.detection import Detections, DetectorProcessing
from service.pipeline.image import DecodedImage, ImageLimits, decode_image, image_from_raw
from service.pipeline.masks import EncodedMask, encode_masks
from service.pipeline.prompts import ImageInput, Limits, Plan, SamPrompt, SegmentQuery, check_query, plan
from service.pipeline.refine import refine_mask
from service.pipeline.segmentation import SegmenterProcessing, select_best
from service.pipeline.vocabulary import EmbeddingLRU, TextMatch, VocabularyMatcher, open_matches, open_vocabulary
from service.runners.base import ClassPrompts, DetectorOutput, ImageFeatures, Runner

DETECTOR, REGION, TEXT = "detector", "region", "text"  # where an instance came from
_MASK_CHUNK = 16  # instances upsampled at a time: bounds memory to 16 x H x W floats


@dataclasses.dataclass(frozen=True)
class InstanceResult:
    """One labeled instance. box: (4,) float32 original-image pixels XYXY."""

    label: str
    class_id: int
    score: float
    box: np.ndarray
    mask: EncodedMask
    mask_score: float
    source: str  # DETECTOR | REGION | TEXT
    region_index: int
    text_match: TextMatch | None = None  # for TEXT: which text, and how it matched


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """An instance before its mask: what the answer will say about it, and which SAM prompt gives its mask
    (``mask_index`` into the request's unique prompts: a detection answering two prompts is segmented once)."""

    mask_index: int
    label: str
    class_id: int
    score: float
    source: str  # DETECTOR | REGION | TEXT
    region_index: int = -1
    text_match: TextMatch | None = None


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


class Pipeline:
    """Validates, runs detector and encoder concurrently, decodes all prompts of the image in one batch.

    With a cache, images seen before (same bytes, or their handle) skip decoding and the SAM encoder, and
    the detector too once it has run on them.
    """

    def __init__(
        self,
        runner: Runner,
        image_limits: ImageLimits,
        limits: Limits,
        cache: EmbeddingCache | None = None,
        matcher: VocabularyMatcher | None = None,
        class_embeddings: EmbeddingLRU | None = None,
    ) -> None:
        """``matcher``: maps free text to a closed detector's classes (None: texts are FAILED_PRECONDITION);
        ``class_embeddings``: an open-vocabulary detector's class text features by string (required for one)."""
        self.runner = runner
        self.matcher = matcher
        self.class_embeddings = class_embeddings
        if runner.detector.open_vocabulary and class_embeddings is None:
            raise ValueError("an open-vocabulary detector needs class_embeddings")
        self.image_limits = image_limits
        self.limits = limits
        self.cache = cache if cache is not None else EmbeddingCache(0, 0.0)
        self.detection = DetectorProcessing(runner.detector)
        self.segmentation = SegmenterProcessing(runner.segmenter)

    async def segment(self, query: SegmentQuery) -> SegmentResult:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        check_query(query, self.limits)
        vocabulary, texts, classes = await self._vocabulary(query, timings)
        handle, entry = self._lookup(query)
        if entry is None:
            t = time.perf_counter()
            image = await asyncio.to_thread(self._decode, query, handle)
            timings["decode_image"] = time.perf_counter() - t
        else:
            image = entry.image
        open_vocabulary = self.runner.detector.open_vocabulary
        p = plan(query, self.limits, vocabulary, image.width, image.height, texts, open_vocabulary)

        detect = self._detect(image, p, timings, entry, classes)
        detections_task = asyncio.ensure_future(detect) if p.run_detector else None
        features_task = asyncio.ensure_future(self._encode(image, timings)) if entry is None else None
        try:
            detections, raw = await detections_task if detections_task else (None, None)
            features = await features_task if features_task else entry.features  # type: ignore[union-attr]
        except BaseException:
            for task in (detections_task, features_task):
                if task is not None:
                    task.cancel()
            raise
        key = classes.key if classes is not None else None
        if entry is None:
            self.cache.put(handle, CacheEntry(image, features, {key: raw} if raw is not None else {}))
        elif raw is not None:
            self.cache.add_detector_output(handle, raw, key)

        prompts, candidates = self._candidates(detections, p)
        instances: list[InstanceResult] = []
        if prompts:
            t = time.perf_counter()
            low_res, scores = await self._decode_masks(features, prompts, image, p.multimask)
            timings["decode_masks"] = time.perf_counter() - t
            t = time.perf_counter()
            masks, mask_boxes = await asyncio.to_thread(self._masks, low_res, image, p, prompts)
            timings["encode_masks"] = time.perf_counter() - t
            for c in candidates:
                prompt, k = prompts[c.mask_index], c.mask_index
                box = prompt.box
                if box is None:  # a clicks-only region: its box is the mask's (or the clicks' if the mask is empty)
                    mask_box = mask_boxes[k]
                    box = mask_box if mask_box is not None else _points_box(prompt)
                instances.append(
                    InstanceResult(
                        c.label, c.class_id, c.score, box, masks[k], float(scores[k]), c.source, c.region_index,
                        c.text_match,
                    )
                )  # fmt: skip
        timings["total"] = time.perf_counter() - start
        return SegmentResult(query.request_id or uuid.uuid4().hex, image, instances, timings, entry is not None)

    async def _vocabulary(
        self, query: SegmentQuery, timings: dict[str, float]
    ) -> tuple[tuple[str, ...], list[TextMatch], ClassPrompts | None]:
        """What this request's class ids will index, how its texts are answered, and (open vocabulary) the
        class prompts the detector runs with; before the image is decoded (cheap checks first)."""
        if not self.runner.detector.open_vocabulary:
            texts = await self._match_texts(query, timings) if query.texts else []
            return self.runner.detector.names, texts, None
        names = open_vocabulary(query.classes, query.texts)
        if not names:
            return names, [], None
        assert self.class_embeddings is not None  # built with the pipeline for every open-vocabulary detector
        t = time.perf_counter()
        embeddings = await self.class_embeddings.get(names)
        timings["embed_classes"] = time.perf_counter() - t
        return names, open_matches(query.texts, names), ClassPrompts(names, embeddings)

    async def _match_texts(self, query: SegmentQuery, timings: dict[str, float]) -> list[TextMatch]:
        """The texts' classes by the matcher. Unsupported without one."""
        if self.matcher is None:
            raise Unsupported(
                "texts: free-text prompts need a text encoder and this server has none; serve with "
                "text_encoder=minilm, or send class names (ListModels lists the vocabulary)"
            )
        t = time.perf_counter()
        matches = await self.matcher.match(query.texts, self.runner.detector.names)
        timings["match_texts"] = time.perf_counter() - t
        return matches

    async def encode(self, image_input: ImageInput) -> EncodeResult:
        """Decodes and encodes an image into the cache (EncodeImage); a cached one is only refreshed."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        handle, entry = self._lookup(SegmentQuery(image=image_input))
        if entry is not None:
            timings["total"] = time.perf_counter() - start
            return EncodeResult(handle, entry.image, True, timings)
        t = time.perf_counter()
        image = await asyncio.to_thread(self._decode, SegmentQuery(image=image_input), handle)
        timings["decode_image"] = time.perf_counter() - t
        features = await self._encode(image, timings)
        self.cache.put(handle, CacheEntry(image, features))
        timings["total"] = time.perf_counter() - start
        return EncodeResult(handle, image, False, timings)

    def _lookup(self, query: SegmentQuery) -> tuple[str, CacheEntry | None]:
        """(handle, cached entry or None). A handle that is not cached is NOT_FOUND."""
        handle = query.image.handle
        if handle is not None:
            if not handle.startswith(PREFIX) or len(handle) != len(PREFIX) + 64:
                raise InvalidInput("image.handle: not a handle from EncodeImage (expected 'sha256:' + 64 hex digits)")
            entry = self.cache.get(handle)
            if entry is None:
                raise NotFound(
                    f"image.handle: {handle[:19]}... is unknown or expired (cached images live "
                    f"{self.cache.ttl:.0f} s after last use, fewer under memory pressure); send the image again"
                )
            return handle, entry
        handle = handle_for(hashlib.sha256(query.image.data).hexdigest())
        return handle, self.cache.get(handle)

    def _decode(self, query: SegmentQuery, handle: str) -> DecodedImage:
        """Decodes the request's bytes; ``handle`` carries their digest (hashed once, for the cache lookup)."""
        digest = handle.removeprefix(PREFIX)
        if query.image.raw is not None:
            raw = query.image
            return image_from_raw(raw.raw or b"", raw.width, raw.height, self.image_limits, sha256=digest)
        return decode_image(query.image.encoded or b"", self.image_limits, sha256=digest)

    async def _detect(
        self,
        image: DecodedImage,
        p: Plan,
        timings: dict[str, float],
        entry: CacheEntry | None,
        classes: ClassPrompts | None,
    ) -> tuple[Detections, DetectorOutput]:
        """Detections for the plan's classes, and the detector's raw output (from the cache when there: per
        vocabulary for an open-vocabulary detector)."""
        t = time.perf_counter()
        cached = entry.detector.get(classes.key if classes is not None else None) if entry is not None else None
        if cached is not None:
            output = cached
        else:
            batch = await asyncio.to_thread(self.detection.preprocess, image.rgb)
            output = await self.runner.detect(batch, classes)
        detections = self.detection.postprocess(
            output,
            0,
            (image.height, image.width),
            class_ids=p.class_ids,
            score_threshold=p.score_threshold,
            iou_threshold=p.iou_threshold,
            max_instances=p.max_instances,
        )
        timings["detect"] = time.perf_counter() - t
        return detections, output

    async def _encode(self, image: DecodedImage, timings: dict[str, float]) -> ImageFeatures:
        t = time.perf_counter()
        batch = await asyncio.to_thread(self.segmentation.preprocess, image.rgb)
        features = await self.runner.encode(batch)
        timings["encode"] = time.perf_counter() - t
        return features

    def _candidates(self, detections: Detections | None, p: Plan) -> tuple[list[SamPrompt], list[_Candidate]]:
        """The request's unique SAM prompts (detections in score order, then regions in request order) and its
        instances: per detection, one for the class prompt if it asked for that class, then one per text
        matched to that class (in text order); one per region."""
        names = p.names
        prompts: list[SamPrompt] = []
        out: list[_Candidate] = []
        empty_pts, empty_labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
        if detections is not None:
            for box, score, cid in zip(detections.boxes, detections.scores, detections.class_ids, strict=True):
                k, cid, label = len(prompts), int(cid), names[int(cid)]
                prompts.append(SamPrompt(box=box, points=empty_pts, point_labels=empty_labels))
                if p.class_prompt is None or cid in p.class_prompt:
                    out.append(_Candidate(k, label, cid, float(score), DETECTOR))
                out.extend(
                    _Candidate(k, label, cid, float(score), TEXT, text_match=m) for m in p.texts if m.class_id == cid
                )
        for i, (prompt, label) in enumerate(zip(p.regions, p.region_labels, strict=True)):
            out.append(_Candidate(len(prompts), label, -1, 1.0, REGION, region_index=i))
            prompts.append(prompt)
        return prompts, out

    async def _decode_masks(
        self, features: ImageFeatures, prompts: list[SamPrompt], image: DecodedImage, multimask: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """All prompts of the image, one decoder call per prompt shape. Returns (N, s, s) logits, (N,) scores."""
        s = self.runner.segmenter.image_size // 4
        low_res = np.zeros((len(prompts), s, s), np.float32)
        scores = np.zeros((len(prompts),), np.float32)
        hw = (image.height, image.width)
        for indices, batch in self.segmentation.prompt_batches(prompts, hw, multimask):
            out = await self.runner.decode(features.select(0), batch)
            masks, ious = select_best(out.low_res_masks, out.iou_predictions)
            low_res[indices], scores[indices] = masks, ious
        return low_res, scores

    def _masks(
        self, low_res: np.ndarray, image: DecodedImage, p: Plan, prompts: list[SamPrompt]
    ) -> tuple[list[EncodedMask], list[np.ndarray | None]]:
        """Upsample, threshold, refine and encode in chunks, one mask per prompt. Returns the encoded masks and,
        for clicks-only prompts, the refined mask's XYXY box (None if empty, and for every other prompt)."""
        hw = (image.height, image.width)
        out: list[EncodedMask] = []
        boxes: list[np.ndarray | None] = []
        for i in range(0, low_res.shape[0], _MASK_CHUNK):
            masks = self.segmentation.postprocess(low_res[i : i + _MASK_CHUNK], hw)
            chunk = prompts[i : i + _MASK_CHUNK]
            if p.refinement.active:
                for mask, prompt in zip(masks, chunk, strict=True):
                    refine_mask(mask, prompt.box, p.refinement)
            out.extend(encode_masks(masks, p.mask_encoding))
            boxes.extend(_mask_box(m) if q.box is None else None for m, q in zip(masks, chunk, strict=True))
        return out, boxes


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool → XYXY pixel-edge box around the mask, or None when empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not len(cols):
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _points_box(prompt: SamPrompt) -> np.ndarray:
    """Box around the positive clicks of a points-only region (the frame's reference, not a mask bound)."""
    pts = prompt.points[prompt.point_labels == 1]
    pts = pts if len(pts) else prompt.points
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)]).astype(np.float32)
