"""SAM 2's video memory, streamed: what ``SAM2VideoPredictor`` does per object and frame, without its whole-video
``inference_state``, so that a stream of any length holds a bounded amount of memory.

The image encoder is not run here: a frame's features come from the runner (``ImageFeatures``, any backend), and
``frame_features`` turns them back into the sequences sam2's tracking code reads (the image embedding without the
no-memory embedding the image path adds; the position encoding of the top level, which depends on its size alone).
Everything else is sam2's own code on sam2's own module: ``track_step`` (memory attention over the object's memory
bank, the SAM heads, the memory encoder) and ``_encode_new_memory`` for a frame where the object was prompted, in
the order ``SAM2VideoPredictor`` calls them (``add_new_points_or_box``, then ``propagate_in_video``):

- a prompted object's first frame is a *conditioning* frame: decoded without memory, its memory encoded from the
  hole-filled low-res mask upsampled to the input size and binarised (``is_mask_from_pts``); a later prompt on a
  tracked object (a correction) is decoded from its memory and becomes a conditioning frame too (sam2's
  ``add_all_frames_to_correct_as_cond``, the MOSE fine-tuning recipe's choice: on a live stream the user's
  correction is the best anchor there is);
- every later frame is tracked from memory with the memory encoder run on the new prediction.

Each object is tracked on its own (as ``SAM2VideoPredictor`` does since sam2 1.1), so objects that started on
different frames never share a batch. The memory an object keeps (``ObjectMemory``) is bounded: its conditioning
frames (at most ``max_cond_frames``: the first and the most recent), and the recent frames sam2's attention can
read (``num_maskmem - 1`` memory frames, ``max_obj_ptrs_in_encoder - 1`` object pointers; older entries are
dropped). Memory features are stored in bfloat16, as the predictor stores them.

Small holes (background components of at most ``FILL_HOLE_AREA`` low-res pixels, 8-connected) are filled in the
masks that are output and stored, as the predictor does with its CUDA kernel; here with scipy on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from service.models.tensors import ImageFeatures

# SAM2VideoPredictor's post-processing (build_sam2_video_predictor): masks from prompts are binarised before the
# memory encoder, and background holes up to this many low-res pixels are filled.
FILL_HOLE_AREA = 8
# A stream has no known length; sam2 only compares frame indices with it.
_PRESENT = 1e-3  # an object score logit above 0: sam2 encodes a memory as of an object present (no no-object embed)
_STREAM_LENGTH = 2**62
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class FrameFeatures:
    """One frame's features as sam2's tracking code reads them: ``vision_feats`` [(HW, 1, C_l)] finest level first
    (the top level without the no-memory embedding), ``pos`` the top level's position encoding (HW, 1, C), ``sizes``
    [(h, w)] per level."""

    vision_feats: tuple[torch.Tensor, ...]
    pos: torch.Tensor
    sizes: tuple[tuple[int, int], ...]


@dataclasses.dataclass
class ObjectMemory:
    """One tracked object's memory bank: sam2's per-object ``output_dict`` (frame index → compact output), bounded.

    ``frames`` is the dict sam2's ``_prepare_memory_conditioned_features`` reads
    ({"cond_frame_outputs": {...}, "non_cond_frame_outputs": {...}})."""

    frames: dict[str, dict[int, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    )

    @property
    def started(self) -> bool:
        return bool(self.frames["cond_frame_outputs"])

    def nbytes(self) -> int:
        """Bytes of the tensors held (memory features, masks, pointers)."""
        total = 0
        for outputs in self.frames.values():
            for out in outputs.values():
                for key in ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits"):
                    value = out.get(key)
                    if value is not None:
                        total += value.numel() * value.element_size()
        return total


@dataclasses.dataclass(frozen=True)
class ObjectStep:
    """One object on one frame: ``low_res_mask`` (1, 1, S/4, S/4) float32 logits (hole-filled), ``object_score``
    the object-presence logit (> 0: the object is visible)."""

    low_res_mask: torch.Tensor
    object_score: float


def tracks(sam: Any) -> bool:
    """Whether the memory path of this SAM 2 module fits its image path: the top level's position encoding and the
    memory encoder's input are as wide as the image embedding (the demo's reduced SAM 2 shrank its image path by
    hydra overrides alone, which left both at SAM 2.1-T's 256: its image path works, its memory path cannot)."""
    with torch.inference_mode():
        pos = sam.image_encoder.neck.position_encoding(torch.zeros(1, sam.hidden_dim, 2, 2))
    return int(pos.shape[1]) == sam.hidden_dim and sam.memory_encoder.pix_feat_proj.in_channels == sam.hidden_dim


def shares_image_encoder(segmenter: Any, tracker: Any) -> bool:
    """Whether two SAM 2 modules compute the same frame features: equal image encoders and no-memory embeddings."""
    ours, theirs = segmenter.state_dict(), tracker.state_dict()
    names = [n for n in ours if n.startswith("image_encoder.") or n == "no_mem_embed"]
    return all(n in theirs and torch.equal(ours[n].float(), theirs[n].float()) for n in names)


class MemoryTracker:
    """Streams SAM 2's per-object video tracking on one SAM 2 module (``sam2.modeling.sam2_base.SAM2Base``; one for
    which ``tracks`` holds).

    ``max_cond_frames``: conditioning frames kept per object (>= 1; the first one is always kept)."""

    def __init__(self, sam: Any, max_cond_frames: int = 4) -> None:
        if max_cond_frames < 1:
            raise ValueError("max_cond_frames must be >= 1")
        self._sam = sam
        # Read only by _encode_new_memory, which the image path never calls (SAM2VideoPredictor sets it too).
        sam.binarize_mask_from_pts_for_mem_enc = True
        self.max_cond_frames = max_cond_frames
        self.memory_frames = sam.num_maskmem - 1
        self.pointer_frames = sam.max_obj_ptrs_in_encoder - 1
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def image_size(self) -> int:
        return int(self._sam.image_size)

    @torch.inference_mode()
    def frame_features(self, features: ImageFeatures) -> FrameFeatures:
        """Runner features of one frame (batch 1) → the sequences ``track_step`` reads."""
        device = self._sam.no_mem_embed.device
        embed, hr0, hr1 = (
            torch.as_tensor(f).to(device=device, dtype=torch.float32)
            for f in (features.image_embed, *features.high_res_feats)
        )
        maps = [hr0, hr1, embed]
        seqs = [m.flatten(2).permute(2, 0, 1) for m in maps]
        if self._sam.directly_add_no_mem_embed:  # the image path adds it; memory attention takes the raw features
            seqs[-1] = seqs[-1] - self._sam.no_mem_embed
        sizes = tuple((int(m.shape[-2]), int(m.shape[-1])) for m in maps)
        return FrameFeatures(tuple(seqs), self._top_position(embed), sizes)

    def _top_position(self, embed: torch.Tensor) -> torch.Tensor:
        size = (int(embed.shape[-2]), int(embed.shape[-1]))
        if size not in self._pos:
            pos = self._sam.image_encoder.neck.position_encoding(embed[:1])
            self._pos[size] = pos.to(embed.dtype).flatten(2).permute(2, 0, 1)
        return self._pos[size]

    @torch.inference_mode()
    def start(
        self, frame: FrameFeatures, index: int, points: np.ndarray, labels: np.ndarray, memory: ObjectMemory
    ) -> ObjectStep:
        """Prompts an object on frame ``index`` (a conditioning frame). points (P, 2) float32 in SAM input pixels,
        box corners first with labels 2, 3; labels (P,) int32. ``memory``: a new bank, or the object's own to
        re-prompt it: then decoded from its memory with the mask it has on this frame as SAM's mask input (clamped
        to [-32, 32]), as sam2's predictor corrects a frame it has tracked (its propagation reached the frame
        before the click; here the frame is tracked first, without a memory of its own)."""
        device = self._sam.no_mem_embed.device
        point_inputs = {
            "point_coords": torch.as_tensor(points, dtype=torch.float32, device=device)[None],
            "point_labels": torch.as_tensor(labels, dtype=torch.int32, device=device)[None],
        }
        initial = not memory.started
        previous = None if initial else torch.clamp(self._tracked_mask(frame, index, memory), -32.0, 32.0)
        out = self._step(frame, index, memory, initial=initial, points=point_inputs, previous=previous)
        masks = fill_holes(out["pred_masks"])
        features, pos_enc = self._encode_memory(frame, masks, out["object_score_logits"])
        memory.frames["non_cond_frame_outputs"].pop(index, None)
        memory.frames["cond_frame_outputs"][index] = _compact(out, masks, features, pos_enc)
        self._bound(memory, index)
        return ObjectStep(masks, float(out["object_score_logits"].item()))

    def _tracked_mask(self, frame: FrameFeatures, index: int, memory: ObjectMemory) -> torch.Tensor:
        """The object's (1, 1, S/4, S/4) mask logits on frame ``index``: its output there if it has one, else
        tracked from its memory (nothing stored: the frame's memory is the correction's)."""
        for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
            entry = memory.frames[kind].get(index)
            if entry is not None:
                return entry["pred_masks"]
        return fill_holes(self._step(frame, index, memory)["pred_masks"])

    def _step(
        self,
        frame: FrameFeatures,
        index: int,
        memory: ObjectMemory,
        *,
        initial: bool = False,
        points: dict[str, torch.Tensor] | None = None,
        previous: torch.Tensor | None = None,
        encode: bool = False,
    ) -> dict[str, Any]:
        """sam2's ``track_step`` of one object on frame ``index`` with its memory bank: prompted by ``points`` (with
        ``previous`` mask logits as SAM's mask input) or from its memory; ``encode``: run the memory encoder too."""
        return self._sam.track_step(
            frame_idx=index,
            is_init_cond_frame=initial,
            current_vision_feats=list(frame.vision_feats),
            current_vision_pos_embeds=[None, None, frame.pos],
            feat_sizes=list(frame.sizes),
            point_inputs=points,
            mask_inputs=None,
            output_dict=memory.frames,
            num_frames=_STREAM_LENGTH,
            run_mem_encoder=encode,
            prev_sam_mask_logits=previous,
        )

    @torch.inference_mode()
    def track(self, frame: FrameFeatures, index: int, memory: ObjectMemory) -> ObjectStep:
        """Tracks a started object onto frame ``index`` (after every frame it has been tracked on) from its memory."""
        if not memory.started:
            raise ValueError("track: the object has no prompted frame yet")
        out = self._step(frame, index, memory, encode=True)
        masks = fill_holes(out["pred_masks"])
        memory.frames["non_cond_frame_outputs"][index] = _compact(
            out, masks, out["maskmem_features"], out["maskmem_pos_enc"]
        )
        self._bound(memory, index)
        return ObjectStep(masks, float(out["object_score_logits"].item()))

    @torch.inference_mode()
    def remember(self, frame: FrameFeatures, index: int, memory: ObjectMemory, mask: np.ndarray) -> None:
        """Re-encodes an object's memory of frame ``index``, on which it was just tracked, from ``mask`` (S/4, S/4)
        float32 logits (the frame's detection of it, matched) instead of its propagated mask: what later frames
        read of this one is then what the frame showed. A frame the object was prompted on stays as prompted. The
        detection showed the object: it is encoded as present (without SAM's no-object embedding) whatever SAM's own
        object score said; the frame's object pointer stays the one SAM computed."""
        entry = memory.frames["non_cond_frame_outputs"].get(index)
        if entry is None:
            return
        device = self._sam.no_mem_embed.device
        masks = torch.as_tensor(mask, dtype=torch.float32, device=device)[None, None]
        present = entry["object_score_logits"].clamp(min=_PRESENT)
        features, pos_enc = self._encode_memory(frame, masks, present)
        memory.frames["non_cond_frame_outputs"][index] = _compact(entry, masks, features, pos_enc)

    def _encode_memory(self, frame: FrameFeatures, masks: torch.Tensor, object_scores: torch.Tensor) -> Any:
        """sam2's memory encoder on a frame's (1, 1, S/4, S/4) mask logits, upsampled to the input size as sam2
        does, binarised as a prompted frame's (``is_mask_from_pts``): (memory features, position encodings)."""
        high_res = F.interpolate(masks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self._sam._encode_new_memory(
            current_vision_feats=list(frame.vision_feats),
            feat_sizes=list(frame.sizes),
            pred_masks_high_res=high_res,
            object_score_logits=object_scores,
            is_mask_from_pts=True,
        )

    @torch.inference_mode()
    def track_many(self, frame: FrameFeatures, index: int, memories: Sequence[ObjectMemory]) -> list[ObjectStep]:
        """``track`` for several objects: those whose banks hold the same frames (objects that started together and
        were never corrected apart) go through sam2's track_step as one batch, as ``SAM2VideoPredictor`` batched
        objects before sam2 1.1 (every step is per object along the batch; the memory encoder's non-overlap option,
        which would couple them, is off in SAM 2.1's configs and refused here)."""
        if self._sam.non_overlap_masks_for_mem_enc:
            return [self.track(frame, index, m) for m in memories]
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, m in enumerate(memories):
            groups.setdefault(_layout(m), []).append(i)
        steps: list[ObjectStep | None] = [None] * len(memories)
        for members in groups.values():
            if len(members) == 1:
                steps[members[0]] = self.track(frame, index, memories[members[0]])
                continue
            for i, step in zip(members, self._track_batch(frame, index, [memories[i] for i in members]), strict=True):
                steps[i] = step
        return [s for s in steps if s is not None]

    def _track_batch(self, frame: FrameFeatures, index: int, memories: list[ObjectMemory]) -> list[ObjectStep]:
        b = len(memories)
        if not memories[0].started:
            raise ValueError("track: the object has no prompted frame yet")
        batched: dict[str, dict[int, dict[str, Any]]] = {}
        for key, outputs in memories[0].frames.items():
            batched[key] = {}
            for t, first in outputs.items():
                entries = [m.frames[key][t] for m in memories]
                features = first["maskmem_features"]
                batched[key][t] = {
                    "maskmem_features": None
                    if features is None
                    else torch.cat([e["maskmem_features"] for e in entries]),
                    "maskmem_pos_enc": [p.expand(b, -1, -1, -1) for p in first["maskmem_pos_enc"]],
                    "obj_ptr": torch.cat([e["obj_ptr"] for e in entries]),
                }
        out = self._sam.track_step(
            frame_idx=index,
            is_init_cond_frame=False,
            current_vision_feats=[x.expand(-1, b, -1) for x in frame.vision_feats],
            current_vision_pos_embeds=[None, None, frame.pos.expand(-1, b, -1)],
            feat_sizes=list(frame.sizes),
            point_inputs=None,
            mask_inputs=None,
            output_dict=batched,
            num_frames=_STREAM_LENGTH,
            run_mem_encoder=True,
        )
        masks = fill_holes(out["pred_masks"])
        steps = []
        for i, memory in enumerate(memories):
            one = {
                "obj_ptr": out["obj_ptr"][i : i + 1],
                "object_score_logits": out["object_score_logits"][i : i + 1],
            }
            features, pos_enc = out["maskmem_features"][i : i + 1], [p[i : i + 1] for p in out["maskmem_pos_enc"]]
            memory.frames["non_cond_frame_outputs"][index] = _compact(one, masks[i : i + 1], features, pos_enc)
            self._bound(memory, index)
            steps.append(ObjectStep(masks[i : i + 1], float(one["object_score_logits"].item())))
        return steps

    def _bound(self, memory: ObjectMemory, index: int) -> None:
        """Drops what sam2's attention can no longer read from frame ``index + 1`` on: non-conditioning outputs
        older than the pointer window (their memory features older than the memory window), and conditioning
        frames beyond ``max_cond_frames`` (the oldest after the first)."""
        recent = memory.frames["non_cond_frame_outputs"]
        for t in [t for t in recent if t <= index - self.pointer_frames]:
            del recent[t]
        for t, out in recent.items():
            if t <= index - self.memory_frames:
                out["maskmem_features"] = None
        cond = memory.frames["cond_frame_outputs"]
        while len(cond) > self.max_cond_frames:
            del cond[sorted(cond)[1]]


def _layout(memory: ObjectMemory) -> tuple[object, ...]:
    """What sam2's attention reads from a bank: its frames, and which of them still hold memory features."""
    return tuple(
        tuple((t, outputs[t]["maskmem_features"] is not None) for t in sorted(outputs))
        for outputs in memory.frames.values()
    )


def _compact(out: dict[str, Any], masks: torch.Tensor, features: Any, pos_enc: Any) -> dict[str, Any]:
    """sam2's compact per-frame output (``SAM2VideoPredictor._run_single_frame_inference``)."""
    return {
        "maskmem_features": features.to(torch.bfloat16),
        "maskmem_pos_enc": [p[0:1] for p in pos_enc],
        "pred_masks": masks,
        "obj_ptr": out["obj_ptr"],
        "object_score_logits": out["object_score_logits"],
    }


def fill_holes(masks: torch.Tensor, max_area: int = FILL_HOLE_AREA) -> torch.Tensor:
    """sam2's ``fill_holes_in_mask_scores``: background components (score <= 0, 8-connected) of at most
    ``max_area`` pixels get the score 0.1. masks (N, 1, h, w) float logits."""
    background = (masks <= 0).cpu().numpy()
    holes = np.zeros_like(background)
    for i in range(background.shape[0]):
        labels, count = ndimage.label(background[i, 0], structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel())
        small = areas <= max_area
        small[0] = False
        holes[i, 0] = small[labels]
    if not holes.any():
        return masks
    return torch.where(torch.from_numpy(holes).to(masks.device), torch.tensor(0.1, dtype=masks.dtype), masks)
