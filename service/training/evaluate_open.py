"""Figures of a text-prompted detector on held-out attribute scenes (issue 11), computed with pycocotools COCOeval.

    python -m service.training.evaluate_open [--weights service/models/demo/shapes-yoloe.pt] [--scenes 300] [--json F]

The detector runs as detseg serves it: ``load_detector_module``, each text read into the detector's own words by
the server's phrase reader (``service.pipeline.phrases``; ``--no-phrase-reader``: as sent, the figures before it;
a text it cannot read, which the server refuses with INVALID_ARGUMENT, finds nothing here),
class embeddings from the checkpoint's own text encoder (``ClassTextEncoder.for_detector(model.text_model, ...)``
→ ``class_embeddings_from_text``), ``open_vocabulary.detect`` on the letterboxed image, then detseg's
``DetectorProcessing.postprocess`` (ultralytics NMS, boxes back to original pixels). A YOLOE head scores every
class on its own (sigmoid of a per-class contrastive logit), so one forward pass with all phrases, then NMS per
phrase, gives exactly what one request per phrase would: that is how each phrase is evaluated.

Phrase groups (each phrase is one COCO category; its ground truth = the instances it truly describes):
- ``trained``: colour + shape phrases of combinations seen in training ("red circle"), 37.
- ``held_out``: colour + shape phrases of combinations never rendered in training ("green star"), 3.
- ``paraphrases``: ``service.shapes.paraphrases.EVALUATION_PARAPHRASES`` (40 phrases never trained, neither by
  the detector nor by any text-side training: "scarlet star", "a round object", "giant red star", "a star that is red").
- ``held_out_paraphrases``: paraphrases of the held-out combinations ("emerald star").
- ``bare_shape``: "circle" ... "hexagon": every instance of that shape, any colour (held-out ones included).
- ``size_colour_shape``, ``colour``, ``size_shape``: the other trained phrase levels ("large blue star",
  "red shape", "small star").

Exemplars (``detect_exemplars``): for every (image, colour + shape combination present), the first instance's box
is the prompt (same image, as a request's ``exemplars`` with no reference image); its ground truth is every
instance of that colour and shape in the image, the exemplar's own included. Groups ``exemplar_trained`` and
``exemplar_held_out`` (combinations never rendered in training). ``reference_exemplar_*``: the same, with the
exemplar boxed on another test scene (the first other one holding the combination), as a catalog photo would be.

AP50: COCOeval bbox AP at IoU 0.5 over the group's categories (score ≥ 0.001, 100 detections per image and
phrase). False positives for absent phrases: for every (image, phrase) whose phrase describes nothing in the
image, the detections a request at the serving defaults (score ≥ the demo-open profile's calibrated threshold,
0.35; NMS IoU 0.7) returns; reported per request (one absent phrase per request), and summed over all absent trained
phrases of an image.

``--calibrate`` chooses that threshold instead, on validation scenes (``calibrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.models.catalog import PROFILE_SCORE_THRESHOLDS
from service.pipeline.phrases import PhraseReader
from service.shapes.attributes import (
    COLOURS,
    FINE_CLASSES,
    HELD_OUT,
    SIZES,
    AttributeInstance,
    AttributeScene,
    attribute_scenes,
    is_held_out,
)
from service.shapes.paraphrases import EVALUATION_PARAPHRASES, HELD_OUT_PARAPHRASES
from service.shapes.world import CLASSES

# What a request to the demo-open server gets by default: its calibrated score threshold (``calibrate``), NMS IoU.
SERVING_SCORE, SERVING_IOU, MAX_DETECTIONS = PROFILE_SCORE_THRESHOLDS["demo-open"], 0.7, 100
EVAL_SCORE = 0.001
# ``calibrate``: the thresholds tried, and the bound on false positives per request every absent phrase must meet
# (issue 20 finding 13).
CALIBRATION_THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
FP_BOUND = 0.05


@dataclasses.dataclass(frozen=True)
class Phrase:
    text: str
    size: str | None
    colour: str | None
    shape: str | None

    def describes(self, inst: AttributeInstance) -> bool:
        return all(
            want is None or want == have
            for want, have in ((self.size, inst.size), (self.colour, inst.colour), (self.shape, inst.shape))
        )


def phrase_groups() -> dict[str, list[Phrase]]:
    combos = [(c, k) for c in COLOURS for k in CLASSES]
    return {
        "trained": [Phrase(f"{c} {k}", None, c, k) for c, k in combos if not is_held_out(c, k)],
        "held_out": [Phrase(f"{c} {k}", None, c, k) for c, k in HELD_OUT],
        "paraphrases": [Phrase(t, *attrs) for t, attrs in EVALUATION_PARAPHRASES.items()],
        "held_out_paraphrases": [Phrase(t, *attrs) for t, attrs in HELD_OUT_PARAPHRASES.items()],
        "bare_shape": [Phrase(k, None, None, k) for k in CLASSES],
        "size_colour_shape": [Phrase(f"{s} {c} {k}", s, c, k) for s, c, k in FINE_CLASSES if not is_held_out(c, k)],
        "colour": [Phrase(f"{c} shape", None, c, None) for c in COLOURS],
        "size_shape": [Phrase(f"{s} {k}", s, None, k) for s in SIZES for k in CLASSES],
    }


@dataclasses.dataclass(frozen=True)
class PhraseDetections:
    """Per image (scene seed) and phrase text: (N, 4) XYXY original pixels and (N,) scores, NMS per phrase."""

    boxes: dict[tuple[int, str], np.ndarray]
    scores: dict[tuple[int, str], np.ndarray]


class ServedOpenDetector:
    """An open-vocabulary checkpoint run the way detseg's torch runner runs it (no gRPC). ``text_model``: another
    class-text encoder than the one the checkpoint names (e.g. "minilm-512:seed0", the fixed projection, to
    measure a learned one against it); ``read_phrases``: texts go through the server's phrase reader first
    (``service.pipeline.phrases``, when the checkpoint's names are an attribute vocabulary), as detseg serves them."""

    def __init__(self, weights: Path, text_model: str | None = None, read_phrases: bool = True) -> None:
        import torch

        from service.models.loading import load_detector_module
        from service.models.tensors import DetectorSpec
        from service.models.text import ClassTextEncoder, SentenceEncoder
        from service.processing.detection import DetectorProcessing

        loaded = load_detector_module(weights)
        if loaded.text_model is None:
            raise ValueError(f"{weights} is not an open-vocabulary detector")
        self.model = loaded.module
        self.text_model = text_model or loaded.text_model
        self.encoder = ClassTextEncoder.for_detector(self.text_model, SentenceEncoder.load())
        sentence = self.encoder.sentence

        async def embed(texts: Sequence[str]) -> np.ndarray:
            return sentence.encode(texts)

        model_names: Any = self.model.names
        names = [str(model_names[i]) for i in range(len(model_names))]
        self.reader = PhraseReader.for_vocabulary(names, embed) if read_phrases else None
        stride = int(torch.as_tensor(self.model.stride).max())
        spec = DetectorSpec(names=(), imgsz=loaded.input_size(), stride=stride, class_dim=self.encoder.dim)
        self.processing = DetectorProcessing(spec)

    def readings(self, texts: Sequence[str]) -> list[str | None]:
        """What each text is embedded as (itself without a reader); None: the server refuses it (the reader
        cannot read it)."""
        if self.reader is None:
            return list(texts)
        return [r.phrase for r in asyncio.run(self.reader.read(texts))]

    def class_embeddings(self, phrases: Sequence[str]) -> Any:
        """The head's class embeddings of ``phrases``: texts as they are embedded (``readings``)."""
        import torch

        from service.models.open_vocabulary import class_embeddings_from_text

        features = self.encoder.encode(list(phrases))
        with torch.no_grad():
            return class_embeddings_from_text(self.model, torch.from_numpy(features)[None])

    def raw(self, image: np.ndarray, embeddings: Any) -> np.ndarray:
        """(1, 4 + C, A) float32 head output for one (H, W, 3) uint8 RGB image."""
        import torch

        from service.models.open_vocabulary import detect

        with torch.no_grad():
            return detect(self.model, torch.from_numpy(self.processing.preprocess(image)), embeddings).numpy()

    def detect_each(
        self, scenes: Sequence[AttributeScene], texts: Sequence[str], score: float, iou: float = SERVING_IOU
    ) -> PhraseDetections:
        """Every text on every scene, as one request per text would answer it; a text the server refuses (the
        reader cannot read it) finds nothing."""
        read = {t: r for t, r in zip(texts, self.readings(texts), strict=True) if r is not None}
        embeddings = self.class_embeddings(list(read.values()))
        boxes: dict[tuple[int, str], np.ndarray] = {}
        scores: dict[tuple[int, str], np.ndarray] = {}
        for scene in scenes:
            self._keep_each(scene, list(read), self.raw(scene.image, embeddings), score, iou, boxes, scores)
            for text in texts:
                if text not in read:
                    boxes[scene.seed, text], scores[scene.seed, text] = np.zeros((0, 4), np.float32), np.zeros(0)
        return PhraseDetections(boxes, scores)

    def detect_exemplars(
        self,
        scenes: Sequence[AttributeScene],
        score: float,
        iou: float = SERVING_IOU,
        references: Sequence[AttributeScene] | None = None,
    ) -> PhraseDetections:
        """Per scene and colour + shape combination present ("red star"): the detections of one request whose
        exemplar is the first such instance's box: on the scene itself, or with ``references``, on the first
        reference scene (other than the scene) holding that combination (a request's exemplar ``image``).
        Keys as ``detect_each`` (the combination's phrase)."""
        import torch

        from service.models.open_vocabulary import detect, visual_prompt_embeddings

        def embed(scene: AttributeScene, texts: list[str]) -> Any:
            first = {t: next(i for i in scene.instances if i.colour_shape == t) for t in texts}
            prompt = np.array([first[t].box for t in texts], dtype=np.float32)
            visuals = self.processing.exemplar_visuals(prompt, np.arange(len(texts)), (scene.height, scene.width))
            image = torch.from_numpy(self.processing.preprocess(scene.image))
            with torch.no_grad():
                return visual_prompt_embeddings(self.model, image, torch.from_numpy(visuals))

        boxes: dict[tuple[int, str], np.ndarray] = {}
        scores: dict[tuple[int, str], np.ndarray] = {}
        for scene in scenes:
            texts = list(dict.fromkeys(i.colour_shape for i in scene.instances))
            if references is None:
                embeddings = embed(scene, texts)
            else:
                rows = []
                for text in texts:
                    ref = next(
                        r
                        for r in references
                        if r.seed != scene.seed and any(i.colour_shape == text for i in r.instances)
                    )
                    rows.append(embed(ref, [text]))
                embeddings = torch.cat(rows, dim=1)
            with torch.no_grad():
                raw = detect(self.model, torch.from_numpy(self.processing.preprocess(scene.image)), embeddings)
            self._keep_each(scene, texts, raw.numpy(), score, iou, boxes, scores)
        return PhraseDetections(boxes, scores)

    def _keep_each(
        self,
        scene: AttributeScene,
        texts: Sequence[str],
        raw: np.ndarray,
        score: float,
        iou: float,
        boxes: dict[tuple[int, str], np.ndarray],
        scores: dict[tuple[int, str], np.ndarray],
    ) -> None:
        """NMS per text of one image's (1, 4 + C, A) head output into ``boxes``/``scores``."""
        from service.models.tensors import DetectorOutput

        for j, text in enumerate(texts):
            det = self.processing.postprocess(
                DetectorOutput(raw=np.ascontiguousarray(raw[:, [0, 1, 2, 3, 4 + j]])),
                0,
                (scene.height, scene.width),
                class_ids=None,
                score_threshold=score,
                iou_threshold=iou,
                max_instances=MAX_DETECTIONS,
            )
            boxes[scene.seed, text], scores[scene.seed, text] = det.boxes, det.scores


def ground_truth(scenes: Sequence[AttributeScene], phrases: Sequence[Phrase]) -> dict[str, Any]:
    """COCO dict: one category per phrase (id = index + 1), an annotation per (instance, phrase it satisfies)."""
    images = [{"id": s.seed, "width": s.width, "height": s.height, "file_name": f"{s.seed}.png"} for s in scenes]
    annotations: list[dict[str, Any]] = []
    for s in scenes:
        for inst in s.instances:
            x0, y0, x1, y1 = inst.box
            for c, p in enumerate(phrases):
                if p.describes(inst):
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": s.seed,
                            "category_id": c + 1,
                            "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(inst.mask.sum()),
                        }
                    )
    categories = [{"id": c + 1, "name": p.text} for c, p in enumerate(phrases)]
    return {"images": images, "annotations": annotations, "categories": categories}


def ap50_by_phrase(
    scenes: Sequence[AttributeScene], phrases: Sequence[Phrase], dets: PhraseDetections
) -> tuple[float, dict[str, float]]:
    """COCOeval bbox AP50: mean over the phrases with ground truth, and per phrase (-1: no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = ground_truth(scenes, phrases)
    results = [
        {
            "image_id": s.seed,
            "category_id": c + 1,
            "score": float(score),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
        }
        for s in scenes
        for c, p in enumerate(phrases)
        if (s.seed, p.text) in dets.boxes
        for b, score in zip(dets.boxes[s.seed, p.text], dets.scores[s.seed, p.text], strict=True)
    ]
    if not results:
        return 0.0, {p.text: 0.0 for p in phrases}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        e = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        e.params.iouThrs = np.array([0.5])
        e.evaluate()
        e.accumulate()
    precision = e.eval["precision"][0, :, :, 0, -1]  # (recall points, categories) at area "all", maxDets 100
    per = {}
    for c, p in enumerate(phrases):
        column = precision[:, c]
        per[p.text] = float(column.mean()) if (column > -1).any() else -1.0
    valid = [v for v in per.values() if v >= 0]
    return (float(np.mean(valid)) if valid else 0.0), per


def absent_false_positives(
    scenes: Sequence[AttributeScene],
    phrases: Sequence[Phrase],
    dets: PhraseDetections,
    keep: Callable[[AttributeScene, Phrase], bool] = lambda s, p: True,
) -> dict[str, float]:
    """Detections (at the serving threshold) of phrases that describe nothing in the image."""
    queries = fps = hit = 0
    per_image = []
    for s in scenes:
        image_fps = 0
        for p in phrases:
            if any(p.describes(i) for i in s.instances) or not keep(s, p):
                continue
            n = len(dets.scores[s.seed, p.text])
            queries, fps, hit, image_fps = queries + 1, fps + n, hit + (n > 0), image_fps + n
        per_image.append(image_fps)
    return {
        "queries": queries,
        "fp_per_request": fps / queries if queries else 0.0,
        "fp_per_image_all_absent_phrases": float(np.mean(per_image)) if per_image else 0.0,
        "false_positives": fps,
        "requests_with_any_fp": hit,
    }


def absent_false_positives_by_phrase(
    scenes: Sequence[AttributeScene], phrases: Sequence[Phrase], dets: PhraseDetections
) -> dict[str, float]:
    """Per phrase: detections (at the serving threshold) per request over the images it describes nothing in."""
    out = {}
    for p in phrases:
        absent = [s for s in scenes if not any(p.describes(i) for i in s.instances)]
        out[p.text] = sum(len(dets.scores[s.seed, p.text]) for s in absent) / len(absent) if absent else 0.0
    return out


def above(dets: PhraseDetections, score: float) -> PhraseDetections:
    """The detections scoring at least ``score`` (what a request at that threshold returns: NMS keeps the same
    boxes above it)."""
    keep = {key: s >= score for key, s in dets.scores.items()}
    return PhraseDetections(
        {key: b[keep[key]] for key, b in dets.boxes.items()}, {key: s[keep[key]] for key, s in dets.scores.items()}
    )


def recall(scenes: Sequence[AttributeScene], phrases: Sequence[Phrase], dets: PhraseDetections) -> float | None:
    """The share of (instance, phrase describing it) pairs that one of the phrase's detections boxes (box IoU >= 0.5
    as pycocotools computes it; detections in score order, each boxing at most one instance); None when the phrases
    describe nothing in the scenes (held-out combinations on validation scenes)."""
    from pycocotools import mask as mask_utils

    found = present = 0
    for s in scenes:
        for p in phrases:
            truth = [_xywh(i.box) for i in s.instances if p.describes(i)]
            present += len(truth)
            boxes = dets.boxes[s.seed, p.text][np.argsort(-dets.scores[s.seed, p.text], kind="stable")]
            if not truth or not len(boxes):
                continue
            ious = np.asarray(mask_utils.iou([_xywh(b) for b in boxes], truth, [0] * len(truth))).reshape(
                len(boxes), -1
            )
            free = np.ones(len(truth), bool)
            for row in ious:
                row = np.where(free, row, 0.0)
                if row.max() >= 0.5:
                    free[int(row.argmax())] = False
            found += int((~free).sum())
    return found / present if present else None


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def calibrate(weights: Path, count: int = 100, split: str = "val") -> dict[str, Any]:
    """The operating threshold of an open-vocabulary shapes detector, chosen on ``split`` scenes (never the test
    split): the least of ``CALIBRATION_THRESHOLDS`` at which every absent phrase (trained, held-out combinations,
    paraphrases) draws at most ``FP_BOUND`` false positives per request (``threshold_rows``)."""
    scenes = attribute_scenes(split, count)
    detector = ServedOpenDetector(weights)
    groups = {name: phrase_groups()[name] for name in ("trained", "held_out", "paraphrases", "held_out_paraphrases")}
    texts = list(dict.fromkeys(p.text for ps in groups.values() for p in ps))
    rows = threshold_rows(scenes, groups, detector.detect_each(scenes, texts, min(CALIBRATION_THRESHOLDS)))
    return {"split": split, "scenes": count, "fp_bound": FP_BOUND, "thresholds": rows, "chosen": least_within(rows)}


def least_within(rows: dict[str, Any]) -> float | None:
    """The least threshold of ``threshold_rows`` with no phrase over the bound in any group (None: none)."""
    met = [t for t in CALIBRATION_THRESHOLDS if not any(g["over_bound"] for g in rows[f"{t:g}"].values())]
    return met[0] if met else None


def threshold_rows(
    scenes: Sequence[AttributeScene], groups: dict[str, list[Phrase]], dets: PhraseDetections
) -> dict[str, Any]:
    """Per threshold of ``CALIBRATION_THRESHOLDS`` ("0.35") and phrase group, from detections kept at the lowest:
    the worst absent phrase, the phrases over ``FP_BOUND``, and the recall of the described instances."""
    rows: dict[str, Any] = {}
    for threshold in CALIBRATION_THRESHOLDS:
        kept, row = above(dets, threshold), {}
        for name, phrases in groups.items():
            per = absent_false_positives_by_phrase(scenes, phrases, kept)
            worst = max(per, key=per.__getitem__)
            row[name] = {
                "worst_absent": {"phrase": worst, "fp_per_request": per[worst]},
                "over_bound": sorted(p for p, v in per.items() if v > FP_BOUND),
                "recall": recall(scenes, phrases, kept),
            }
        rows[f"{threshold:g}"] = row
    return rows


def distractor(scene: AttributeScene, p: Phrase) -> bool:
    """The phrase's shape or colour is in the image (on another object): the hard absent phrases."""
    return any(i.shape == p.shape or i.colour == p.colour for i in scene.instances)


def evaluate(
    weights: Path, count: int = 300, text_model: str | None = None, exemplars: bool = True, read_phrases: bool = True
) -> dict[str, Any]:
    """Every figure above on the first ``count`` test scenes (exemplar groups only with ``exemplars``; texts
    through the phrase reader with ``read_phrases``)."""
    t = time.time()
    scenes = attribute_scenes("test", count)
    detector = ServedOpenDetector(weights, text_model, read_phrases)
    groups = phrase_groups()
    texts = list(dict.fromkeys(p.text for ps in groups.values() for p in ps))
    low = detector.detect_each(scenes, texts, EVAL_SCORE)
    served = detector.detect_each(scenes, texts, SERVING_SCORE)
    out: dict[str, Any] = {
        "text_model": detector.text_model,
        "phrase_reader": detector.reader.name if detector.reader is not None else "none",
        "scenes": count,
        "instances": sum(len(s.instances) for s in scenes),
    }
    for name, phrases in groups.items():
        mean, per = ap50_by_phrase(scenes, phrases, low)
        out[f"ap50_{name}"] = mean
        out[f"ap50_{name}_per_phrase"] = per
    out["fp_absent_trained"] = absent_false_positives(scenes, groups["trained"], served)
    out["fp_absent_trained_distractors"] = absent_false_positives(scenes, groups["trained"], served, distractor)
    out["fp_absent_held_out"] = absent_false_positives(scenes, groups["held_out"], served)
    out["fp_absent_held_out_distractors"] = absent_false_positives(scenes, groups["held_out"], served, distractor)
    for name in ("trained", "paraphrases", "held_out_paraphrases"):
        per = absent_false_positives_by_phrase(scenes, groups[name], served)
        worst = max(per, key=per.__getitem__)
        out[f"fp_absent_{name}_by_phrase"] = per
        out[f"fp_absent_{name}_max"] = {"phrase": worst, "fp_per_request": per[worst]}
    out["fp_absent_paraphrases"] = absent_false_positives(scenes, groups["paraphrases"], served)
    said = [p.text for name in ("paraphrases", "held_out_paraphrases") for p in groups[name]]
    out["paraphrase_readings"] = dict(zip(said, detector.readings(said), strict=True))  # None: refused
    from service.models.open_vocabulary import takes_visual_prompts

    if exemplars and takes_visual_prompts(detector.model):
        same = detector.detect_exemplars(scenes, EVAL_SCORE)
        other = detector.detect_exemplars(scenes, EVAL_SCORE, references=scenes)
        for kind, dets in (("exemplar", same), ("reference_exemplar", other)):
            for name in ("trained", "held_out"):
                out[f"ap50_{kind}_{name}"], out[f"ap50_{kind}_{name}_per_phrase"] = ap50_by_phrase(
                    scenes, groups[name], dets
                )
    out["held_out_instances"] = {
        f"{c} {k}": sum(i.colour == c and i.shape == k for s in scenes for i in s.instances) for c, k in HELD_OUT
    }
    out["seconds"] = time.time() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(__file__).parents[1] / "models/demo/shapes-yoloe.pt")
    parser.add_argument(
        "--scenes",
        type=int,
        help="test scenes (seeds 12,000,000 + i; default 300), or validation scenes to calibrate on (default 100)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--text-model", help='class-text encoder instead of the checkpoint\'s (e.g. "minilm-512:seed0": the fixed one)'
    )
    parser.add_argument("--no-exemplars", action="store_true", help="text prompts only (exemplars take no text)")
    parser.add_argument(
        "--no-phrase-reader", action="store_true", help="embed texts as sent (the figures before the phrase reader)"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="choose the operating score threshold on validation scenes instead",
    )
    args = parser.parse_args()
    if args.calibrate:
        chosen = calibrate(args.weights, args.scenes or 100)
        for threshold, row in chosen["thresholds"].items():
            print(threshold, json.dumps(row))
        print("chosen", chosen["chosen"])
        if args.json:
            args.json.write_text(json.dumps(chosen, indent=1))
        return
    result = evaluate(
        args.weights, args.scenes or 300, args.text_model, not args.no_exemplars, not args.no_phrase_reader
    )
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:40s} {value:.3f}")
        elif isinstance(value, str):
            print(f"{key:40s} {value}")
        elif isinstance(value, dict) and not key.endswith(("per_phrase", "by_phrase")):
            print(f"{key:40s} {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})}")
    for key in (
        "ap50_held_out_per_phrase",
        "ap50_paraphrases_per_phrase",
        "ap50_held_out_paraphrases_per_phrase",
        "ap50_bare_shape_per_phrase",
        "fp_absent_paraphrases_by_phrase",
    ):
        print(key, json.dumps({k: round(v, 3) for k, v in result[key].items()}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
