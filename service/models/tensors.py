"""The tensor contracts between the pipeline, the per-model processing and the runners: what each model is
(``*Spec``) and what it takes and returns (``ClassPrompts``, ``PromptBatch``, ``DetectorOutput``, ``ImageFeatures``,
``ConceptOutput``, ``DecoderOutput``). All arrays are numpy unless stated; coordinate frames are stated per field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """Static facts the detector pre/post-processing needs.

    names: the fixed vocabulary (index = class id); for an open-vocabulary detector, the classes it was
    calibrated or trained with (every request brings its own). class_dim: the width of the class embeddings an
    open-vocabulary detector takes (``ClassPrompts``); 0 for a closed detector.
    """

    names: tuple[str, ...]
    imgsz: int  # square letterbox side, pixels
    stride: int
    class_dim: int
    visual_prompts: bool = False  # example regions can become classes (``Runner.embed_exemplars``; YOLOE)

    @property
    def open_vocabulary(self) -> bool:
        return self.class_dim > 0


@dataclasses.dataclass(frozen=True)
class ClassPrompts:
    """The vocabulary of one open-vocabulary detection: text classes first, then exemplar classes.

    embeddings: (len(names), class_dim) float32 class embeddings as the detector's head takes them: rows of
    ``Runner.embed_classes`` for the text classes, then rows of ``Runner.embed_exemplars`` (averaged per label)
    for the exemplar classes. Detections whose class prompts are equal share forward passes and cached outputs;
    ``key`` says which are equal.
    """

    names: tuple[str, ...]
    embeddings: np.ndarray

    @functools.cached_property
    def key(self) -> tuple[tuple[str, ...], str]:
        return self.names, hashlib.sha256(np.ascontiguousarray(self.embeddings).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class SegmenterSpec:
    image_size: int  # square SAM input side, pixels
    # Where ``Runner.encode`` takes its images: None, the host (numpy); a torch device (a device-resident runner's,
    # e.g. "cuda:0"), a tensor there: the image crosses as uint8 and is resized and normalised on that device.
    input_device: str | None = None


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """A concept segmenter (SAM 3): texts → boxes and masks in one model."""

    image_size: int  # square input side, pixels (a multiple of 14)
    mask_threshold: float  # mask logit above which a pixel is in


@dataclasses.dataclass(frozen=True)
class ConceptOutput:
    """A concept segmenter's raw answer for T prompts (texts, then exemplar classes) on one image, Q queries each.

    boxes: (T, Q, 4) float32 normalised cxcywh (fractions of the input side); logits: (T, Q) float32; presence:
    (T,) float32 logits of each text's concept being in the image; mask_logits: (T, Q, h, w) float32.
    """

    boxes: np.ndarray
    logits: np.ndarray
    presence: np.ndarray
    mask_logits: np.ndarray


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    dim: int  # embedding width; embeddings are L2-normalised


@dataclasses.dataclass(frozen=True)
class DetectorOutput:
    """Raw detector head: (N, 4 + num_classes, num_anchors) float32, boxes XYWH in letterboxed pixels.

    num_classes: the fixed vocabulary's size, or the number of ClassPrompts names of the call."""

    raw: np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """SAM 2 image embeddings for N images.

    image_embed: (N, 256, S/16, S/16); high_res_feats: [(N, 32, S/4, S/4), (N, 64, S/8, S/8)]. float32 numpy arrays,
    except from the torch runner on a GPU: torch tensors on that device (device-resident: they stay there, in the
    embedding cache too, and only that runner's decoder reads them; float32, or bfloat16 under its autocast).
    ``on_host`` gives numpy copies (the shared Redis tier stores those).
    """

    image_embed: Any
    high_res_feats: tuple[Any, ...]

    def on_host(self) -> ImageFeatures:
        """The same features as float32 numpy arrays (self when they are already)."""
        if isinstance(self.image_embed, np.ndarray):
            return self
        return ImageFeatures(
            image_embed=to_numpy(self.image_embed), high_res_feats=tuple(to_numpy(f) for f in self.high_res_feats)
        )

    def select(self, index: int) -> ImageFeatures:
        """Features of image ``index`` with a batch dimension of 1 (views, no copy)."""
        return ImageFeatures(
            image_embed=self.image_embed[index : index + 1],
            high_res_feats=tuple(f[index : index + 1] for f in self.high_res_feats),
        )

    @property
    def nbytes(self) -> int:
        return int(self.image_embed.nbytes + sum(f.nbytes for f in self.high_res_feats))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """B prompts for ONE image, all with the same number of points.

    point_coords: (B, P, 2) float32 in SAM input pixels ([0, S]); box corners come first with labels 2, 3.
    point_labels: (B, P) int32: 1 positive, 0 negative, 2/3 box corners.
    mask_input: (B, 1, S/4, S/4) float32 low-res logits of the masks these prompts correct (SAM's mask input, as
    ``SAM2ImagePredictor.predict(mask_input=...)``), or None: no prompt of the batch has one.
    """

    point_coords: np.ndarray
    point_labels: np.ndarray
    multimask: bool = False
    mask_input: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DecoderOutput:
    """low_res_masks: (B, M, S/4, S/4) float32 logits; iou_predictions: (B, M) float32 numpy; M = 3 if multimask
    else 1. The masks are a numpy array, or a float32 torch tensor on the device when the runner is device-resident
    (``ImageFeatures``): the pipeline then upsamples and thresholds them there and moves only the final bits."""

    low_res_masks: Any
    iou_predictions: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrackStep:
    """One object on one frame of a video stream (``Runner.track``).

    memory: the object's memory bank (``Runner.track_memory()``; opaque, updated in place by the call).
    frame_index: the frame's position in the stream (increasing per object).
    points: (P, 2) float32 in SAM input pixels, box corners first (labels 2, 3), with labels (P,) int32: the object is
    prompted on this frame (it starts, or a tracked one is corrected); None: it is tracked from its memory.
    """

    memory: Any
    frame_index: int
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class MemoryCorrection:
    """A tracked object's memory of the frame it was just tracked on, re-encoded from ``mask`` (S/4, S/4) float32
    logits (``Runner.remember``): e.g. the frame's detection of it."""

    memory: Any
    frame_index: int
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrackOutput:
    """Per TrackStep: low_res_masks (N, S/4, S/4) float32 logits; object_scores (N,) float32 logits of the object being
    visible on the frame (> 0: visible), numpy."""

    low_res_masks: np.ndarray
    object_scores: np.ndarray


def to_numpy(array: Any) -> np.ndarray:
    """A numpy array, or a torch tensor on any device and of any float dtype → float32 numpy (a copy for tensors)."""
    if isinstance(array, np.ndarray):
        return array
    return array.detach().float().cpu().numpy()
