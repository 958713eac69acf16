"""The detect-then-segment orchestration: numpy in, labeled encoded masks out. No transport here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Hashable
from typing import Any

import numpy as np

from service.errors import InvalidInput, NotFound, Unsupported
from service.models.tensors import ClassPrompts, DetectorOutput, ImageFeatures
from service.pipeline.cache import PREFIX, CacheEntry, EmbeddingCache, SharedTier, handle_for
from service.pipeline.image import DecodedImage, ImageLimits, decode_image, image_from_raw
from service.pipeline.lru import LRU
from service.pipeline.prompts import (
    Exemplar,
    ImageInput,
    Limits,
    Plan,
    SamPrompt,
    SegmentQuery,
    check_box_inside,
    check_query,
    plan,
    resolve_thresholds,
)
from service.pipeline.refine import refine_mask
from service.pipeline.review import NOT_REVIEWED, MaskStats, Review, mask_stats, resolve_review, review
from service.pipeline.stages import stage
from service.pipeline.vocabulary import (
    OPEN,
    EmbeddingLRU,
    TextMatch,
    VocabularyMatcher,
    open_matches,
    request_vocabulary,
)
from service.processing.concepts import ConceptProcessing
from service.processing.detection import Detections, DetectorProcessing
from service.processing.masks import Bounds, EncodedMask, encode_masks, mask_bounds
from service.processing.segmentation import BestMasks, SegmenterProcessing
from service.runners.base import Runner

# Where an instance came from: the detector (for a class, a text or exemplars), a region prompt, or the concept
# segmenter (SAM 3, for a text).
DETECTOR, REGION, TEXT, EXEMPLAR, CONCEPT = "detector", "region", "text", "exemplar", "concept"
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
    source: str  # DETECTOR | REGION | TEXT | EXEMPLAR | CONCEPT
    region_index: int
    text_match: TextMatch | None = None  # for TEXT: which text, and how it matched
    review: Review = NOT_REVIEWED  # whether a person should check it, and why (service.pipeline.review)


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """An instance before its mask: what the answer will say about it, and which SAM prompt gives its mask
    (``mask_index`` into the request's unique prompts: a detection answering two prompts is segmented once)."""

    mask_index: int
    label: str
    class_id: int
    score: float
    source: str  # DETECTOR | REGION | TEXT | EXEMPLAR
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
class FoundImage:
    """A request's image by its cache handle: the cached entry (None: not cached) and the decoded image."""

    handle: str
    entry: CacheEntry | None
    image: DecodedImage


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
        exemplar_embeddings: LRU[tuple[object, ...], np.ndarray] | None = None,
        shared: SharedTier | None = None,
        mask_threads: int = 1,
    ) -> None:
        """``matcher``: maps free text to a closed detector's classes (None: texts are FAILED_PRECONDITION);
        ``class_embeddings``: an open-vocabulary detector's class embeddings of texts, by string (required for one);
        ``exemplar_embeddings``: exemplar embeddings by (image, boxes, classes), reused while the same exemplars
        come back (None: none kept); ``mask_threads``: threads refining and encoding a request's masks."""
        self.runner = runner
        self.matcher = matcher
        self.class_embeddings = class_embeddings
        self.exemplar_embeddings = exemplar_embeddings if exemplar_embeddings is not None else LRU(0)
        if runner.detector.open_vocabulary and class_embeddings is None:
            raise ValueError("an open-vocabulary detector needs class_embeddings")
        self.image_limits = image_limits
        self.limits = limits
        self.cache = cache if cache is not None else EmbeddingCache(0, 0.0)
        self.shared = shared
        self.detection = DetectorProcessing(runner.detector)
        concepts = runner.concepts
        self.concept_processing = (
            ConceptProcessing(concepts.image_size, concepts.mask_threshold) if concepts is not None else None
        )
        self.segmentation = SegmenterProcessing(runner.segmenter)
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(mask_threads, thread_name_prefix="masks")

    async def segment(self, query: SegmentQuery) -> SegmentResult:
        """With a concept segmenter (SAM 3) the texts and exemplars go to it, the rest of the request to the
        detector."""
        check_query(query, self.limits)
        if (query.texts or query.exemplars) and self.concept_processing is not None:
            return await self._segment_with_concepts(query, self.concept_processing)
        return await self._segment(query)

    async def _segment_with_concepts(self, query: SegmentQuery, processing: ConceptProcessing) -> SegmentResult:
        """SAM 3 answers the texts (one pass for all) and the exemplars (one pass per label; boxes on the request's
        image only); classes and regions, if any, go through the detector path. Instances: detections and
        concept answers by score (at most max_instances), then regions. SAM 3's masks are its own (no refinement)."""
        start = time.perf_counter()
        for i, e in enumerate(query.exemplars):
            if e.image is not None:
                raise Unsupported(
                    f"exemplars[{i}].image: the concept segmenter (SAM 3) takes example boxes on the request's "
                    "image only"
                )
        timings: dict[str, float] = {}
        found = await self._find(query.image, timings)
        image = found.image
        for i, e in enumerate(query.exemplars):
            check_box_inside(e.box, image.width, image.height, f"exemplars[{i}].box")
        rest = dataclasses.replace(query, texts=(), exemplars=())
        instances: list[InstanceResult] = []
        if rest.classes or rest.regions:
            result = await self._segment(rest, found)
            instances, timings = result.instances, {**timings, **result.timings}
        labels = list(dict.fromkeys(e.class_name for e in query.exemplars))
        w, h = image.width, image.height
        exemplar_boxes = [
            _normalised_cxcywh(np.array([e.box for e in query.exemplars if e.class_name == label], np.float32), w, h)
            for label in labels
        ]
        thresholds = resolve_thresholds(query.options, self.limits)
        p_review = resolve_review(query.options.review, self.limits.review)
        with stage(timings, "segment_concepts", texts=len(query.texts), exemplar_labels=len(labels)):
            batch = await asyncio.to_thread(processing.preprocess, image.rgb)
            out = await self.runner.segment_concepts(batch, query.texts, exemplar_boxes)
        with stage(timings, "encode_concept_masks"):
            concepts = await asyncio.to_thread(
                processing.postprocess,
                out.boxes, out.logits, out.presence, out.mask_logits, (h, w),
                thresholds.score_threshold, thresholds.iou_threshold, thresholds.max_instances,
                query.options.mask_encoding,
            )  # fmt: skip
        answers = []
        for box, score, k, mask in zip(concepts.boxes, concepts.scores, concepts.text_ids, concepts.masks, strict=True):
            if k < len(query.texts):
                label, match = query.texts[k], TextMatch(int(k), query.texts[k], -1, query.texts[k], 1.0, OPEN)
            else:
                label, match = labels[k - len(query.texts)], None
            flag = review(p_review, score=float(score), mask_score=None, stats=None, text_match=match)
            answers.append(InstanceResult(label, -1, float(score), box, mask, float(score), CONCEPT, -1, match, flag))
        detected = sorted([i for i in instances if i.source != REGION] + answers, key=lambda i: i.score, reverse=True)[
            : thresholds.max_instances
        ]
        regions = [i for i in instances if i.source == REGION]
        kept = _drop_flagged(detected + regions) if query.options.review.drop_flagged else detected + regions
        timings["total"] = time.perf_counter() - start
        request_id = query.request_id or uuid.uuid4().hex
        return SegmentResult(request_id, image, kept, timings, found.entry is not None)

    async def _segment(self, query: SegmentQuery, found: FoundImage | None = None) -> SegmentResult:
        """The detector and SAM 2 path for a checked query. ``found``: the request's image when the caller has
        looked it up (and decoded it) already."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        vocabulary, texts, text_embeddings = await self._vocabulary(query, timings)
        if found is None:
            found = await self._find(query.image, timings)
        handle, entry, image = found.handle, found.entry, found.image
        open_vocabulary = self.runner.detector.open_vocabulary
        p = plan(query, self.limits, vocabulary, image.width, image.height, texts, open_vocabulary)

        references = await asyncio.to_thread(self._reference_images, query.exemplars)  # checked before models run
        detections_task = (
            asyncio.ensure_future(self._detect(image, p, timings, entry, text_embeddings, query.exemplars, references))
            if p.run_detector
            else None
        )
        features_task = asyncio.ensure_future(self._encode(image, timings)) if entry is None else None
        try:
            detections, raw, key = await detections_task if detections_task else (None, None, None)
            features = await features_task if features_task else entry.features  # type: ignore[union-attr]
        except BaseException:
            for task in (detections_task, features_task):
                if task is not None:
                    task.cancel()
            raise
        if entry is None:
            fresh = CacheEntry(image, features, {key: raw} if raw is not None else {})
            self.cache.put(handle, fresh)
            if self.shared is not None:
                await asyncio.to_thread(self.shared.put, handle, fresh)
        elif raw is not None:
            self.cache.add_detector_output(handle, raw, key)
            if self.shared is not None:
                await asyncio.to_thread(self.shared.add_detector_output, handle, raw, key)

        prompts, candidates = self._candidates(detections, p)
        instances: list[InstanceResult] = []
        if prompts:
            with stage(timings, "decode_masks", prompts=len(prompts)):
                low_res, scores = await self._decode_masks(features, prompts, image, p.multimask)
            with stage(timings, "encode_masks", masks=len(prompts)):
                final = await asyncio.to_thread(self._masks, low_res, image, p, prompts)
            for c in candidates:
                prompt, k = prompts[c.mask_index], c.mask_index
                box = prompt.box
                if box is None:  # a clicks-only region: its box is the mask's (or the clicks' if the mask is empty)
                    mask_box = final.boxes[k]
                    box = mask_box if mask_box is not None else _points_box(prompt)
                flag = review(
                    p.review, score=None if c.source == REGION else c.score, mask_score=float(scores[k]),
                    stats=final.stats[k], text_match=c.text_match,
                )  # fmt: skip
                instances.append(
                    InstanceResult(
                        c.label, c.class_id, c.score, box, final.encoded[k], float(scores[k]), c.source,
                        c.region_index, c.text_match, flag,
                    )
                )  # fmt: skip
            if p.drop_flagged:
                instances = _drop_flagged(instances)
        timings["total"] = time.perf_counter() - start
        return SegmentResult(query.request_id or uuid.uuid4().hex, image, instances, timings, entry is not None)

    async def _vocabulary(
        self, query: SegmentQuery, timings: dict[str, float]
    ) -> tuple[tuple[str, ...], list[TextMatch], np.ndarray | None]:
        """What this request's class ids index (before its exemplars' classes), how its texts are answered, and
        (open vocabulary) those names' class embeddings (N, class_dim); before the image is decoded."""
        if not self.runner.detector.open_vocabulary:
            if query.exemplars:
                raise Unsupported(
                    "exemplars: they need an open-vocabulary detector (YOLOE) and this server's has a fixed "
                    "vocabulary; send class names or texts"
                )
            texts = await self._match_texts(query, timings) if query.texts else []
            return self.runner.detector.names, texts, None
        if query.exemplars and not self.runner.detector.visual_prompts:
            raise Unsupported(
                "exemplars: this server's open-vocabulary detector takes texts only (YOLO-World); exemplars need "
                "one that takes visual prompts (YOLOE)"
            )
        names = request_vocabulary(query.classes, query.texts)
        if not names:
            return names, [], np.zeros((0, self.runner.detector.class_dim), np.float32)
        assert self.class_embeddings is not None  # built with the pipeline for every open-vocabulary detector
        with stage(timings, "embed_classes", classes=len(names)):
            embeddings = await self.class_embeddings.get(names)
        return names, open_matches(query.texts, names), embeddings

    async def _match_texts(self, query: SegmentQuery, timings: dict[str, float]) -> list[TextMatch]:
        """The texts' classes by the matcher. Unsupported without one."""
        if self.matcher is None:
            raise Unsupported(
                "texts: free-text prompts need a text encoder and this server has none; serve with "
                "text_encoder=minilm, or send class names (ListModels lists the vocabulary)"
            )
        with stage(timings, "match_texts", texts=len(query.texts)):
            matches = await self.matcher.match(query.texts, self.runner.detector.names)
        return matches

    async def encode(self, image_input: ImageInput) -> EncodeResult:
        """Decodes and encodes an image into the cache (EncodeImage); a cached one is only refreshed."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        found = await self._find(image_input, timings)
        handle, image = found.handle, found.image
        if found.entry is not None:
            timings["total"] = time.perf_counter() - start
            return EncodeResult(handle, image, True, timings)
        features = await self._encode(image, timings)
        entry = CacheEntry(image, features)
        self.cache.put(handle, entry)
        if self.shared is not None:  # before answering: the handle must work on every replica at once
            await asyncio.to_thread(self.shared.put, handle, entry)
        timings["total"] = time.perf_counter() - start
        return EncodeResult(handle, image, False, timings)

    async def _find(self, image_input: ImageInput, timings: dict[str, float]) -> FoundImage:
        """The request's image: from the cache (bytes or handle), else decoded (timed as "decode_image")."""
        if self.shared is None:
            handle, entry = self._lookup(image_input)
        else:  # the shared tier is a network call
            handle, entry = await asyncio.to_thread(self._lookup, image_input)
        if entry is not None:
            return FoundImage(handle, entry, entry.image)
        with stage(timings, "decode_image", bytes=len(image_input.data)) as span:
            image = await asyncio.to_thread(self._decode, image_input, handle)
            span.set_attributes({"image.width": image.width, "image.height": image.height})
        return FoundImage(handle, None, image)

    def _lookup(self, image: ImageInput, field: str = "image") -> tuple[str, CacheEntry | None]:
        """(handle, cached entry or None) of an image given by bytes or handle; the handle of bytes is their
        content hash, so bytes and their handle are the same image. A handle that is not cached is NOT_FOUND.
        Looks in the shared tier (blocking) after a miss in this replica's cache."""
        handle = image.handle
        if handle is not None:
            if not handle.startswith(PREFIX) or len(handle) != len(PREFIX) + 64:
                raise InvalidInput(
                    f"{field}.handle: not a handle from EncodeImage (expected 'sha256:' + 64 hex digits)"
                )
            entry = self._cached(handle)
            if entry is None:
                raise NotFound(
                    f"{field}.handle: {handle[:19]}... is unknown or expired (cached images live "
                    f"{self.cache.ttl:.0f} s after last use, fewer under memory pressure); send the image again"
                )
            return handle, entry
        handle = handle_for(hashlib.sha256(image.data).hexdigest())
        return handle, self._cached(handle)

    def _cached(self, handle: str) -> CacheEntry | None:
        """This replica's entry, else the shared tier's (then kept here too), else None."""
        entry = self.cache.get(handle)
        if entry is None and self.shared is not None:
            entry = self.shared.get(handle)
            if entry is not None:
                self.cache.put(handle, entry)
        return entry

    def _decode(self, image: ImageInput, handle: str, field: str = "image") -> DecodedImage:
        """Decodes an image's bytes; ``handle`` carries their digest (hashed once, for the cache lookup)."""
        digest = handle.removeprefix(PREFIX)
        if image.raw is not None:
            return image_from_raw(image.raw, image.width, image.height, self.image_limits, digest, f"{field}.raw")
        return decode_image(image.encoded or b"", self.image_limits, f"{field}.encoded", sha256=digest)

    async def _detect(
        self,
        image: DecodedImage,
        p: Plan,
        timings: dict[str, float],
        entry: CacheEntry | None,
        text_embeddings: np.ndarray | None,
        exemplars: tuple[Exemplar, ...],
        references: list[DecodedImage | None],
    ) -> tuple[Detections, DetectorOutput, Hashable]:
        """Detections for the plan's classes, the detector's raw output (from the cache when there: per
        vocabulary for an open-vocabulary detector) and its cache key. ``text_embeddings``: the open-vocabulary
        text classes' embeddings (None for a closed detector); exemplars are embedded here."""
        with stage(timings, "detect") as span:
            batch = None
            classes = None
            if text_embeddings is not None:
                embeddings = text_embeddings
                if exemplars:
                    with stage(timings, "embed_exemplars", exemplars=len(exemplars)):
                        batch = await asyncio.to_thread(self.detection.preprocess, image.rgb)
                        exemplar_classes = p.names[p.exemplar_start :]
                        visual = await self._exemplar_embeddings(exemplars, exemplar_classes, image, batch, references)
                    embeddings = np.concatenate([text_embeddings, visual])
                classes = ClassPrompts(p.names, embeddings)
            key = classes.key if classes is not None else None
            cached = entry.detector.get(key) if entry is not None else None
            if cached is not None:
                output = cached
            else:
                if batch is None:
                    batch = await asyncio.to_thread(self.detection.preprocess, image.rgb)
                output = await self.runner.detect(batch, classes)
            detections = self.detection.postprocess(
                output,
                0,
                (image.height, image.width),
                class_ids=p.class_ids,
                score_threshold=p.score_threshold,
                iou_threshold=p.iou_threshold,
                max_instances=p.max_instances,  # per prompt
                max_total=self.limits.max_instances,  # per request, highest scores first
            )
            span.set_attributes({"cache_hit": cached is not None, "detections": len(detections.boxes)})
        return detections, output, key

    async def _exemplar_embeddings(
        self,
        exemplars: tuple[Exemplar, ...],
        classes: tuple[str, ...],
        image: DecodedImage,
        batch: np.ndarray,
        references: list[DecodedImage | None],
    ) -> np.ndarray:
        """(len(classes), class_dim) float32: each exemplar class's visual-prompt embedding, averaged over the
        images its boxes are on (one detector pass per image) and L2-normalised. ``batch``: ``image``
        letterboxed; ``references``: each exemplar's own image (None: the request's)."""
        by_image: dict[str, list[int]] = {}
        for i, ref in enumerate(references):
            by_image.setdefault(ref.sha256 if ref is not None else "", []).append(i)
        total = np.zeros((len(classes), self.runner.detector.class_dim), np.float32)
        for source, indices in by_image.items():
            ref = references[indices[0]] or image
            names = [exemplars[i].class_name for i in indices]
            local = list(dict.fromkeys(names))
            boxes = np.array([exemplars[i].box for i in indices], np.float32)
            ids = np.array([local.index(n) for n in names])
            key = (ref.sha256, boxes.tobytes(), ids.tobytes(), len(local))
            embedded = self.exemplar_embeddings.get(key)
            if embedded is None:  # a catalog photo's exemplar is embedded once, then reused
                ref_batch = batch if not source else await asyncio.to_thread(self.detection.preprocess, ref.rgb)
                visuals = self.detection.exemplar_visuals(boxes, ids, (ref.height, ref.width))
                embedded = await self.runner.embed_exemplars(ref_batch, visuals)
                self.exemplar_embeddings.put(key, embedded)
            for k, name in enumerate(local):
                total[classes.index(name)] += embedded[k]
        return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)

    def _reference_images(self, exemplars: tuple[Exemplar, ...]) -> list[DecodedImage | None]:
        """Each exemplar's own image (None: the request's), found or decoded as the request's image is, each
        distinct image once, with every box checked against its image."""
        decoded: dict[str, DecodedImage] = {}
        out: list[DecodedImage | None] = []
        for i, e in enumerate(exemplars):
            if e.image is None:
                out.append(None)
                continue
            field = f"exemplars[{i}].image"
            handle, entry = self._lookup(e.image, field)
            if handle not in decoded:
                decoded[handle] = entry.image if entry is not None else self._decode(e.image, handle, field)
            ref = decoded[handle]
            check_box_inside(e.box, ref.width, ref.height, f"exemplars[{i}].box")
            out.append(ref)
        return out

    async def _encode(self, image: DecodedImage, timings: dict[str, float]) -> ImageFeatures:
        with stage(timings, "encode"):
            batch = await asyncio.to_thread(self.segmentation.preprocess, image.rgb)
            features = await self.runner.encode(batch)
        return features

    def _candidates(self, detections: Detections | None, p: Plan) -> tuple[list[SamPrompt], list[_Candidate]]:
        """The request's unique SAM prompts (detections' distinct boxes in score order, then regions in request
        order) and its instances: per detection, one for the class prompt if it asked for that class, then one per
        text matched to that class (in text order); one per region. Detections with the same box (one box answering
        several open-vocabulary classes) share one SAM prompt, so one mask."""
        names = p.names
        prompts: list[SamPrompt] = []
        out: list[_Candidate] = []
        empty_pts, empty_labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
        if detections is not None:
            by_box: dict[bytes, int] = {}  # a box's bytes -> its SAM prompt's index
            for box, score, cid in zip(detections.boxes, detections.scores, detections.class_ids, strict=True):
                k, cid, label = by_box.setdefault(box.tobytes(), len(prompts)), int(cid), names[int(cid)]
                if k == len(prompts):
                    prompts.append(SamPrompt(box=box, points=empty_pts, point_labels=empty_labels))
                if cid >= p.exemplar_start:
                    out.append(_Candidate(k, label, cid, float(score), EXEMPLAR))
                elif p.class_prompt is None or cid in p.class_prompt:
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
    ) -> tuple[Any, np.ndarray]:
        """All prompts of the image, one decoder call per prompt shape. Returns (N, s, s) logits (numpy, or a tensor
        on the device of a device-resident runner), (N,) scores."""
        best = BestMasks(len(prompts), self.runner.segmenter.image_size // 4)
        hw = (image.height, image.width)
        for indices, batch in self.segmentation.prompt_batches(prompts, hw, multimask):
            best.add(indices, await self.runner.decode(features.select(0), batch))
        return best.low_res, best.scores

    def _masks(self, low_res: Any, image: DecodedImage, p: Plan, prompts: list[SamPrompt]) -> FinalMasks:
        """Upsample, threshold, refine and encode in chunks, one mask per prompt, with what review reads."""
        hw = (image.height, image.width)
        final = FinalMasks([], [], [])
        for i in range(0, low_res.shape[0], _MASK_CHUNK):
            up = self.segmentation.postprocess(low_res[i : i + _MASK_CHUNK], hw)
            chunk = prompts[i : i + _MASK_CHUNK]
            # Masks are finished on the mask pool (OpenCV and most of numpy release the GIL while they work).
            finished = self._mask_pool.map(
                lambda m, q, s: _finish_mask(m, q, float(s), p), up.masks, chunk, up.stability
            )
            for encoded, box, stats in finished:
                final.encoded.append(encoded)
                final.boxes.append(box)
                final.stats.append(stats)
        return final


def _finish_mask(
    mask: np.ndarray, prompt: SamPrompt, stability: float, p: Plan
) -> tuple[EncodedMask, np.ndarray | None, MaskStats]:
    """One upsampled (H, W) bool mask → refined in place, encoded, its box (clicks-only prompts) and review stats.

    Everything after the refinement reads only the mask's window of set pixels (``mask_bounds``): the same results
    as reading the frame, and a small object on a large image costs its own size."""
    window = refine_mask(mask, prompt.box, p.refinement) if p.refinement.active else None
    bounds = mask_bounds(mask, window)
    (encoded,) = encode_masks(mask[None], p.mask_encoding, [bounds])
    box = _bounds_box(bounds) if prompt.box is None else None
    return encoded, box, mask_stats(mask, stability, bounds)


@dataclasses.dataclass(frozen=True)
class FinalMasks:
    """Per SAM prompt: the encoded final mask; for clicks-only prompts the mask's XYXY box (None if empty, and
    for every other prompt); the mask's stability, area and parts (review)."""

    encoded: list[EncodedMask]
    boxes: list[np.ndarray | None]
    stats: list[MaskStats]


def _drop_flagged(instances: list[InstanceResult]) -> list[InstanceResult]:
    return [i for i in instances if not i.review.needed]


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


def _bounds_box(bounds: Bounds | None) -> np.ndarray | None:
    """A mask's tight window (``mask_bounds``) → its XYXY pixel-edge box, or None when the mask is empty."""
    if bounds is None:
        return None
    return np.array([bounds.x0, bounds.y0, bounds.x1, bounds.y1], dtype=np.float32)


def _points_box(prompt: SamPrompt) -> np.ndarray:
    """Box around the positive clicks of a points-only region (the frame's reference, not a mask bound)."""
    pts = prompt.points[prompt.point_labels == 1]
    pts = pts if len(pts) else prompt.points
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)]).astype(np.float32)
