"""Pre/post-processing of concept prompts (SAM 3: texts → boxes and masks in one model), runner-independent.

Mirrors ultralytics' ``SAM3SemanticPredictor`` (tests compare with it on the same weights): the image is
stretched to S x S (no padding) and scaled to [-1, 1]; a query's score is sigmoid(logit) x sigmoid(presence
logit of its text); queries scoring above the threshold go through per-text NMS; boxes are scaled to the
original image; masks are the query's mask logits upsampled bilinearly to the original size, above 0.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from service.processing.detection import first_per_class
from service.processing.masks import EncodedMask, encode_masks

_CLASS_OFFSET = 7680  # per-text NMS by offsetting boxes (ultralytics' max_wh), on boxes in fractions of the input
_MASK_CHUNK = 16  # masks upsampled at a time: bounds memory to 16 x H x W floats


@dataclasses.dataclass(frozen=True)
class ConceptDetections:
    """N answers, highest score first. boxes: (N, 4) float32 original-image pixels XYXY, clipped to the image;
    scores: (N,) float32 in [0, 1]; text_ids: (N,) int64 index of the text each answers; masks: N encoded;
    areas, parts: (N,) int64 each mask's pixels and 8-connected parts (what the review rules read)."""

    boxes: np.ndarray
    scores: np.ndarray
    text_ids: np.ndarray
    masks: list[EncodedMask]
    areas: np.ndarray
    parts: np.ndarray


class ConceptProcessing:
    def __init__(self, image_size: int, mask_threshold: float = 0.0) -> None:
        self.image_size = image_size
        self.mask_threshold = mask_threshold

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → (1, 3, S, S) float32 in [-1, 1], stretched (aspect ratio not kept)."""
        s = self.image_size
        resized = rgb if rgb.shape[:2] == (s, s) else cv2.resize(rgb, (s, s), interpolation=cv2.INTER_LINEAR)
        x = resized.transpose(2, 0, 1)[None].astype(np.float32)
        return (x - 127.5) / 127.5

    def postprocess(
        self,
        boxes: np.ndarray,
        logits: np.ndarray,
        presence: np.ndarray,
        mask_logits: np.ndarray,
        hw: tuple[int, int],
        score_threshold: float,
        iou_threshold: float,
        max_instances: int,
        mask_encoding: str,
        max_total: int | None = None,
    ) -> ConceptDetections:
        """SAM 3's raw answer (``service.models.sam3.Grounding`` fields) → the kept detections of an H x W image: at
        most ``max_instances`` per text (or exemplar label), each text answered as if it were asked alone, then at most
        ``max_total`` in all (None: no bound), highest scores first."""
        import torch
        import torch.nn.functional as F
        import torchvision

        t_boxes, t_logits = torch.from_numpy(boxes), torch.from_numpy(logits)
        scores = t_logits.sigmoid() * torch.from_numpy(presence).sigmoid()[:, None]  # (T, Q)
        text_ids = torch.arange(scores.shape[0])[:, None].expand_as(scores)
        keep = scores > score_threshold
        cx, cy, w, h = t_boxes[keep].unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        scores, text_ids = scores[keep], text_ids[keep]
        order = torchvision.ops.nms(xyxy + text_ids[:, None].to(xyxy.dtype) * _CLASS_OFFSET, scores, iou_threshold)
        order = order[first_per_class(text_ids[order], max_instances)][:max_total]  # nms: highest score first
        height, width = hw
        xyxy = xyxy[order] * torch.tensor([width, height, width, height], dtype=xyxy.dtype)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        kept_masks = torch.from_numpy(mask_logits)[keep][order]
        encoded: list[EncodedMask] = []
        areas, parts = np.zeros(len(order), np.int64), np.zeros(len(order), np.int64)
        for i in range(0, len(order), _MASK_CHUNK):
            up = F.interpolate(kept_masks[i : i + _MASK_CHUNK][None], (height, width), mode="bilinear")[0]
            binary = (up > self.mask_threshold).numpy()
            encoded.extend(encode_masks(binary, mask_encoding))
            for k, mask in enumerate(binary, start=i):
                areas[k] = np.count_nonzero(mask)
                parts[k] = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1 if areas[k] else 0
        return ConceptDetections(
            boxes=xyxy.numpy().astype(np.float32),
            scores=scores[order].numpy().astype(np.float32),
            text_ids=text_ids[order].numpy().astype(np.int64),
            masks=encoded,
            areas=areas,
            parts=parts,
        )
