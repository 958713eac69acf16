"""The detector stage of the detector path: pre-processing, the detector (or its cached output), post-processing
(NMS per prompt, boxes scaled to the original image), and the open-vocabulary detector's exemplar embeddings."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Hashable

import numpy as np

from service.errors import InvalidInput
from service.models.tensors import ClassPrompts, DetectorOutput
from service.pipeline.cache import CacheEntry
from service.pipeline.image import DecodedImage
from service.pipeline.lru import LRU
from service.pipeline.prompts import Exemplar, Limits, Plan, exemplar_classes
from service.pipeline.stages import stage
from service.processing.detection import Detections, DetectorProcessing
from service.runners.base import Runner


@dataclasses.dataclass(frozen=True)
class Detected:
    """Detections for a plan, the detector's raw output they came from and its cache key."""

    detections: Detections
    output: DetectorOutput
    key: Hashable


@dataclasses.dataclass(frozen=True)
class ExemplarGroup:
    """A request's exemplars on one image, ready for the detector: ``image`` their own (None: the request's),
    ``classes`` theirs in order of first appearance, ``visuals`` the detector's visual prompts made from their boxes
    ((1, len(classes), imgsz/8, imgsz/8) float32) and ``key`` the embedding's cache key (image, boxes, classes)."""

    image: DecodedImage | None
    classes: tuple[str, ...]
    visuals: np.ndarray
    key: tuple[object, ...]


class DetectStage:
    """Runs the detector for a request's plan. ``exemplar_embeddings``: exemplar embeddings by (image, boxes,
    classes), reused while the same exemplars come back (None: none kept)."""

    def __init__(
        self,
        runner: Runner,
        limits: Limits,
        exemplar_embeddings: LRU[tuple[object, ...], np.ndarray] | None = None,
    ) -> None:
        self.runner = runner
        self.limits = limits
        self.processing = DetectorProcessing(runner.detector)
        self.exemplar_embeddings = exemplar_embeddings if exemplar_embeddings is not None else LRU(0)

    def exemplar_groups(
        self, exemplars: tuple[Exemplar, ...], image: DecodedImage | None, references: list[DecodedImage | None]
    ) -> list[ExemplarGroup]:
        """The exemplars grouped by the image their boxes are on, with the detector's visual prompts made: InvalidInput
        naming the box for an exemplar class too small to embed, before any model runs. ``image``: the request's
        (None: every exemplar has its own); ``references``: each exemplar's own image (None: the request's)."""
        # An image is its bytes' hash and its size (raw pixels: the same bytes at another size are another image).
        classes = exemplar_classes(exemplars)
        by_image: dict[tuple[str, int, int] | None, list[int]] = {}
        for i, ref in enumerate(references):
            by_image.setdefault((ref.sha256, ref.width, ref.height) if ref is not None else None, []).append(i)
        groups = []
        for source, indices in by_image.items():
            ref = references[indices[0]] if source is not None else image
            assert ref is not None, "exemplars on the request's image need the request's image"
            names = [classes[i] for i in indices]
            local = tuple(dict.fromkeys(names))
            boxes = np.array([exemplars[i].box for i in indices], np.float32)
            ids = np.array([local.index(n) for n in names])
            visuals = self.processing.exemplar_visuals(boxes, ids, (ref.height, ref.width))
            _check_visuals(visuals, ids, indices, self.processing.spec.imgsz, ref)
            key = (ref.sha256, ref.width, ref.height, boxes.tobytes(), ids.tobytes(), len(local))
            groups.append(ExemplarGroup(ref if source is not None else None, local, visuals, key))
        return groups

    async def detect(
        self,
        image: DecodedImage,
        p: Plan,
        timings: dict[str, float],
        *,
        entry: CacheEntry | None,
        text_embeddings: np.ndarray | None,
        exemplars: list[ExemplarGroup],
    ) -> Detected:
        """Detections for the plan's classes, the detector's raw output (from the cache when there: per
        vocabulary for an open-vocabulary detector) and its cache key. ``text_embeddings``: the open-vocabulary
        text classes' embeddings (None for a closed detector); ``exemplars`` (``exemplar_groups``) are embedded
        here."""
        with stage(timings, "detect") as span:
            batch = None
            classes = None
            if text_embeddings is not None:
                embeddings = text_embeddings
                if exemplars:
                    with stage(timings, "embed_exemplars", exemplars=sum(len(g.classes) for g in exemplars)):
                        batch = await asyncio.to_thread(self.processing.preprocess, image.rgb)
                        visual = await self._exemplar_embeddings(exemplars, p.names[p.exemplar_start :], batch)
                    embeddings = np.concatenate([text_embeddings, visual])
                classes = ClassPrompts(p.names, embeddings)
            key = classes.key if classes is not None else None
            cached = entry.detector.get(key) if entry is not None else None
            if cached is not None:
                output = cached
            else:
                if batch is None:
                    batch = await asyncio.to_thread(self.processing.preprocess, image.rgb)
                output = await self.runner.detect(batch, classes)
            detections = self.processing.postprocess(
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
        return Detected(detections, output, key)

    async def _exemplar_embeddings(
        self, groups: list[ExemplarGroup], classes: tuple[str, ...], batch: np.ndarray
    ) -> np.ndarray:
        """(len(classes), class_dim) float32: each exemplar class's visual-prompt embedding, averaged over the
        images its boxes are on (one detector pass per image) and L2-normalised. ``batch``: the request's image
        letterboxed."""
        total = np.zeros((len(classes), self.runner.detector.class_dim), np.float32)
        for group in groups:
            embedded = self.exemplar_embeddings.get(group.key)
            if embedded is None:  # a catalog photo's exemplar is embedded once, then reused
                ref_batch = (
                    batch
                    if group.image is None
                    else await asyncio.to_thread(self.processing.preprocess, group.image.rgb)
                )
                embedded = await self.runner.embed_exemplars(ref_batch, group.visuals)
                self.exemplar_embeddings.put(group.key, embedded)
            for k, name in enumerate(group.classes):
                total[classes.index(name)] += embedded[k]
        return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)


def _check_visuals(visuals: np.ndarray, ids: np.ndarray, indices: list[int], imgsz: int, image: DecodedImage) -> None:
    """Refuses an exemplar class whose boxes cover no cell of the detector's visual-prompt grid (a box under about
    one cell: 8 pixels of the letterboxed input): its embedding would be the same whatever the box holds, and the
    request answered with whatever that scores."""
    for k in range(visuals.shape[1]):
        if not visuals[0, k].any():
            i = indices[int(np.flatnonzero(ids == k)[0])]
            side = math.ceil(8 * max(image.width, image.height) / imgsz)
            raise InvalidInput(
                f"exemplars[{i}].box: too small to embed on its {image.width}x{image.height} image (the detector "
                f"sees it at {imgsz} px: a box needs about {side} px per side, more where it straddles its grid)"
            )
