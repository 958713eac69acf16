"""Trains the demo tracker: the memory path of the demo's reduced SAM 2 on the shapes video world.

    python -m service.training.train_tracker [--minutes 40] [--seed 0]

The module is ``SHAPES_SAM2_CONFIG`` + ``SHAPES_SAM2_VIDEO_OVERRIDES``: the demo segmenter's architecture with its
memory path as wide as its image path. The server computes a frame's features with the IMAGE module
(``shapes-sam2-mini.pt``, ``sam_ops.image_features``) and tracks with this one (``sam_memory.MemoryTracker``), so:

- copied from ``shapes-sam2-mini.pt`` and FROZEN: the image encoder (trunk + neck), ``no_mem_embed`` (the image path
  adds it, ``MemoryTracker.frame_features`` subtracts this module's) and the decoder's ``conv_s0``/``conv_s1`` (they
  project the high-resolution features inside ``forward_image``: the tracker reads the image module's projections);
  checked bit-equal to the image checkpoint's after training;
- copied from ``shapes-sam2-mini.pt`` and trained: the rest of the mask decoder and the prompt encoder (the decoder
  must now also read memory-conditioned features, with no prompt);
- trained from sam2's seeded initialisation: the memory attention, the memory encoder, ``maskmem_tpos_enc``,
  ``no_mem_pos_enc``, the object-pointer projections (``obj_ptr_proj``, ``obj_ptr_tpos_proj``), ``no_obj_ptr``,
  ``no_obj_embed_spatial`` and ``mask_downsample`` (the object pointer of a mask prompt).

The recipe is SAM 2's (paper §4 and appendix D; sam2's ``SAM2Train`` and ``MultiStepMultiMasksAndIous``), on the
image encoder's features pre-computed once for a pool of train-split videos (the encoder is frozen): every step
takes a batch of 8-frame clips (windows of the pool's videos taking every 1st, 2nd or 3rd frame, forwards or
backwards; half of them drawn until an object disappears in them, behind another or out of frame, as such frames
are rare), prompts every object visible on the clip's first frame there (one prompt kind per step: a jittered
ground-truth box half the time, 1-3 positive clicks or the ground-truth mask a quarter each), and tracks them through
the clip with sam2's own ``_track_step`` and ``_encode_new_memory`` in the order ``MemoryTracker`` runs them
(objects of all clips as one batch: they all start on frame 0), with the stream length ``MemoryTracker`` gives sam2
(16 object pointers, distances normalised by 15). Half of the steps number the tracked frames as if the prompt
were up to 60 frames older (``gap``), so that the prompt's object pointer is also read at the distances a long
stream reads it at. Memory features are rounded to bfloat16 as the tracker stores them, and gradients run through
the memory over the whole clip. With probability
``--correct-rate`` one later frame gets a correction: a click in the largest error region of each object's
prediction, decoded from memory and made a conditioning frame (what ``MemoryTracker.start`` does on a tracked
object). Loss per frame and object (SAM 2's weights): 20 x focal + dice on the best of the multimask outputs (the
one output on single-mask frames) and L1 on the IoU head (all outputs), only where the object is visible; binary
cross-entropy on the object-score logit (visible or not) everywhere. The module runs in eval() mode (no dropout,
the stability fallback and binarised prompt masks of inference). AdamW; warm-up, then a cosine schedule over the
wall-time budget, which covers rendering and feature extraction too. Writes ``shapes-sam2-mini-video.pt``
({"model": fp16 state dict}, the layout of official SAM 2.1 checkpoints).

``evaluate`` measures a checkpoint the way the service tracks (``--eval-only --init PATH`` alone): on held-out
val-split videos every object visible on frame 0 is prompted with its ground-truth box and tracked by
``MemoryTracker`` on frame features from the image module; J (mask IoU), F (boundary F-measure) and the share of
frames without the object scored absent, against a baseline without memory (the image module given each frame the
box of the track's previous mask).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.adaptation.sam_losses import LOSS_SIDE, error_click, per_mask_loss
from service.models import sam_ops
from service.models.demo.profile import (
    SHAPES_SAM2,
    SHAPES_SAM2_CONFIG,
    SHAPES_SAM2_OVERRIDES,
    SHAPES_SAM2_VIDEO,
    SHAPES_SAM2_VIDEO_OVERRIDES,
)

S = 256  # SAM input side
WIDTH, HEIGHT = 320, 240  # rendered frame size, resized to S² as the service resizes
# What MemoryTracker tells sam2 a stream's length is: it decides how many object pointers are read (16) and how their
# temporal distances are normalised (by 15), so training uses it too (sam2's trainer passes the clip's length).
STREAM_LENGTH = 2**62
MIN_PROMPT_AREA = 12  # px at S²: objects smaller than this on a clip's first frame are not prompted in training
# Parameters copied from the image checkpoint and frozen: what computes the frame features the tracker reads.
FROZEN = ("image_encoder.", "no_mem_embed", "sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.")
# Copied from the image checkpoint (the rest starts from sam2's seeded initialisation).
FROM_IMAGE = (*FROZEN, "sam_mask_decoder.", "sam_prompt_encoder.")
# Trained from the image checkpoint's values at the lower learning rate; every other trainable parameter (the memory
# path, and the object-score head, which the image trainer never trained) at the full one.
PRETRAINED = ("sam_mask_decoder.", "sam_prompt_encoder.")
SCORE_HEAD = "sam_mask_decoder.pred_obj_score_head."
# The object-score head's last bias is raised by this at initialisation: copied as the image trainer left it, it
# calls every object absent (logits ~ -0.1), which gates every mask off (sam2's NO_OBJ_SCORE), so training would
# start without a mask gradient; objects are visible on most frames.
SCORE_BIAS_START = 1.0
_MEMORY_KEYS = ("memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc", "obj_ptr", "no_obj")


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


def build(seed: int) -> Any:
    """A fresh tracking module (sam2's seeded initialisation), eval() mode."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    return build_sam2(SHAPES_SAM2_CONFIG, None, device="cpu", hydra_overrides_extra=list(SHAPES_SAM2_VIDEO_OVERRIDES))


def load_image_module(path: Path = SHAPES_SAM2) -> Any:
    """The demo's image module, as the server loads it (frozen, eval())."""
    from service.models.loading import load_segmenter_module

    return load_segmenter_module(SHAPES_SAM2_CONFIG, path, SHAPES_SAM2_OVERRIDES)


def load_video_module(path: Path) -> Any:
    from service.models.loading import load_segmenter_module

    return load_segmenter_module(SHAPES_SAM2_CONFIG, path, SHAPES_SAM2_VIDEO_OVERRIDES)


def image_state(path: Path = SHAPES_SAM2) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def init_from_image(sam: Any, state: dict[str, torch.Tensor]) -> None:
    """Copies ``FROM_IMAGE`` from the image checkpoint's state into ``sam`` and freezes ``FROZEN``."""
    own = sam.state_dict()
    copied = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if _starts(k, FROM_IMAGE)}
    for k, v in copied.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: {tuple(v.shape)} in the image checkpoint, {tuple(own[k].shape)} here")
    sam.load_state_dict({**own, **copied})
    with torch.no_grad():
        sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += SCORE_BIAS_START
    for name, p in sam.named_parameters():
        p.requires_grad_(not _starts(name, FROZEN))


def frozen_mismatches(half: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the frozen tensors of a saved state (fp16) that are not bit-equal to the image checkpoint's."""
    names = [k for k in half if _starts(k, FROZEN)]
    return [k for k in names if not torch.equal(half[k], state[k])] or ([] if names else ["(no frozen tensors)"])


def _resized_masks(masks: np.ndarray) -> torch.Tensor:
    """(N, H, W) bool → (N, S, S) bool, bilinear > 0.5 (as train_segmenter's pool)."""
    m = torch.from_numpy(masks).float()[:, None]
    return F.interpolate(m, (S, S), mode="bilinear", align_corners=False)[:, 0] > 0.5


@dataclasses.dataclass
class Clip:
    """A training batch: B objects, each in its own clip of T frames (all prompted on frame 0).

    frames (T, B) int64 rows of the pool's features; masks (T, B, S, S) bool visible pixels at S² (empty where the
    object is not visible); boxes (B, 4) float32 XYXY in SAM input pixels on frame 0."""

    frames: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.masks.flatten(2).any(-1)


class ClipPool:
    """Pre-rendered train-split videos in the tracker's frame: every frame's features from the IMAGE module (what
    the server computes: embed (F, C, S/16, S/16), high-res (F, C/8, S/4, S/4) and (F, C/4, S/8, S/8) float32) and
    every visible object's mask at S² with its box in SAM input pixels."""

    def __init__(self, image_sam: Any, videos: int, frames: int, start: int = 0) -> None:
        from service.models.tensors import SegmenterSpec
        from service.processing.segmentation import SegmenterProcessing
        from service.shapes.video import make_video, split_seed

        processing = SegmenterProcessing(SegmenterSpec(image_size=S))  # the service's own SAM pre-processing
        scale = torch.tensor([S / WIDTH, S / HEIGHT] * 2)
        embeds: list[torch.Tensor] = []
        hr0s: list[torch.Tensor] = []
        hr1s: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        self.videos: list[list[dict[int, tuple[int, torch.Tensor]]]] = []  # per video, per frame: id → (mask, box)
        self.offsets: list[int] = []
        count = 0
        for v in range(start, start + videos):
            video = make_video(split_seed("train", v), frames, WIDTH, HEIGHT)
            images, truth = [], []
            for t in range(frames):
                frame = video.frame(t)
                images.append(processing.preprocess(frame.image)[0])
                objects: dict[int, tuple[int, torch.Tensor]] = {}
                if frame.objects:
                    resized = _resized_masks(np.stack([o.mask for o in frame.objects]))
                    for o, m in zip(frame.objects, resized, strict=True):
                        if m.any():
                            objects[o.track_id] = (count, torch.tensor(o.box, dtype=torch.float32) * scale)
                            masks.append(m)
                            count += 1
                truth.append(objects)
            with torch.no_grad():
                embed, hr0, hr1 = sam_ops.image_features(image_sam, torch.from_numpy(np.stack(images)))
            self.offsets.append(sum(len(e) for e in embeds))
            embeds.append(embed)
            hr0s.append(hr0)
            hr1s.append(hr1)
            self.videos.append(truth)
        self.embed, self.hr0, self.hr1 = torch.cat(embeds), torch.cat(hr0s), torch.cat(hr1s)
        self.masks = torch.stack(masks)
        self.frames = frames

    def __len__(self) -> int:
        return len(self.videos)

    def sample(
        self,
        rng: np.random.Generator,
        clips: int,
        max_objects: int,
        length: int = 8,
        max_stride: int = 3,
        event_rate: float = 0.0,
    ) -> Clip:
        """``clips`` random clips (at most ``max_objects`` objects in all): a window of ``length`` frames of a pool
        video, every frame or every 2nd .. ``max_stride``-th, forwards or backwards; the objects visible on its first
        frame with at least MIN_PROMPT_AREA pixels. With probability ``event_rate`` a clip is drawn again (up to 50
        times) until one of its objects is not visible on a later frame (hidden behind another or out of frame):
        the frames that teach the object score and recovery are rare otherwise (~5 % of object-frames)."""
        rows: list[list[int]] = []  # per object: its clip's pool rows
        tracks: list[list[int | None]] = []  # per object: its mask's index in the pool per frame (None: not visible)
        boxes: list[torch.Tensor] = []
        taken, attempts = 0, 0
        want_event = rng.random() < event_rate
        while taken < clips or not tracks:
            v = int(rng.integers(len(self.videos)))
            stride = int(rng.integers(1, max_stride + 1))
            span = (length - 1) * stride + 1
            if span > self.frames:
                stride, span = 1, length
            first = int(rng.integers(0, self.frames - span + 1))
            times = list(range(first, first + span, stride))
            if rng.random() < 0.5:
                times.reverse()
            truth = self.videos[v]
            ids = [i for i, (m, _) in truth[times[0]].items() if self.masks[m].sum() >= MIN_PROMPT_AREA]
            ids = ids[: max_objects - len(tracks)]
            if not ids:
                continue
            attempts += 1
            if want_event and attempts < 50 and all(i in truth[t] for t in times for i in ids):
                continue
            taken, attempts = taken + 1, 0
            want_event = rng.random() < event_rate
            rows.extend([self.offsets[v] + t for t in times] for _ in ids)
            tracks.extend([truth[t].get(i, (None, None))[0] for t in times] for i in ids)
            boxes.extend(truth[times[0]][i][1] for i in ids)
            if len(tracks) >= max_objects:
                break
        empty = torch.zeros(S, S, dtype=torch.bool)
        masks = torch.stack(
            [torch.stack([empty if m is None else self.masks[m] for m in track]) for track in tracks], 1
        )
        return Clip(torch.tensor(rows).T.contiguous(), masks, torch.stack(boxes))


def _frame_inputs(sam: Any, pool: ClipPool, rows: torch.Tensor, pos: dict[int, torch.Tensor]):
    """The sequences ``track_step`` reads for B objects on one frame (rows (B,) into the pool), as
    ``MemoryTracker.frame_features`` builds them: (vision_feats, vision_pos_embeds, feat_sizes)."""
    maps = [pool.hr0[rows], pool.hr1[rows], pool.embed[rows]]
    seqs = [m.flatten(2).permute(2, 0, 1) for m in maps]
    seqs[-1] = seqs[-1] - sam.no_mem_embed  # the image path adds it; memory attention takes the raw features
    b = len(rows)
    if b not in pos:
        with torch.no_grad():
            pos[b] = sam.image_encoder.neck.position_encoding(maps[-1]).flatten(2).permute(2, 0, 1)
    sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
    return seqs, [None, None, pos[b]], sizes


def _clicks(masks: torch.Tensor, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
    """``n`` positive clicks uniformly inside each mask (B, S, S): sam2's point inputs."""
    coords = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        pick = rng.integers(0, len(xs), n)
        coords.append([(float(xs[k]) + 0.5, float(ys[k]) + 0.5) for k in pick])
    return {
        "point_coords": torch.tensor(coords, dtype=torch.float32),
        "point_labels": torch.ones(len(coords), n, dtype=torch.int32),
    }


def _box_prompt(boxes: torch.Tensor, rng: np.random.Generator, jitter: float) -> dict[str, torch.Tensor]:
    """Ground-truth boxes (B, 4) with Gaussian jitter (σ = ``jitter`` of the box side) as sam2's point inputs."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noisy = (boxes + torch.from_numpy(rng.normal(0, jitter, boxes.shape)).float() * wh).clamp(0, S)
    return {
        "point_coords": noisy.reshape(-1, 2, 2),
        "point_labels": torch.tensor([[2, 3]], dtype=torch.int32).repeat(len(boxes), 1),
    }


def _correction_clicks(pred: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One click per object (pred, gt (B, S, S) bool) in the largest connected error region (train_segmenter's
    simulated annotator): positive for a miss, negative for a spill; a padding point (label -1, no click) where the
    object is neither visible nor predicted."""
    clicks = [
        error_click(g, p, rng) if g.any() or p.any() else (0.0, 0.0, -1)
        for g, p in zip(gt.numpy(), pred.numpy(), strict=True)
    ]
    return {
        "point_coords": torch.tensor([[c[:2]] for c in clicks], dtype=torch.float32),
        "point_labels": torch.tensor([[c[2]] for c in clicks], dtype=torch.int32),
    }


def _frame_loss(
    low_multi: torch.Tensor, ious: torch.Tensor, score: torch.Tensor, target: torch.Tensor, absent_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM 2's loss on one frame (MultiStepMultiMasksAndIous, weights 20 : 1 : 1 : 1): low_multi (B, M, s, s) mask
    logits, ious (B, M), score (B, 1) object-score logits, target (B, S, S) bool. Focal + dice on the best of the M
    masks and L1 on all M IoU predictions where the object is visible; BCE on the object score everywhere, an absent
    object's term weighted by ``absent_weight`` (1: SAM 2's)."""
    present = target.flatten(1).any(-1).float()
    small = F.interpolate(target[:, None].float(), (LOSS_SIDE, LOSS_SIDE), mode="area")[:, 0]
    logits = F.interpolate(low_multi, (LOSS_SIDE, LOSS_SIDE), mode="bilinear", align_corners=False)
    per_mask = per_mask_loss(logits, small)  # (B, M): 20 x focal + dice
    with torch.no_grad():
        hard, truth = logits > 0, small[:, None] > 0.5
        actual = (hard & truth).sum((-1, -2)) / (hard | truth).sum((-1, -2)).clamp(min=1)
    mask_loss = per_mask.min(1).values
    iou_loss = (ious - actual.float()).abs().mean(1)
    score_loss = F.binary_cross_entropy_with_logits(score[:, 0], present, reduction="none")
    score_loss = score_loss * torch.where(present > 0, 1.0, absent_weight)
    visible = present.sum().clamp(min=1)
    loss = ((mask_loss + iou_loss) * present).sum() / visible + score_loss.mean()
    with torch.no_grad():
        parts = {"mask": float((mask_loss * present).sum() / visible), "score": float(score_loss.mean())}
    return loss, parts


def _selected(low_masks: torch.Tensor) -> torch.Tensor:
    """(B, 1, s, s) logits → (B, S, S) bool masks."""
    return F.interpolate(low_masks, (S, S), mode="bilinear", align_corners=False)[:, 0] > 0


def run_clip(
    sam: Any,
    pool: ClipPool,
    clip: Clip,
    kind: str,
    rng: np.random.Generator,
    correct_at: int | None = None,
    gap: int = 0,
    absent_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prompts the clip's objects on frame 0 (``kind``: "box", "clicks" or "mask") and tracks them through the
    clip from memory, as ``MemoryTracker`` does, with gradients; on frame ``correct_at`` a correction click
    (decoded from memory, then a conditioning frame). ``gap``: the frames after the prompted one are numbered from
    gap + 1 on, as if the prompt were that much older (a long stream: the prompt's object pointer is then read at
    that temporal distance, beyond a clip's). ``absent_weight``: ``_frame_loss``'s. Returns the mean loss over frames
    and figures."""
    memory: dict[str, dict[int, dict[str, Any]]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    pos: dict[int, torch.Tensor] = {}
    length = clip.frames.shape[0]
    index = [0, *range(gap + 1, gap + length)]
    losses, figures = [], {"mask": 0.0, "score": 0.0}
    j_sum, j_count, score_right = 0.0, 0, 0
    for t in range(length):
        feats, pos_embeds, sizes = _frame_inputs(sam, pool, clip.frames[t], pos)
        target = clip.masks[t]
        point_inputs, mask_inputs = None, None
        if t == 0 and kind == "box":
            point_inputs = _box_prompt(clip.boxes, rng, 0.07)
        elif t == 0 and kind == "clicks":
            point_inputs = _clicks(target, rng, int(rng.integers(1, 4)))
        elif t == 0:
            mask_inputs = target[:, None].float()
        step = dict(
            frame_idx=index[t],
            is_init_cond_frame=t == 0,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos_embeds,
            feat_sizes=sizes,
            output_dict=memory,
            num_frames=STREAM_LENGTH,
            track_in_reverse=False,
            prev_sam_mask_logits=None,
        )
        _, outputs, _, _ = sam._track_step(point_inputs=point_inputs, mask_inputs=mask_inputs, **step)
        low_multi, _, ious, low, high, obj_ptr, score = outputs
        if mask_inputs is None:
            loss, parts = _frame_loss(low_multi, ious, score, target, absent_weight)
            losses.append(loss)
            figures = {k: figures[k] + v for k, v in parts.items()}
        cond = t == 0
        if t == correct_at:  # a user's correction on a tracked frame: decoded from memory, made a conditioning frame
            point_inputs = _correction_clicks(_selected(low.detach()), target, rng)
            _, outputs, _, _ = sam._track_step(point_inputs=point_inputs, mask_inputs=None, **step)
            low_multi, _, ious, low, high, obj_ptr, score = outputs
            loss, _ = _frame_loss(low_multi, ious, score, target, absent_weight)
            losses[-1] = 0.5 * (losses[-1] + loss)
            cond = True
        features, pos_enc = sam._encode_new_memory(
            current_vision_feats=feats,
            feat_sizes=sizes,
            pred_masks_high_res=high,
            object_score_logits=score,
            is_mask_from_pts=point_inputs is not None,
        )
        bucket = "cond_frame_outputs" if cond else "non_cond_frame_outputs"
        memory[bucket][index[t]] = {
            "maskmem_features": features.to(torch.bfloat16),  # as MemoryTracker stores them
            "maskmem_pos_enc": pos_enc,
            "pred_masks": low,
            "obj_ptr": obj_ptr,
            "object_score_logits": score,
        }
        if t > 0:
            with torch.no_grad():
                present = target.flatten(1).any(-1)
                pred = _selected(low.detach()) & (score.detach() > 0)[:, :, None]
                inter = (pred & target).flatten(1).sum(-1)
                union = (pred | target).flatten(1).sum(-1).clamp(min=1)
                j_sum += float((inter / union)[present].sum())
                j_count += int(present.sum())
                score_right += int(((score[:, 0] > 0) == present).sum())
    loss = torch.stack(losses).mean()
    n = len(losses)
    figures = {k: v / n for k, v in figures.items()}
    figures.update(j=j_sum / max(j_count, 1), score_acc=score_right / (clip.frames.shape[1] * (length - 1)))
    return loss, figures


def optimiser(sam: Any, lr: float, pretrained_lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (not FROZEN): those copied from the image module's decoder and prompt
    encoder at ``pretrained_lr``, the rest at ``lr`` (each group's peak also kept as "peak" for the schedule)."""
    trainable = [(n, p) for n, p in sam.named_parameters() if p.requires_grad]
    copied = [_starts(n, PRETRAINED) and not n.startswith(SCORE_HEAD) for n, _ in trainable]
    return torch.optim.AdamW(
        [
            {"params": [p for (_, p), c in zip(trainable, copied, strict=True) if not c], "lr": lr, "peak": lr},
            {
                "params": [p for (_, p), c in zip(trainable, copied, strict=True) if c],
                "lr": pretrained_lr,
                "peak": pretrained_lr,
            },
        ],
        weight_decay=0.01,
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe (the command line's flags of the same names)."""

    clips: int = 4  # clips per step
    clip_frames: int = 8  # frames per clip (SAM 2's)
    max_objects: int = 16  # objects per step (all clips)
    lr: float = 8e-4  # peak lr of the memory path (fresh parameters)
    pretrained_lr: float = 1e-4  # peak lr of the decoder and prompt encoder (copied from the image module)
    warmup: int = 50  # linear warm-up steps
    correct_rate: float = 0.3  # share of steps with a correction click
    max_stride: int = 3  # clips take every 1st .. this-th frame
    event_rate: float = 0.5  # share of clips drawn until an object disappears in them
    gap_rate: float = 0.5  # share of steps with the prompt made older
    max_gap: int = 60  # frames a prompt is made older by, at most
    absent_weight: float = 1.0  # weight of an absent object's frame in the object-score loss (SAM 2's: 1)


def train(sam: Any, pool: ClipPool, seconds: float, seed: int, recipe: Recipe) -> dict:
    """AdamW over ``seconds`` of wall time (warm-up, then cosine): the memory path at ``recipe.lr``, the decoder and
    prompt encoder copied from the image module at ``recipe.pretrained_lr``."""
    r = recipe
    rng = np.random.default_rng(seed)
    opt = optimiser(sam, r.lr, r.pretrained_lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    start, step = time.time(), 0
    history: list[dict[str, float]] = []
    curve = []
    sam.eval()  # SAM 2's inference behaviour, no dropout
    while time.time() - start < seconds:
        progress = (time.time() - start) / seconds  # the schedule follows wall time: it decays fully on any machine
        for g in opt.param_groups:
            g["lr"] = (
                g["peak"] * min(1.0, (step + 1) / r.warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
            )
        clip = pool.sample(rng, r.clips, r.max_objects, r.clip_frames, r.max_stride, r.event_rate)
        kind = str(rng.choice(["box", "box", "clicks", "mask"]))
        correct_at = int(rng.integers(2, r.clip_frames)) if rng.random() < r.correct_rate else None
        gap = int(rng.integers(1, r.max_gap + 1)) if rng.random() < r.gap_rate else 0
        loss, figures = run_clip(sam, pool, clip, kind, rng, correct_at, gap, r.absent_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(dict(figures, loss=loss.item()))
        if step % 25 == 0:
            recent = {k: float(np.mean([h[k] for h in history[-50:]])) for k in history[-1]}
            curve.append({"step": step, "t": round(time.time() - start), **{k: round(v, 4) for k, v in recent.items()}})
            print(
                f"step {step} loss {recent['loss']:.4f} mask {recent['mask']:.4f} score {recent['score']:.4f} "
                f"J {recent['j']:.3f} score-acc {recent['score_acc']:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"t {time.time() - start:.0f}s",
                flush=True,
            )
        step += 1
    last = history[-100:]
    return {
        "steps": step,
        "recipe": dataclasses.asdict(r),
        "train_s": round(time.time() - start),
        "final": {k: round(float(np.mean([h[k] for h in last])), 4) for k in last[-1]},
        "curve": curve,
    }


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (inside it, with a 4-neighbour outside it)."""
    import cv2

    eroded = cv2.erode(mask.view(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)  # type: ignore[call-overload]
    return mask & ~np.asarray(eroded).view(bool)


def boundary_f(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS's boundary F-measure of two (H, W) bool masks: boundary precision and recall with a tolerance of
    0.8 % of the image diagonal (both empty: 1; one empty: 0)."""
    import cv2

    bp, bg = _boundary(pred), _boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    r = math.ceil(0.008 * math.hypot(*gt.shape))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    near_g = cv2.dilate(bg.view(np.uint8), disk).view(bool)
    near_p = cv2.dilate(bp.view(np.uint8), disk).view(bool)
    precision = (bp & near_g).sum() / bp.sum()
    recall = (bg & near_p).sum() / bg.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


class _Tally:
    """J and F per object per frame where the object is visible (and after it was hidden), and absent frames
    scored absent (while occluded or out of frame, and after its track ended)."""

    def __init__(self) -> None:
        self.j: list[float] = []
        self.f: list[float] = []
        self.j_after_hidden: list[float] = []
        self.j_first: list[float] = []
        self.absent: list[bool] = []

    def add(self, t: int, pred: np.ndarray, present: bool, gt: np.ndarray | None, was_hidden: bool) -> None:
        if gt is None:
            self.absent.append(not present)
            return
        visible = pred if present else np.zeros_like(gt)
        j = float((visible & gt).sum() / max((visible | gt).sum(), 1))
        if t == 0:
            self.j_first.append(j)
            return
        self.j.append(j)
        self.f.append(boundary_f(visible, gt))
        if was_hidden:
            self.j_after_hidden.append(j)

    def summary(self) -> dict[str, float | int]:
        j, f = float(np.mean(self.j)), float(np.mean(self.f))
        return {
            "J": round(j, 4),
            "F": round(f, 4),
            "J&F": round((j + f) / 2, 4),
            "J_frame0": round(float(np.mean(self.j_first)), 4),
            "J_after_hidden": round(float(np.mean(self.j_after_hidden)), 4) if self.j_after_hidden else float("nan"),
            "visible_frames": len(self.j),
            "after_hidden_frames": len(self.j_after_hidden),
            "absent_scored_absent": round(float(np.mean(self.absent)), 4) if self.absent else float("nan"),
            "absent_frames": len(self.absent),
        }


def _to_original(low: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(N, 1, s, s) logits → (N, H, W) bool at original resolution (sam2's bilinear upsampling, threshold 0)."""
    return (F.interpolate(low.float(), hw, mode="bilinear", align_corners=False)[:, 0] > 0).numpy()


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def evaluate(video_sam: Any, image_sam: Any, videos: int = 20, frames: int = 60) -> dict:
    """Tracking on ``videos`` held-out val-split videos of ``frames`` frames at WIDTH x HEIGHT: every object visible
    on frame 0 prompted with its ground-truth box, then tracked with the service's ``MemoryTracker`` on frame
    features from the image module; and the no-memory baseline: the image module given, on each frame, the box of
    the track's previous mask (the track is lost once that mask is empty). J and F are over (object, frame) pairs
    with the object visible, frame 0 (the prompt) apart; absent pairs are frames after 0 on which a prompted object
    is not visible (hidden behind another, out of frame, or gone), counted right when the object score is <= 0
    (memory) or the mask is empty (baseline)."""
    from service.models.sam_memory import MemoryTracker, ObjectMemory
    from service.models.tensors import ImageFeatures, SegmenterSpec
    from service.processing.segmentation import SegmenterProcessing
    from service.shapes.video import make_video, split_seed

    processing = SegmenterProcessing(SegmenterSpec(image_size=S))
    tracker = MemoryTracker(video_sam)
    scale = np.array([S / WIDTH, S / HEIGHT] * 2, np.float32)
    box_labels = np.array([2, 3], np.int32)
    memory_tally, baseline_tally = _Tally(), _Tally()
    objects = 0
    with torch.inference_mode():
        for v in range(videos):
            video = make_video(split_seed("val", v), frames, WIDTH, HEIGHT)
            first = video.frame(0)
            ids = [o.track_id for o in first.objects]
            objects += len(ids)
            memories = {i: ObjectMemory() for i in ids}
            boxes: dict[int, np.ndarray | None] = {o.track_id: np.array(o.box, np.float32) for o in first.objects}
            hidden = dict.fromkeys(ids, False)
            for t in range(frames):
                frame = first if t == 0 else video.frame(t)
                truth = {o.track_id: o.mask for o in frame.objects}
                x = torch.from_numpy(processing.preprocess(frame.image))
                embed, hr0, hr1 = sam_ops.image_features(image_sam, x)  # the server's features, one frame
                features = tracker.frame_features(ImageFeatures(embed.numpy(), (hr0.numpy(), hr1.numpy())))
                for i in ids:
                    if t == 0:
                        corners = (np.array(boxes[i]) * scale).reshape(2, 2)
                        step = tracker.start(features, 0, corners, box_labels, memories[i])
                    else:
                        step = tracker.track(features, t, memories[i])
                    pred = _to_original(step.low_res_mask, (HEIGHT, WIDTH))[0]
                    memory_tally.add(t, pred, step.object_score > 0, truth.get(i), hidden[i])
                live = {i: b for i, b in boxes.items() if b is not None}
                preds: dict[int, np.ndarray] = {}
                if live:
                    coords = torch.from_numpy(np.stack([b * scale for b in live.values()]).reshape(-1, 2, 2))
                    labels = torch.from_numpy(np.tile(box_labels, (len(live), 1)))
                    single, _, _, _ = sam_ops.decode(image_sam, embed, hr0, hr1, coords, labels)
                    preds = dict(zip(live, _to_original(single, (HEIGHT, WIDTH)), strict=True))
                for i in ids:
                    pred = preds[i] if boxes[i] is not None else np.zeros((HEIGHT, WIDTH), bool)
                    baseline_tally.add(t, pred, bool(pred.any()), truth.get(i), hidden[i])
                    boxes[i] = _mask_box(pred)
                    hidden[i] = hidden[i] or (t > 0 and i not in truth)
    return {
        "videos": videos,
        "frames": frames,
        "size": f"{WIDTH}x{HEIGHT}",
        "objects": objects,
        "memory": memory_tally.summary(),
        "baseline_box_propagation": baseline_tally.summary(),
    }


def save(sam: Any, out: Path) -> dict[str, torch.Tensor]:
    """Writes {"model": fp16 state dict} (official layout); returns that state."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": half}, out)
    return half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-time budget: pool + training")
    parser.add_argument("--videos", type=int, default=80, help="train-split videos in the pool")
    parser.add_argument("--video-frames", type=int, default=32, help="frames per pool video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    defaults = Recipe()
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        parser.add_argument(flag, type=type(default), default=default, help=f"Recipe.{field.name}")
    parser.add_argument("--init", type=Path, help="a tracking checkpoint to continue from (or to --eval-only)")
    parser.add_argument("--out", type=Path, default=SHAPES_SAM2_VIDEO)
    parser.add_argument("--eval-videos", type=int, default=20, help="held-out val-split videos")
    parser.add_argument("--eval-frames", type=int, default=60)
    parser.add_argument("--eval-only", action="store_true", help="measure --init; no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    image_sam = load_image_module()
    if args.eval_only:
        if args.init is None:
            parser.error("--eval-only needs --init")
        result = evaluate(load_video_module(args.init), image_sam, args.eval_videos, args.eval_frames)
        print(json.dumps(dict(result, checkpoint=str(args.init), wall_s=round(time.time() - start))))
        return
    state = image_state()
    sam = build(args.seed)
    init_from_image(sam, state)
    if args.init:
        own = torch.load(args.init, map_location="cpu", weights_only=True)["model"]
        sam.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in own.items()})
    pool = ClipPool(image_sam, args.videos, args.video_frames)
    print(f"{len(pool)} videos, {len(pool.embed)} frames ready in {time.time() - start:.0f}s", flush=True)
    recipe = Recipe(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)})
    stats = train(sam, pool, args.minutes * 60 - (time.time() - start), args.seed, recipe)
    stats["train_wall_s"] = round(time.time() - start)
    del pool
    half = save(sam, args.out)
    mismatched = frozen_mismatches(half, state)
    if mismatched:
        raise SystemExit(f"frozen tensors changed: {mismatched[:5]}")
    stats["frozen_bit_equal"] = True
    stats["eval"] = evaluate(load_video_module(args.out), image_sam, args.eval_videos, args.eval_frames)
    stats.update(
        seed=args.seed,
        videos=args.videos,
        video_frames=args.video_frames,
        size_mb=round(args.out.stat().st_size / 1e6, 2),
        wall_s=round(time.time() - start),
    )
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
