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
from service.pipeline.prompts import Exemplar, Limits, Plan
from service.pipeline.stages import stage
from service.processing.detection import Detections, DetectorProcessing
from service.runners.base import Runner


@dataclasses.dataclass(frozen=True)
class Detected:
    """Detections for a plan, the detector's raw output they came from and its cache key."""

    detections: Detections
    output: DetectorOutput
    key: Hashable


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

    async def detect(
        self,
        image: DecodedImage,
        p: Plan,
        timings: dict[str, float],
        *,
        entry: CacheEntry | None,
        text_embeddings: np.ndarray | None,
        exemplars: tuple[Exemplar, ...],
        references: list[DecodedImage | None],
    ) -> Detected:
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
                        batch = await asyncio.to_thread(self.processing.preprocess, image.rgb)
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
        # An image is its bytes' hash and its size (raw pixels: the same bytes at another size are another image).
        by_image: dict[tuple[str, int, int] | None, list[int]] = {}
        for i, ref in enumerate(references):
            by_image.setdefault((ref.sha256, ref.width, ref.height) if ref is not None else None, []).append(i)
        total = np.zeros((len(classes), self.runner.detector.class_dim), np.float32)
        for source, indices in by_image.items():
            ref = references[indices[0]] or image
            names = [exemplars[i].class_name for i in indices]
            local = list(dict.fromkeys(names))
            boxes = np.array([exemplars[i].box for i in indices], np.float32)
            ids = np.array([local.index(n) for n in names])
            key = (ref.sha256, ref.width, ref.height, boxes.tobytes(), ids.tobytes(), len(local))
            embedded = self.exemplar_embeddings.get(key)
            if embedded is None:  # a catalog photo's exemplar is embedded once, then reused
                ref_batch = batch if source is None else await asyncio.to_thread(self.processing.preprocess, ref.rgb)
                visuals = self.processing.exemplar_visuals(boxes, ids, (ref.height, ref.width))
                _check_visuals(visuals, ids, indices, self.processing.spec.imgsz, ref)
                embedded = await self.runner.embed_exemplars(ref_batch, visuals)
                self.exemplar_embeddings.put(key, embedded)
            for k, name in enumerate(local):
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
