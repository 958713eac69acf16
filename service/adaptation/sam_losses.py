"""SAM 2 mask-decoder training pieces shared by the demo's training scripts and ``detseg adapt``: prompts through
the decoder with every mask token, SAM's loss on all of them, simulated clicks (random ones, and sequences that
correct the prediction so far, as ``service.evaluation.noc``'s annotator does)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.evaluation.noc import interior_point

LOSS_SIDE = 128  # masks are compared at this side (the demo decoder's 64² logits upsampled 2x)


def per_mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (P, M, s, s), target (P, s, s) → (P, M): 20 x focal + dice per mask, as SAM trains."""
    t = target[:, None].expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean((-1, -2))
    inter = (prob * t).sum((-1, -2))
    dice = 1 - (2 * inter + 1) / (prob.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    return 20 * focal + dice


def mask_losses(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """All four mask tokens of SAM's decoder are supervised on every prompt.

    logits (P, 4, s, s), target (P, s, s), iou_pred (P, 4). Token 0 (the single-mask output) gets its own loss,
    tokens 1-3 (the multimask outputs) the minimum over the three, and the IoU head learns the IoU of all four.
    At inference SAM 2.1 replaces an unstable single mask by the multimask output with the best predicted IoU
    (``dynamic_multimask_via_stability``), so those tokens and the IoU head must be good for boxes too.
    """
    per_mask = per_mask_loss(logits, target)
    multi = per_mask[:, 1:].min(1).values
    with torch.no_grad():
        hard = logits > 0
        truth = target[:, None] > 0.5
        actual = (hard & truth).sum((-1, -2)) / (hard | truth).sum((-1, -2)).clamp(min=1)
    return per_mask[:, 0].mean() + multi.mean() + F.mse_loss(iou_pred, actual.float())


def decode_all(
    model: Any,
    embed: torch.Tensor,
    high_res: tuple[torch.Tensor, torch.Tensor],
    owner: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask token of the decoder for each prompt (prompt p on image ``owner[p]``; coords (P, K, 2) in the
    model's input frame, labels (P, K): 1/0 clicks, 2/3 box corners): logits (P, 4, LOSS_SIDE, LOSS_SIDE) and IoU
    predictions (P, 4)."""
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low, iou, _, _ = model.sam_mask_decoder.predict_masks(
        image_embeddings=embed[owner],
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[h[owner] for h in high_res],
    )
    return F.interpolate(low, (LOSS_SIDE, LOSS_SIDE), mode="bilinear", align_corners=False), iou


def random_clicks(
    masks: torch.Tensor, boxes: torch.Tensor, rng: np.random.Generator, n_pos: int, neg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks for each mask (P, S, S): ``n_pos`` positives inside it, and optionally one negative inside its box
    (P, 4) XYXY but outside it (another positive where the box has no background). coords (P, K, 2), labels (P, K)."""
    coords, labels = [], []
    for m, b in zip(masks, boxes, strict=True):
        ys, xs = torch.nonzero(m, as_tuple=True)
        pick = rng.integers(0, len(xs), n_pos)
        pts = [(float(xs[k]) + 0.5, float(ys[k]) + 0.5) for k in pick]
        labs = [1] * n_pos
        if neg:
            x0, y0, x1, y1 = (int(v) for v in b)
            region = torch.zeros_like(m, dtype=torch.bool)
            region[max(y0, 0) : max(y1, 1), max(x0, 0) : max(x1, 1)] = True
            ys, xs = torch.nonzero(region & (m < 0.5), as_tuple=True)
            if len(xs):
                k = rng.integers(0, len(xs))
                pts.append((float(xs[k]) + 0.5, float(ys[k]) + 0.5))
                labs.append(0)
            else:
                pts.append(pts[0])
                labs.append(1)
        coords.append(pts)
        labels.append(labs)
    return torch.tensor(coords, dtype=torch.float32), torch.tensor(labels, dtype=torch.int32)


def jittered_boxes(boxes: torch.Tensor, rng: np.random.Generator, side: int, sigma: float = 0.07):
    """Box prompts (P, 2, 2) and their labels (P, 2) from boxes (P, 4) XYXY, each corner moved by Gaussian noise of
    ``sigma`` × the box's side (a detector's or an annotator's imprecision), clamped to the frame."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    jitter = torch.from_numpy(rng.normal(0, sigma, boxes.shape)).float() * wh
    coords = (boxes + jitter).clamp(0, side).reshape(-1, 2, 2)
    return coords, torch.tensor([[2, 3]], dtype=torch.int32).repeat(len(coords), 1)


def region_click(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A click in ``region`` (H, W) bool: its interior-most point (noc's annotator) or a uniform random pixel."""
    if rng.random() < 0.5:
        x, y = interior_point(region)
    else:
        ys, xs = np.nonzero(region)
        k = int(rng.integers(0, len(xs)))
        x, y = int(xs[k]), int(ys[k])
    return x + 0.5, y + 0.5


def error_click(gt: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float, int]:
    """The next simulated click on ``mask`` against ``gt`` ((H, W) bool): in the largest connected error region,
    positive (1) for a miss, negative (0) for a spill; a positive click on the object if the mask is perfect."""
    import cv2

    best: tuple[int, np.ndarray, int] | None = None
    for region, label in ((gt & ~mask, 1), (mask & ~gt, 0)):
        count, comps, stats, _ = cv2.connectedComponentsWithStats(region.view(np.uint8), connectivity=8)
        if count <= 1:
            continue
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if best is None or int(stats[k, cv2.CC_STAT_AREA]) > best[0]:
            best = (int(stats[k, cv2.CC_STAT_AREA]), comps == k, label)
    if best is None:
        return (*region_click(gt, rng), 1)
    return (*region_click(best[1], rng), best[2])


def chosen_mask(model: Any, logits: torch.Tensor, iou: torch.Tensor, first: bool, side: int) -> torch.Tensor:
    """The (P, side, side) bool mask inference returns from the decoder outputs (logits (P, 4, s, s), iou (P, 4)):
    the best-scoring multimask token after one click, else token 0 with SAM 2.1's stability fallback."""
    if first:
        best = iou[:, 1:].argmax(1) + 1
        chosen = logits[torch.arange(len(logits)), best][:, None]
    else:
        chosen, _ = model.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
    return F.interpolate(chosen, (side, side), mode="bilinear", align_corners=False)[:, 0] > 0


def interactive_loss(
    model: Any,
    embed: torch.Tensor,
    high_res: tuple[torch.Tensor, torch.Tensor],
    owner: torch.Tensor,
    target: torch.Tensor,
    small: torch.Tensor,
    rng: np.random.Generator,
    n: int,
    every_click: bool = True,
) -> torch.Tensor:
    """The loss of a simulated click sequence of ``n`` clicks per instance (target (P, S, S), small its LOSS_SIDE
    version; SAM's own interactive recipe, as ``service.training.train_segmenter`` describes): click 1 inside the
    object, each next one in the largest error region of the prediction so far.

    ``every_click``: the mean over all ``n`` predictions, each supervised (SAM's recipe); otherwise only the last
    one is, and the clicks before it are simulated without gradients (RITM's iterative training: the sequence then
    costs one decoder backward pass whatever ``n``)."""
    gts = target.numpy() > 0.5
    clicks = [[(*region_click(g, rng), 1)] for g in gts]
    total = torch.zeros(())
    for j in range(n):
        coords = torch.tensor([[c[:2] for c in seq] for seq in clicks], dtype=torch.float32)
        labels = torch.tensor([[c[2] for c in seq] for seq in clicks], dtype=torch.int32)
        supervised = every_click or j + 1 == n
        with torch.set_grad_enabled(supervised and torch.is_grad_enabled()):
            logits, iou = decode_all(model, embed, high_res, owner, coords, labels)
        if supervised:
            total = total + mask_losses(logits, small, iou)
        if j + 1 < n:
            with torch.no_grad():
                masks = chosen_mask(model, logits.detach(), iou.detach(), j == 0, target.shape[-1]).numpy()
            for seq, g, m in zip(clicks, gts, masks, strict=True):
                seq.append(error_click(g, m, rng))
    return total / n if every_click else total
