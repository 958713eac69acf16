"""SAM 2 pre/post-processing, written once for every runner.

Uses sam2's own ``SAM2Transforms`` (resize + ImageNet normalisation, prompt coordinate scaling), configured
as ``SAM2ImagePredictor`` configures it, and its mask upsampling (bilinear to the original size, threshold 0)
done with OpenCV, so masks equal the predictor's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from service.models.tensors import DecoderOutput, PromptBatch, SegmenterSpec

MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0  # logits; SAM's automatic mask generator's stability_score_offset
# Prompts per decoder call. A call holds its prompts' (HW, C) image tokens at once: ~28 MB per prompt at SAM's 1024²
# on CPU (200 boxes in one call peaked at +5.7 GB), so larger prompt sets go in calls of this many; the image side
# the prompts share is computed once per call (sam_ops), which at 64 is a small part of the call.
MAX_PROMPTS_PER_CALL = 64
_BOX_LABELS = np.array([2, 3], dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class SamPrompt:
    """One object to segment. box: (4,) float32 XYXY or None; points: (P, 2) float32; labels: (P,) int32.

    All in original-image pixels.
    """

    box: np.ndarray | None
    points: np.ndarray
    point_labels: np.ndarray

    @property
    def signature(self) -> tuple[bool, int]:
        return (self.box is not None, int(self.points.shape[0]))


@dataclasses.dataclass(frozen=True)
class UpsampledMasks:
    """masks: (B, H, W) bool at original resolution (a view of column-major memory, as pycocotools' RLE encoder
    reads it); stability: (B,) float32 SAM stability scores of the upsampled logits (``stability_scores``)."""

    masks: np.ndarray
    stability: np.ndarray


class SegmenterProcessing:
    """Built once per server; stateless per call (``SAM2Transforms`` is scripted once here)."""

    def __init__(self, spec: SegmenterSpec) -> None:
        # torch and sam2 load here, not with the module: the server opens its port before they do.
        import torch
        from sam2.utils.transforms import SAM2Transforms

        self._torch = torch
        self.spec = spec
        self._transforms = SAM2Transforms(
            resolution=spec.image_size,
            mask_threshold=MASK_THRESHOLD,
            max_hole_area=0.0,
            max_sprinkle_area=0.0,
        )

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → (1, 3, S, S) float32, resized and ImageNet-normalised."""
        with self._torch.inference_mode():
            return self._transforms(rgb)[None].numpy()

    def prompt_batches(
        self, prompts: list[SamPrompt], orig_hw: tuple[int, int], multimask: bool
    ) -> Iterator[tuple[list[int], PromptBatch]]:
        """Groups prompts of equal shape (box or not, number of points) into batches, one decoder call each.

        Boxes-only prompts (every detection) form one batch, or several of MAX_PROMPTS_PER_CALL. Yields (indices into
        ``prompts``, batch).
        """
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.signature, []).append(i)
        chunks = [
            (has_box, indices[k : k + MAX_PROMPTS_PER_CALL])
            for (has_box, _), indices in groups.items()
            for k in range(0, len(indices), MAX_PROMPTS_PER_CALL)
        ]
        for has_box, indices in chunks:
            coords, labels = [], []
            for i in indices:
                p = prompts[i]
                c, lab = p.points, p.point_labels
                if has_box:
                    assert p.box is not None
                    c = np.concatenate([p.box.reshape(2, 2), c])  # box corners first, as sam2 orders them
                    lab = np.concatenate([_BOX_LABELS, lab])
                coords.append(c)
                labels.append(lab)
            with self._torch.inference_mode():
                sam_coords = self._transforms.transform_coords(
                    self._torch.from_numpy(np.stack(coords).astype(np.float32)), normalize=True, orig_hw=orig_hw
                )
            yield (
                indices,
                PromptBatch(
                    point_coords=sam_coords.numpy(),
                    point_labels=np.stack(labels).astype(np.int32),
                    multimask=multimask,
                ),
            )

    def postprocess(self, low_res_masks: Any, orig_hw: tuple[int, int]) -> UpsampledMasks:
        """(B, s, s) float32 logits → (B, H, W) bool masks at original resolution and their stability scores.

        The upsampling is sam2's (``SAM2Transforms.postprocess_masks``: bilinear, half-pixel centres, no
        hole filling here) done by OpenCV, ~10x faster than torch on CPU (logits agree to ~1e-6). The
        masks are a view of (H, W, B) column-major memory: the layout pycocotools' RLE encoder reads.
        Logits as a torch tensor (a device-resident runner's) are upsampled, thresholded and counted on their
        device, as sam2 does it (``F.interpolate``), and only the bool masks cross to the host.
        """
        if not isinstance(low_res_masks, np.ndarray):
            return self._postprocess_on_device(low_res_masks, orig_hw)
        h, w = orig_hw
        out = np.empty((h, w, low_res_masks.shape[0]), dtype=bool, order="F")
        stability = np.empty(low_res_masks.shape[0], dtype=np.float32)
        for i, logits in enumerate(low_res_masks):
            # Resizing the transposed logits gives the mask transposed, i.e. column-major: no copy to reorder.
            up = cv2.resize(np.ascontiguousarray(logits.T), (h, w), interpolation=cv2.INTER_LINEAR)
            out[:, :, i] = (up > MASK_THRESHOLD).T
            stability[i] = stability_scores(up[None], MASK_THRESHOLD)[0]
        return UpsampledMasks(out.transpose(2, 0, 1), stability)

    def _postprocess_on_device(self, low_res_masks: Any, orig_hw: tuple[int, int]) -> UpsampledMasks:
        """``postprocess`` for a (B, s, s) float32 torch tensor, on its device."""
        torch = self._torch
        with torch.inference_mode():
            up = torch.nn.functional.interpolate(
                low_res_masks[:, None].float(), size=orig_hw, mode="bilinear", align_corners=False
            )[:, 0]
            flat = up.flatten(1)
            inter = (flat > MASK_THRESHOLD + STABILITY_OFFSET).sum(1)
            union = (flat > MASK_THRESHOLD - STABILITY_OFFSET).sum(1)
            # (B, W, H) row-major = each mask column-major: the layout pycocotools reads, made on the device.
            masks = (up > MASK_THRESHOLD).transpose(1, 2).contiguous().cpu().numpy()
        stability = stability_from_counts(inter.cpu().numpy(), union.cpu().numpy())
        return UpsampledMasks(masks.transpose(0, 2, 1), stability)


class BestMasks:
    """The best candidate mask of each of N prompts, gathered over the decoder calls of one image.

    low_res: (N, s, s) float32 logits, numpy or (device-resident runner) a torch tensor on its device, like the
    decoder's output; scores: (N,) float32 predicted IoU of each chosen mask.
    """

    def __init__(self, n: int, side: int) -> None:
        self._n, self._side = n, side
        self.low_res: Any = None
        self.scores = np.zeros((n,), np.float32)

    def add(self, indices: list[int], out: DecoderOutput) -> None:
        """The decoder's answer for the prompts at ``indices``: keeps each prompt's highest-scoring candidate."""
        iou = out.iou_predictions
        best, rows = iou.argmax(axis=1), np.arange(len(iou))
        self.scores[indices] = iou[rows, best]
        masks, shape = out.low_res_masks, (self._n, self._side, self._side)
        if isinstance(masks, np.ndarray):
            if self.low_res is None:
                self.low_res = np.zeros(shape, np.float32)
            self.low_res[indices] = masks[rows, best]
            return
        import torch

        if self.low_res is None:
            self.low_res = torch.zeros(shape, dtype=torch.float32, device=masks.device)
        at = functools.partial(torch.as_tensor, device=masks.device)
        self.low_res[at(indices)] = masks[at(rows), at(best)]


def stability_scores(logits: np.ndarray, threshold: float, offset: float = STABILITY_OFFSET) -> np.ndarray:
    """(B, H, W) float32 mask logits → (B,) float32 IoU of (logits > threshold + offset) and
    (logits > threshold - offset); 1.0 where both are empty (SAM's ``calculate_stability_score``)."""
    flat = logits.reshape(logits.shape[0], -1)
    inter = (flat > threshold + offset).sum(axis=1, dtype=np.int64)
    union = (flat > threshold - offset).sum(axis=1, dtype=np.int64)
    return stability_from_counts(inter, union)


def stability_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """(B,) int64 pixel counts of (logits > threshold + offset) and (logits > threshold - offset) → (B,) float32
    stability scores (``stability_scores``; device-resident masks count on their device)."""
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float32)
