"""SAM 2 pre/post-processing, written once for every runner.

Uses sam2's own ``SAM2Transforms`` (resize + ImageNet normalisation, prompt coordinate scaling), configured
as ``SAM2ImagePredictor`` configures it, and its mask upsampling (bilinear to the original size, half-pixel
centres, threshold 0), computed only in each mask's window (``SegmenterProcessing.postprocess``), so masks equal
the predictor's.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from service.models.tensors import DecoderOutput, PromptBatch, SegmenterSpec
from service.processing.masks import Bounds
from service.processing.upsampling import MASK_THRESHOLD, UpsampledMasks, upsample_windows

# Prompts per decoder call, for every runner: bounds what one call holds. The exported decoder graph (onnx, triton)
# holds ~28 MB of activations per prompt at SAM's 1024² (200 boxes in one call peaked at +5.7 GB). The torch decoder
# (sam_ops.PromptDecoder: torch and openvino backends) computes the image side a call's prompts share once per call
# and takes them through in passes of its device's measured size (sam_ops.DECODER_POLICIES), so on it a call of 64
# costs per box what a pass does.
MAX_PROMPTS_PER_CALL = 64
_BOX_LABELS = np.array([2, 3], dtype=np.int32)
# SAM2VideoPredictor's frame normalisation (sam2.utils.misc.load_video_frames' defaults).
_VIDEO_MEAN, _VIDEO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SamPrompt:
    """One object to segment. box: (4,) float32 XYXY or None; points: (P, 2) float32; labels: (P,) int32.

    All in original-image pixels. previous: (S/4, S/4) float32 low-res logits of a mask this prompt corrects (a
    kept mask, RegionPrompt.previous_mask): SAM's mask input; None for none.
    """

    box: np.ndarray | None
    points: np.ndarray
    point_labels: np.ndarray
    previous: np.ndarray | None = None

    @property
    def signature(self) -> tuple[bool, int, bool]:
        """What prompts batched together share: a box or not, the number of points, a previous mask or not."""
        return (self.box is not None, int(self.points.shape[0]), self.previous is not None)


class SegmenterProcessing:
    """Built once per server; stateless per call (``SAM2Transforms`` is scripted once here)."""

    def __init__(self, spec: SegmenterSpec) -> None:
        # torch and sam2 load here, not with the module: the server opens its port before they do.
        import torch
        from sam2.utils.transforms import SAM2Transforms

        self._torch = torch
        self.spec = spec
        with warnings.catch_warnings():
            # sam2 scripts its transforms with torch.jit.script, which torch 2.9+ deprecates: a FutureWarning in
            # every server's start-up log that no user can act on.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            self._transforms = SAM2Transforms(
                resolution=spec.image_size,
                mask_threshold=MASK_THRESHOLD,
                max_hole_area=0.0,
                max_sprinkle_area=0.0,
            )
        self._video_mean = torch.tensor(_VIDEO_MEAN, dtype=torch.float32)[:, None, None]
        self._video_std = torch.tensor(_VIDEO_STD, dtype=torch.float32)[:, None, None]

    def preprocess(self, rgb: np.ndarray) -> Any:
        """(H, W, 3) uint8 RGB → (1, 3, S, S) float32, resized and ImageNet-normalised: numpy, or with the spec's
        ``input_device`` a tensor there, computed there from the uint8 pixels (sam2's own transforms, whose
        ``ToTensor`` is this permute and division)."""
        torch = self._torch
        with torch.inference_mode():
            if self.spec.input_device is None:
                return self._transforms(rgb)[None].numpy()
            pixels = torch.from_numpy(rgb).to(self.spec.input_device, non_blocking=True)
            return self._transforms.transforms(pixels.permute(2, 0, 1).float().div(255))[None]

    def preprocess_frame(self, rgb: np.ndarray) -> Any:
        """A video frame, (H, W, 3) uint8 RGB → (1, 3, S, S) float32, as ``SAM2VideoPredictor`` loads a video's
        frames (``sam2.utils.misc.load_video_frames``): Pillow's resize to S x S (its default filter, bicubic), divided
        by 255 in float64, then float32 and ImageNet-normalised. ``preprocess`` (the image predictor's: a bilinear
        resize) gave tracked frames other features than sam2's video predictor computes. With the spec's
        ``input_device``: a tensor there."""
        from PIL import Image

        torch, side = self._torch, self.spec.image_size
        with torch.inference_mode():
            resized = np.asarray(Image.fromarray(rgb).resize((side, side)))
            frame = torch.from_numpy(resized / 255.0).permute(2, 0, 1).float()
            frame = ((frame - self._video_mean) / self._video_std)[None]
            if self.spec.input_device is None:
                return frame.numpy()
            return frame.to(self.spec.input_device, non_blocking=True)

    def prompt_batches(
        self, prompts: list[SamPrompt], orig_hw: tuple[int, int], multimask: bool
    ) -> Iterator[tuple[list[int], PromptBatch]]:
        """Groups prompts of equal shape (box or not, number of points, previous mask or not) into batches, one
        decoder call each.

        Boxes-only prompts (every detection) form one batch, or several of MAX_PROMPTS_PER_CALL. Yields (indices into
        ``prompts``, batch).
        """
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.signature, []).append(i)
        chunks = [
            (has_box, indices[k : k + MAX_PROMPTS_PER_CALL])
            for (has_box, _, _), indices in groups.items()
            for k in range(0, len(indices), MAX_PROMPTS_PER_CALL)
        ]
        for has_box, indices in chunks:
            previous = [m for m in (prompts[i].previous for i in indices) if m is not None]  # all or none
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
                    mask_input=np.stack(previous)[:, None].astype(np.float32) if previous else None,
                ),
            )

    def postprocess(
        self,
        low_res_masks: Any,
        orig_hw: tuple[int, int],
        within: Sequence[Bounds | None] | None = None,
        rle: bool = False,
    ) -> UpsampledMasks:
        """(B, s, s) float32 logits → B masks at original resolution, each computed only in its window, and their
        stability scores.

        The upsampling is sam2's (``SAM2Transforms.postprocess_masks``: bilinear, half-pixel centres, no hole
        filling here), each pixel computed in float32 with OpenCV's weights (``Axis``), but only where it matters.
        A pixel is a convex combination of the 2 × 2 low-res cells of its block, so a mask's window is the blocks
        whose cells reach the threshold (the bounding box of the cells above it, grown by one cell, in pixels),
        intersected with ``within`` (per mask, a window outside which the caller clears the mask anyway:
        refinement's box + margin; None = the frame). Stability counts the whole frame: a block whose 4 cells all
        clear a level counts whole or not at all, only undecided blocks are computed pixel by pixel. Masks and
        counts equal those of computing every pixel of the frame (``upsample_frame``; the tests compare them), in
        time and memory that follow the windows, not the frame.

        Logits as a torch tensor (a device-resident runner's) are processed on its device, numpy logits by the same
        code on the CPU; only the windows' bool crops (and, with ``rle``, the masks' COCO RLE run lengths, found
        there) cross to the host. ``rle``: also give each mask's pycocotools compressed counts.
        """
        return upsample_windows(low_res_masks, orig_hw, within, rle)


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
