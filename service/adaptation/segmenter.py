"""SAM 2 adapted to a domain: its mask decoder on image features computed once per image and cached (the image
encoder frozen, so a training step costs decoder passes only), or with the encoder adapted too.

Methods (``SegmenterRecipe.method``):

- ``decoder``: every parameter of the mask decoder trains (0.74 M in the demo's SAM, 4.2 M in SAM 2.1's);
- ``lora``: low-rank adapters (LoRA: W + (alpha / r) · B·A, B zero at the start, so training starts from the base
  model exactly) on every linear layer of the decoder's two-way transformer and output hypernetworks; only those
  train, and they are merged into the weights at the end, so the served file has the official layout and every
  backend (torch, ONNX, OpenVINO, Triton) runs it unchanged;
- ``encoder-lora``: LoRA on every linear layer of the image encoder (Hiera's attention and MLPs) and the whole
  decoder: for a domain whose images the frozen encoder cannot describe (measured on the shifted shapes world:
  decoder-only training plateaus far below the in-domain figures). Features are computed every step, with
  gradients, so a step costs an encoder pass as well;
- ``full``: every parameter of the image encoder and the mask decoder trains (the prompt encoder stays); the
  encoder at ``lr`` too;
- ``none``: the base decoder, unchanged (the baseline).

Each step takes ``batch`` images; each of their instances gets a jittered box prompt and a sequence of 1 to
``max_clicks`` simulated clicks, each next click in the largest error region of the prediction so far (SAM's own
interactive recipe, the clicks ``detseg eval``'s NoC annotator makes; ``max_clicks`` 0: 1–3 random positives and
maybe a negative instead), and all four mask tokens are supervised (``sam_losses``): of the box prompt and of the
sequence's last click (``every_click``: of every click). Without the sequences the
adapted model lost its click corrections: NoC@85 on the base's own domain rose from 3.1 to 15.3 (8.8 with
``--replay``) on the shifted world. AdamW, a short
warm-up, cosine decay over the wall-time budget. Every ``eval_every`` steps the mean mask IoU given the held-out
boxes is measured; the best state is kept and training stops early after ``patience`` measurements without gain.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.adaptation.data import SamExample
from service.adaptation.recipes import METHODS, SegmenterRecipe
from service.adaptation.sam_losses import (
    LOSS_SIDE,
    decode_all,
    interactive_loss,
    jittered_boxes,
    mask_losses,
    random_clicks,
)
from service.models import sam_ops


@dataclasses.dataclass(frozen=True)
class Features:
    """Cached image features of N images: embed (N, C, S/16, S/16), high_res (N, C/8, S/4, S/4) and
    (N, C/4, S/8, S/8), float32 (sam_ops.image_features)."""

    embed: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]


@torch.inference_mode()
def cache_features(model: Any, examples: Sequence[SamExample], batch: int = 8) -> Features:
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for k in range(0, len(examples), batch):
        images = torch.from_numpy(np.stack([e.image for e in examples[k : k + batch]]))
        parts.append(sam_ops.image_features(model, images))
    embed, h0, h1 = (torch.cat([p[i] for p in parts]) for i in range(3))
    return Features(embed.clone(), (h0.clone(), h1.clone()))


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + (alpha / rank) · B A x."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.a = torch.nn.Parameter(
            torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        )
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale

    def merged(self) -> torch.nn.Linear:
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight += (self.b @ self.a) * self.scale
        return out


def add_lora(decoder: torch.nn.Module, rank: int, alpha: float, seed: int) -> int:
    """Wraps every nn.Linear of the decoder's transformer and output hypernetworks in LoRALinear; returns the
    number of adapter parameters."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                wrapped = LoRALinear(child, rank, alpha, generator)
                setattr(parent, name, wrapped)
                count += wrapped.a.numel() + wrapped.b.numel()
    return count


def merge_lora(decoder: torch.nn.Module) -> None:
    """Replaces every LoRALinear by a plain nn.Linear holding W + (alpha / rank) · B A."""
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def _adapters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.a, m.b)]


@torch.inference_mode()
def box_iou(model: Any, features: Features, examples: Sequence[SamExample]) -> float:
    """Mean mask IoU (at LOSS_SIDE) of the single-mask output, with SAM 2.1's stability fallback, given each
    instance's exact box: the early-stop figure."""
    ious = []
    for k, example in enumerate(examples):
        boxes = torch.from_numpy(example.boxes)
        coords = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int32).repeat(len(boxes), 1)
        owner = torch.full((len(boxes),), k)
        logits, iou = decode_all(model, features.embed, features.high_res, owner, coords, labels)
        chosen, _ = model.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
        pred = chosen[:, 0] > 0
        truth = F.interpolate(torch.from_numpy(example.masks)[:, None], (LOSS_SIDE, LOSS_SIDE), mode="area")[:, 0] > 0.5
        inter = (pred & truth).sum((-1, -2)).float()
        union = (pred | truth).sum((-1, -2)).clamp(min=1).float()
        ious.extend((inter / union).tolist())
    return float(np.mean(ious)) if ious else 0.0


@dataclasses.dataclass(frozen=True)
class SegmenterResult:
    """What training did: steps, seconds, trainable parameters, the held-out box IoU before, at each measurement
    and of the kept state, and whether it stopped early."""

    method: str
    steps: int
    seconds: float
    trainable_parameters: int
    holdout_box_iou_before: float
    holdout_box_iou_after: float
    history: tuple[tuple[int, float], ...]
    stopped_early: bool


def adapt_decoder(
    model: Any,
    train: Sequence[SamExample],
    holdout: Sequence[SamExample],
    recipe: SegmenterRecipe,
    progress: Callable[[float, str], None] = lambda fraction, text: None,
) -> SegmenterResult:
    """Trains ``model``'s mask decoder in place (see the module docstring); the encoder and prompt encoder stay
    frozen. ``progress(fraction of the budget, status)`` is called after every step."""
    start = time.perf_counter()
    model.eval().requires_grad_(False)
    if recipe.method not in METHODS:
        raise ValueError(f"unknown segmenter method {recipe.method!r}; known: {', '.join(METHODS)}")
    tune_encoder = recipe.method in ("encoder-lora", "full")
    train_features = None if tune_encoder else cache_features(model, train)
    holdout_features = cache_features(model, holdout)
    before = box_iou(model, holdout_features, holdout)
    if recipe.method == "none":
        return SegmenterResult("none", 0, time.perf_counter() - start, 0, before, before, (), False)
    decoder, encoder = model.sam_mask_decoder, model.image_encoder
    groups: list[dict[str, Any]] = []
    if recipe.method == "lora":
        add_lora(decoder, recipe.rank, recipe.alpha, recipe.seed)
        groups.append({"params": _adapters(decoder), "lr": recipe.lora_lr})
    else:
        groups.append({"params": list(decoder.parameters()), "lr": recipe.lr})
    if recipe.method == "encoder-lora":
        add_lora(encoder, recipe.rank, recipe.alpha, recipe.seed)
        groups.append({"params": _adapters(encoder), "lr": recipe.lora_lr})
    elif recipe.method == "full":
        groups.append({"params": list(encoder.parameters()), "lr": recipe.lr})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    for g in groups:
        g["base_lr"] = g["lr"]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    rng = np.random.default_rng(recipe.seed)
    budget, t0 = recipe.minutes * 60, time.perf_counter()
    best, best_state, history, misses, step = before, copy.deepcopy(model.state_dict()), [(0, before)], 0, 0
    stopped_early = False
    side = int(train[0].image.shape[-1])
    batch = min(recipe.batch, len(train))
    while (elapsed := time.perf_counter() - t0) < budget:
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / recipe.warmup)
            g["lr"] = g["base_lr"] * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        idx = rng.choice(len(train), batch, replace=False)
        owner = torch.cat([torch.full((len(train[i].boxes),), k) for k, i in enumerate(idx)])
        target = torch.from_numpy(np.concatenate([train[i].masks for i in idx]))
        boxes = torch.from_numpy(np.concatenate([train[i].boxes for i in idx]))
        if train_features is None:  # the encoder trains: this step's features, with gradients
            embed, h0, h1 = sam_ops.image_features(model, torch.from_numpy(np.stack([train[i].image for i in idx])))
            high_res = (h0, h1)
        else:
            embed = train_features.embed[idx]
            high_res = (train_features.high_res[0][idx], train_features.high_res[1][idx])
        small = F.interpolate(target[:, None], (LOSS_SIDE, LOSS_SIDE), mode="area")[:, 0]
        coords, labels = jittered_boxes(boxes, rng, side)
        logits, iou = decode_all(model, embed, high_res, owner, coords, labels)
        loss = mask_losses(logits, small, iou)
        if recipe.max_clicks > 0:  # a click sequence correcting the prediction so far (SAM's interactive recipe)
            clicks = 1 + int(rng.integers(0, recipe.max_clicks))
            click_loss = interactive_loss(model, embed, high_res, owner, target, small, rng, clicks, recipe.every_click)
            loss = loss + 0.5 * click_loss
        else:
            coords, labels = random_clicks(target, boxes, rng, int(rng.integers(1, 4)), bool(rng.random() < 0.5))
            logits, iou = decode_all(model, embed, high_res, owner, coords, labels)
            loss = loss + 0.5 * mask_losses(logits, small, iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % recipe.eval_every == 0:
            if tune_encoder:
                holdout_features = cache_features(model, holdout)
            score = box_iou(model, holdout_features, holdout)
            history.append((step, score))
            if score > best:
                best, best_state, misses = score, copy.deepcopy(model.state_dict()), 0
            else:
                misses += 1
            if misses >= recipe.patience:
                stopped_early = True
                break
        progress(min(1.0, (time.perf_counter() - t0) / budget), f"segmenter step {step} loss {loss.item():.3f}")
    if not history or history[-1][0] != step:  # the last state competes too
        if tune_encoder:
            holdout_features = cache_features(model, holdout)
        score = box_iou(model, holdout_features, holdout)
        history.append((step, score))
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    merge_lora(model)
    model.requires_grad_(False)
    return SegmenterResult(
        recipe.method,
        step,
        time.perf_counter() - start,
        trainable,
        before,
        best,
        tuple(history),
        stopped_early,
    )
