"""Detector pre/post-processing, written once for every runner.

Uses ultralytics' own pieces (``LetterBox``, ``non_max_suppression``, ``scale_boxes``) so results equal
``YOLO.predict(..., rect=False)`` on the same pixels. torch and ultralytics are imported when the processing
is built or run, not with this module, so the server opens its port before they load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from service.models.tensors import DetectorOutput, DetectorSpec


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections of one image.

    boxes: (N, 4) float32, original-image pixels, XYXY; scores: (N,) float32 in [0, 1], descending;
    class_ids: (N,) int64 indices into the detector vocabulary.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class DetectorProcessing:
    """Letterbox in, NMS + rescale out. Built once per server; stateless per call."""

    def __init__(self, spec: DetectorSpec) -> None:
        from ultralytics.data.augment import LetterBox

        self.spec = spec
        self._letterbox = LetterBox(new_shape=(spec.imgsz, spec.imgsz), auto=False, stride=spec.stride)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → (1, 3, imgsz, imgsz) float32 in [0, 1], letterboxed (pad 114)."""
        boxed: np.ndarray = self._letterbox(image=rgb)  # type: ignore[assignment]
        chw = np.ascontiguousarray(boxed.transpose(2, 0, 1))[None]
        return chw.astype(np.float32) / np.float32(255.0)

    def exemplar_visuals(self, boxes: np.ndarray, class_ids: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
        """Exemplar boxes → the visual-prompt masks an open-vocabulary detector embeds them from.

        boxes: (M, 4) float XYXY original-image pixels; class_ids: (M,) int, 0..K-1 (boxes of one class are one
        prompt). Returns (1, K, imgsz/8, imgsz/8) float32 in the letterboxed frame of ``preprocess``, made as
        ultralytics' visual-prompt predictor makes them (same scaling and padding, ``LoadVisualPrompt``).
        """
        from ultralytics.data.augment import LoadVisualPrompt

        s = self.spec.imgsz
        h, w = orig_hw
        gain = min(s / h, s / w)
        scaled = boxes.astype(np.float32) * gain
        scaled[:, 0::2] += round((s - round(w * gain)) / 2 - 0.1)
        scaled[:, 1::2] += round((s - round(h * gain)) / 2 - 0.1)
        visuals = LoadVisualPrompt().get_visuals(class_ids.astype(np.int32), (s, s), scaled)
        return visuals.numpy()[None].astype(np.float32)

    def postprocess(
        self,
        output: DetectorOutput,
        index: int,
        orig_hw: tuple[int, int],
        *,
        class_ids: list[int] | None,
        score_threshold: float,
        iou_threshold: float,
        max_instances: int,
        max_total: int | None = None,
    ) -> Detections:
        """NMS per prompt on image ``index`` of the batch; boxes scaled back to original pixels.

        Each prompt's detections are those it gets when sent alone, whatever else the request asks (at most
        ``max_instances`` per prompt):

        - open vocabulary (the classes are the request's prompts, each class's score its own dot product): NMS on
          each class's scores separately (those in ``class_ids``; None: all), exactly as a request with that class
          alone runs it, so one box (one anchor) can answer several classes (ultralytics' ``multi_label``, without
          its caps across classes);
        - closed, ``class_ids`` None (every class: one prompt): ultralytics' ``YOLO.predict`` semantics as they are,
          at most ``max_instances`` in all;
        - closed, ``class_ids`` given: each box's best class over the whole vocabulary, kept if in ``class_ids``,
          NMS per class (ultralytics' semantics: a class's answer does not depend on the other classes asked),
          then at most ``max_instances`` per class.

        Then at most ``max_total`` rows in all (None: no bound), highest score first, the bound on a request's work.
        """
        import torch
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import scale_boxes

        raw = torch.from_numpy(output.raw[index : index + 1])
        if self.spec.open_vocabulary:
            parts = [torch.zeros((0, 6))]
            scored = torch.nonzero((raw[0, 4:] > score_threshold).any(dim=1)).flatten().tolist()
            for k in scored if class_ids is None else sorted(set(scored) & set(class_ids)):
                (det,) = non_max_suppression(
                    raw[:, [0, 1, 2, 3, 4 + k]],
                    conf_thres=score_threshold,
                    iou_thres=iou_threshold,
                    max_det=max_instances,
                )
                det[:, 5] = k
                parts.append(det)
            det = torch.cat(parts)
        elif class_ids is None:
            (det,) = non_max_suppression(
                raw, conf_thres=score_threshold, iou_thres=iou_threshold, max_det=max_instances
            )
        else:  # at most one candidate per anchor: no cap before the per-class one
            anchors = raw.shape[2]
            (det,) = non_max_suppression(
                raw,
                conf_thres=score_threshold,
                iou_thres=iou_threshold,
                classes=class_ids,
                max_det=anchors,
                max_nms=anchors,
            )
            det = det[first_per_class(det[:, 5], max_instances)]
        det = det[torch.argsort(det[:, 4], descending=True, stable=True)[:max_total]]
        boxes = scale_boxes((self.spec.imgsz, self.spec.imgsz), det[:, :4].clone(), orig_hw)
        return Detections(
            boxes=np.asarray(boxes, dtype=np.float32),
            scores=det[:, 4].numpy().astype(np.float32),
            class_ids=det[:, 5].numpy().astype(np.int64),
        )


def first_per_class(class_ids: Any, count: int) -> Any:
    """Indices of the first ``count`` rows of each class (or text), in row order. class_ids: (N,) tensor."""
    import torch

    seen: dict[int, int] = {}
    keep = []
    for row, c in enumerate(class_ids.tolist()):
        seen[c] = seen.get(c, 0) + 1
        if seen[c] <= count:
            keep.append(row)
    return torch.tensor(keep, dtype=torch.long)
