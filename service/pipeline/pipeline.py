"""The detect-then-segment orchestration: numpy in, labeled encoded masks out. No transport here.

Its collaborators: the request's images (``images.ImageStore``: cache tiers, decoding), the concept segmenter's
path (``concept_path``), the mask stages (``masking``); the answers are ``results``' dataclasses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from typing import Any

import numpy as np

from service.errors import InvalidInput, Unsupported
from service.models.tensors import ImageFeatures
from service.pipeline.cache import CacheEntry
from service.pipeline.concept_path import ConceptPath
from service.pipeline.detect import DetectStage
from service.pipeline.image import DecodedImage
from service.pipeline.images import FoundImage, ImageStore
from service.pipeline.lru import LRU
from service.pipeline.masking import Masks, points_box
from service.pipeline.phrases import PhraseReader
from service.pipeline.prompts import (
    ImageInput,
    Limits,
    Plan,
    SamPrompt,
    SegmentQuery,
    check_inside,
    check_query,
    kept_mask_handle,
    plan,
    resolve_classes,
)
from service.pipeline.results import (
    DETECTOR,
    EXEMPLAR,
    REGION,
    TEXT,
    EncodeResult,
    InstanceResult,
    SegmentResult,
)
from service.pipeline.review import Review, review
from service.pipeline.stages import stage
from service.pipeline.vocabulary import (
    OPEN,
    EmbeddingLRU,
    TextMatch,
    VocabularyMatcher,
    open_matches,
    request_vocabulary,
)
from service.printable import normalise_class_name
from service.processing.concepts import ConceptProcessing
from service.processing.detection import Detections
from service.processing.masks import EncodedMask
from service.processing.segmentation import SegmenterProcessing
from service.runners.base import Runner


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

    def instance(
        self, *, box: np.ndarray, mask: EncodedMask, mask_score: float, review: Review, mask_handle: str = ""
    ) -> InstanceResult:
        """This candidate with its mask (and the handle of its kept low-res mask, if kept)."""
        return InstanceResult(
            label=self.label,
            class_id=self.class_id,
            score=self.score,
            box=box,
            mask=mask,
            mask_score=mask_score,
            source=self.source,
            region_index=self.region_index,
            text_match=self.text_match,
            review=review,
            mask_handle=mask_handle,
        )


@dataclasses.dataclass(frozen=True)
class Candidates:
    """A request's unique SAM prompts and its instances before their masks (each names its prompt)."""

    prompts: list[SamPrompt]
    instances: list[_Candidate]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What a request's class ids index (before its exemplars' classes), how its texts are answered, and (open
    vocabulary) those names' class embeddings (N, class_dim); None for a closed detector."""

    names: tuple[str, ...]
    texts: list[TextMatch]
    embeddings: np.ndarray | None


@dataclasses.dataclass
class _Flight:
    """An image's SAM features being computed (``Pipeline._features_once``) and how many requests wait for them."""

    task: asyncio.Future[ImageFeatures]
    waiters: int = 0


class Pipeline:
    """Validates, runs detector and encoder concurrently, decodes all prompts of the image in one batch.

    With a cache (``images``), images seen before (same bytes, or their handle) skip decoding and the SAM
    encoder, and the detector too once it has run on them.
    """

    def __init__(
        self,
        runner: Runner,
        images: ImageStore,
        limits: Limits,
        *,
        matcher: VocabularyMatcher | None = None,
        class_embeddings: EmbeddingLRU | None = None,
        phrase_reader: PhraseReader | None = None,
        exemplar_embeddings: LRU[tuple[object, ...], np.ndarray] | None = None,
        mask_threads: int = 1,
    ) -> None:
        """``images``: the request's images and their cache tiers (built by the composition root, ``service.app``);
        ``matcher``: maps free text to a closed detector's classes (None: texts are FAILED_PRECONDITION);
        ``class_embeddings``: an open-vocabulary detector's class embeddings of texts, by string (required for one);
        ``phrase_reader``: reads an open-vocabulary request's classes and texts into the detector's own words
        before they are embedded (None: embedded as sent);
        ``exemplar_embeddings``: exemplar embeddings by (image, boxes, classes), reused while the same exemplars
        come back (None: none kept); ``mask_threads``: threads refining and encoding a request's masks."""
        self.runner = runner
        self.matcher = matcher
        self.class_embeddings = class_embeddings
        self.phrase_reader = phrase_reader
        if runner.detector.open_vocabulary and class_embeddings is None:
            raise ValueError("an open-vocabulary detector needs class_embeddings")
        self.images = images
        self.limits = limits
        self.detector = DetectStage(runner, limits, exemplar_embeddings)
        concepts = runner.concepts
        self.concept_processing = (
            ConceptProcessing(concepts.image_size, concepts.mask_threshold) if concepts is not None else None
        )
        self.concepts = (
            ConceptPath(
                runner=runner,
                processing=self.concept_processing,
                images=images,
                limits=limits,
                detector_path=self._segment,
            )
            if self.concept_processing is not None
            else None
        )
        self.segmentation = SegmenterProcessing(runner.segmenter)
        self.masks = Masks(runner, self.segmentation, mask_threads)
        self._encoding: dict[str, _Flight] = {}  # handle -> its features being computed

    def check(self, query: SegmentQuery) -> None:
        """What a request can be refused for without its pixels or a model (counts, ranges, names; a closed
        detector's class names), before it takes an admission slot: bad input is INVALID_ARGUMENT however busy the
        server is, never RESOURCE_EXHAUSTED that a client would retry."""
        check_query(query, self.limits)
        if query.classes and not self.runner.detector.open_vocabulary:
            resolve_classes(query.classes, self.runner.detector.names)

    async def segment(self, query: SegmentQuery) -> SegmentResult:
        """With a concept segmenter (SAM 3) the texts and exemplars go to it, the rest of the request to the
        detector."""
        check_query(query, self.limits)
        if (query.texts or query.exemplars) and self.concepts is not None:
            return await self.concepts.segment(query)
        return await self._segment(query)

    async def _segment(self, query: SegmentQuery, found: FoundImage | None = None) -> SegmentResult:
        """The detector and SAM 2 path for a checked query. ``found``: the request's image when the caller has
        looked it up (and decoded it) already."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if found is None:
            found = await self.images.find(query.image, timings)
        handle, entry, image = found.handle, found.entry, found.image
        check_inside(query, image.width, image.height)  # before the text encoder runs
        vocabulary = await self.vocabulary(query, timings)
        p = plan(query, self.limits, vocabulary.names, vocabulary.texts, self.runner.detector.open_vocabulary)
        p = await self._with_previous_masks(query, handle, p)  # NOT_FOUND before any model runs

        references = await asyncio.to_thread(self.images.reference_images, query.exemplars)
        exemplars = self.detector.exemplar_groups(query.exemplars, image, references)  # checked before models
        detections_task = (
            asyncio.ensure_future(
                self.detector.detect(
                    image,
                    p,
                    timings,
                    entry=entry,
                    text_embeddings=vocabulary.embeddings,
                    exemplars=exemplars,
                )
            )
            if p.run_detector
            else None
        )
        features_task = asyncio.ensure_future(self._features_once(handle, image, timings)) if entry is None else None
        try:
            detected = await detections_task if detections_task else None
            features = await features_task if features_task else entry.features  # type: ignore[union-attr]
        except BaseException:
            for task in (detections_task, features_task):
                if task is not None:
                    task.cancel()
            raise
        if entry is None:
            outputs = {detected.key: detected.output} if detected is not None else {}
            await self.images.put(handle, CacheEntry(image, features, outputs))
        elif detected is not None:
            await self.images.add_detector_output(handle, detected.output, detected.key)

        candidates = self.candidates(detected.detections if detected is not None else None, p)
        prompts = candidates.prompts
        instances: list[InstanceResult] = []
        if prompts:
            with stage(timings, "decode_masks", prompts=len(prompts)):
                low_res = await self.masks.decode(features, prompts, image, p.multimask)
            with stage(timings, "encode_masks", masks=len(prompts)):
                final = await asyncio.to_thread(self.masks.finish, low_res.logits, image, p, prompts)
            sources = []  # each instance's SAM prompt, in the instances' order
            for c in candidates.instances:
                prompt, k = prompts[c.mask_index], c.mask_index
                box = prompt.box
                if box is None:  # a clicks-only region: its box is the mask's (or the clicks' if the mask is empty)
                    mask_box = final.boxes[k]
                    box = mask_box if mask_box is not None else points_box(prompt)
                mask_score = float(low_res.scores[k])
                flag = review(
                    p.review,
                    score=None if c.source == REGION else c.score,
                    mask_score=mask_score,
                    stats=final.stats[k],
                    text_match=c.text_match,
                )
                instances.append(c.instance(box=box, mask=final.encoded[k], mask_score=mask_score, review=flag))
                sources.append(k)
            if p.drop_flagged:
                answered = [(i, k) for i, k in zip(instances, sources, strict=True) if not i.review.needed]
                instances, sources = [i for i, _ in answered], [k for _, k in answered]
            if query.options.keep_masks:  # of the instances answered only, so max_kept_masks goes to those
                order = list(dict.fromkeys(sources))
                handles = await self._keep_masks(handle, [prompts[k] for k in order], low_res.logits[order], p)
                named = dict(zip(order, handles, strict=True))
                instances = [
                    dataclasses.replace(i, mask_handle=named[k]) for i, k in zip(instances, sources, strict=True)
                ]
        timings["total"] = time.perf_counter() - start
        return SegmentResult(
            request_id=query.request_id or uuid.uuid4().hex,
            image=image,
            instances=instances,
            timings=timings,
            cached=entry is not None,
        )

    async def _with_previous_masks(self, query: SegmentQuery, handle: str, p: Plan) -> Plan:
        """The plan with each region's ``previous_mask`` looked up (SAM's mask input); NotFound naming the region
        when one is unknown or expired."""
        if not any(r.previous_mask for r in query.regions):
            return p
        regions = list(p.regions)
        for i, r in enumerate(query.regions):
            if r.previous_mask:
                logits = await self.images.kept_mask(handle, r.previous_mask, f"regions[{i}].previous_mask")
                regions[i] = dataclasses.replace(regions[i], previous=logits)
        return dataclasses.replace(p, regions=regions)

    async def _keep_masks(self, handle: str, prompts: list[SamPrompt], logits: Any, p: Plan) -> list[str]:
        """Keeps each prompt's low-res mask with the cached image (options.keep_masks); their handles, in order ("" for
        a mask not kept: past max_kept_masks, or the image not cached). Logits clamped to [-32, 32] as
        SAM2ImagePredictor returns them, so a follow-up's mask input is the predictor's."""
        host = logits if isinstance(logits, np.ndarray) else logits.float().cpu().numpy()
        handles = [kept_mask_handle(handle, prompt, p.multimask) for prompt in prompts]
        kept = await self.images.add_masks(handle, {h: np.clip(host[k], -32.0, 32.0) for k, h in enumerate(handles)})
        return [h if h in kept else "" for h in handles]

    async def vocabulary(self, query: SegmentQuery, timings: dict[str, float]) -> Vocabulary:
        """The request's vocabulary, its texts' matches and (open vocabulary) class embeddings."""
        if not self.runner.detector.open_vocabulary:
            if query.exemplars:
                raise Unsupported(
                    "exemplars: they need an open-vocabulary detector (YOLOE) and this server's has a fixed "
                    "vocabulary; send class names or texts"
                )
            texts = await self._match_texts(query, timings) if query.texts else []
            return Vocabulary(self.runner.detector.names, texts, None)
        if query.exemplars and not self.runner.detector.visual_prompts:
            raise Unsupported(
                "exemplars: this server's open-vocabulary detector takes texts only (YOLO-World); exemplars need "
                "one that takes visual prompts (YOLOE)"
            )
        names = request_vocabulary(query.classes, query.texts)
        if not names:
            return Vocabulary(names, [], np.zeros((0, self.runner.detector.class_dim), np.float32))
        assert self.class_embeddings is not None  # built with the pipeline for every open-vocabulary detector
        with stage(timings, "embed_classes", classes=len(names)):
            readings = await self._read_phrases(query, names)
            embeddings = await self.class_embeddings.get(readings)
        return Vocabulary(names, open_matches(query.texts, names, readings), embeddings)

    async def _read_phrases(self, query: SegmentQuery, names: tuple[str, ...]) -> list[str]:
        """What each class name is embedded as: its phrase reader's reading, or itself without a reader.
        InvalidInput, naming the field, for a name the reader cannot read (``service.pipeline.phrases``)."""
        if self.phrase_reader is None:
            return list(names)
        readings = await self.phrase_reader.read(names)
        for name, reading in zip(names, readings, strict=True):
            if reading.phrase is None:
                field = next(
                    f"{kind}[{i}]"
                    for kind, values in (("classes", query.classes), ("texts", query.texts))
                    for i, value in enumerate(values)
                    if normalise_class_name(value) == normalise_class_name(name)
                )
                raise InvalidInput(
                    f"{field}: {name[:64]!r} cannot be read in this detector's phrase grammar "
                    f"{self.phrase_reader.grammar}: {reading.why}",
                    field=field,
                )
        return [r.phrase for r in readings if r.phrase is not None]

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
        found = await self.images.find(image_input, timings)
        handle, image = found.handle, found.image
        if found.entry is not None:
            timings["total"] = time.perf_counter() - start
            return EncodeResult(handle=handle, image=image, cached=True, timings=timings)
        features = await self._features_once(handle, image, timings)
        # before answering: the handle must work on every replica at once
        entry = CacheEntry(image, features)
        if not await self.images.put(handle, entry):
            shared = "" if self.images.shared is None else ", nor does the shared cache take them now"
            raise Unsupported(  # a handle that names nothing would be NOT_FOUND on its first use
                f"image: its features ({entry.nbytes} bytes) do not fit this server's embedding cache "
                f"(cache_max_bytes {self.images.cache.max_bytes}){shared}: it has no handle to give; send the image "
                "with each request"
            )
        timings["total"] = time.perf_counter() - start
        return EncodeResult(handle=handle, image=image, cached=False, timings=timings)

    async def _features_once(self, handle: str, image: DecodedImage, timings: dict[str, float]) -> ImageFeatures:
        """SAM's features of a request's image, computed once for the requests that ask for the same image while
        they are being computed (two calls with the same new image ran the encoder twice), or cached meanwhile (by a
        computation that ended after this request looked). The computation goes on while any of them waits (cancelled
        and forgotten when none does: a request arriving then starts its own); where it fails (e.g. past its first
        caller's deadline), a waiting caller computes its own."""
        flight = self._encoding.get(handle)
        own = flight is None
        if flight is None:
            cached = self.images.cache.get(handle)
            if cached is not None:
                return cached.features
            flight = self._encoding[handle] = _Flight(asyncio.ensure_future(self.features(image, timings)))
            flight.task.add_done_callback(functools.partial(self._encoded, handle))
        flight.waiters += 1
        try:
            if own:
                return await asyncio.shield(flight.task)
            try:
                with stage(timings, "encode", shared=True):
                    return await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                raise
            except Exception:
                return await self.features(image, timings)
        finally:
            flight.waiters -= 1
            if not flight.waiters:
                flight.task.cancel()  # no one waits for it any more (a no-op once it is done)
                if self._encoding.get(handle) is flight:  # a caller arriving before its callback ran joined it
                    del self._encoding[handle]

    def _encoded(self, handle: str, task: asyncio.Future[ImageFeatures]) -> None:
        """A computation of ``_features_once`` ended: forgotten, its error retrieved (whoever awaited it)."""
        flight = self._encoding.get(handle)
        if flight is not None and flight.task is task:
            del self._encoding[handle]
        if not task.cancelled():
            task.exception()

    async def features(self, image: DecodedImage, timings: dict[str, float], *, frame: bool = False) -> ImageFeatures:
        """SAM's features of an image, pre-processed as SAM2ImagePredictor does, or (``frame``: a tracked video
        frame) as SAM2VideoPredictor does (``SegmenterProcessing.preprocess_frame``)."""
        preprocess = self.segmentation.preprocess_frame if frame else self.segmentation.preprocess
        with stage(timings, "encode"):
            batch = await asyncio.to_thread(preprocess, image.rgb)
            features = await self.runner.encode(batch)
        return features

    def candidates(self, detections: Detections | None, p: Plan) -> Candidates:
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
                out.extend(  # an open-vocabulary text's label is the text (another prompt may spell its class)
                    _Candidate(k, m.text.strip() if m.kind == OPEN else label, cid, float(score), TEXT, text_match=m)
                    for m in p.texts
                    if m.class_id == cid
                )
        for i, (prompt, label) in enumerate(zip(p.regions, p.region_labels, strict=True)):
            out.append(_Candidate(len(prompts), label, -1, 1.0, REGION, region_index=i))
            prompts.append(prompt)
        return Candidates(prompts, out)
