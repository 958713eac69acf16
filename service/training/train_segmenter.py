"""Regenerates the demo segmenter: a reduced SAM 2 (sam2's own modules) trained from scratch on shapes.

    python -m service.training.train_segmenter [--minutes 40.5] [--seed 0]

The architecture is SAM 2.1 hiera-tiny's config with hydra overrides (SHAPES_SAM2_OVERRIDES): a 4-stage
Hiera of width 32, a 64-d neck and decoder, 256² input: 2.4 M parameters. Every step, each instance of
4 scenes gets a jittered ground-truth box prompt and a click prompt (1-3 positives, maybe a negative), and
all four mask tokens of the decoder are supervised: token 0 (single mask) and the best of tokens 1-3
(multimask), because SAM 2.1 swaps an unstable single mask for the multimask output with the highest
predicted IoU at inference. Loss: 20 x focal + dice at 128² (the decoder's 64² logits upsampled), + MSE of
the IoU head on all tokens. AdamW; warm-up, then a cosine schedule over the wall-time budget.
Writes ``shapes-sam2-mini.pt`` ({"model": fp16 state dict}, the layout of official SAM 2.1 checkpoints).

Interactive fine-tuning (``--interactive``, with ``--init`` to continue from the shipped checkpoint):

    python -m service.training.train_segmenter --interactive --init service/models/demo/shapes-sam2-mini.pt \
        --minutes 20 --lr 2e-4 --warmup 50 --out /tmp/sam-interactive/shapes-sam2-mini.pt

SAM's own interactive recipe (SAM paper, appendix A: "subsequent points are selected from the error region
between the previous mask prediction and the ground truth"), without feeding the previous mask back (detseg
sends points only). Every step keeps the jittered box prompt and its loss, and replaces the random click prompt
by a simulated click sequence per instance, 1 + k clicks with k uniform in 0..max_clicks-1 (same k for the
batch): click 1 is positive, inside the object; click j+1 goes to the largest connected error region (8-
connectivity, 256² frame) of the prediction after click j, positive for a miss, negative for a spill. Each click
is, at random with equal odds, the region's interior-most point (exactly what ``service.evaluation.noc``'s
annotator clicks, so the model learns the corrections it will be evaluated with) or a uniform random pixel of
that region (SAM's uniform sampling from the error region, for diversity and robustness to imprecise users).
The prediction that chooses the next click is the one inference would return: the best-scoring multimask
token after the first click (``multimask_output=True``), otherwise token 0 with SAM 2.1's stability fallback;
it is the detached output of the same decoder pass that is supervised, so each click costs one decoder pass.
Every click's prediction is supervised (all four tokens, as ``_losses``); the click loss is the mean over the
sequence, weighted by ``--click-weight`` against the box loss. ``evaluate_clicks`` measures the annotator
(NoC@85/90, mean IoU after clicks 1..20) with sam2's SAM2ImagePredictor; it is printed with the other figures.
``--eval-only`` measures the ``--init`` checkpoint without training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.adaptation.sam_losses import (
    LOSS_SIDE,
    decode_all,
    interactive_loss,
    jittered_boxes,
    mask_losses,
    random_clicks,
)
from service.models import sam_ops
from service.models.demo.profile import SHAPES_SAM2_CONFIG, SHAPES_SAM2_OVERRIDES

HERE = Path(__file__).parent
S = 256  # SAM input side


def build(seed: int) -> Any:
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    return build_sam2(SHAPES_SAM2_CONFIG, None, device="cpu", hydra_overrides_extra=list(SHAPES_SAM2_OVERRIDES))


class Pool:
    """Pre-rendered training scenes in SAM's input frame: images (N,3,S,S) float32, masks and boxes per scene."""

    def __init__(self, count: int) -> None:
        from service.models.tensors import SegmenterSpec
        from service.processing.segmentation import SegmenterProcessing
        from service.shapes.dataset import scenes

        processing = SegmenterProcessing(SegmenterSpec(image_size=S))  # the service's own SAM pre-processing
        self.images, self.masks, self.boxes = [], [], []
        for scene in scenes("train", count):
            self.images.append(torch.from_numpy(processing.preprocess(scene.image)[0]))
            m = torch.from_numpy(np.stack([i.mask for i in scene.instances])).float()[:, None]
            self.masks.append((F.interpolate(m, (S, S), mode="bilinear", align_corners=False)[:, 0] > 0.5).float())
            scale = torch.tensor([S / scene.width, S / scene.height] * 2)
            self.boxes.append(torch.tensor([i.box for i in scene.instances], dtype=torch.float32) * scale)

    def __len__(self) -> int:
        return len(self.images)


def train(
    model: Any,
    pool: Pool,
    minutes: float,
    seed: int,
    batch: int = 4,
    lr: float = 5e-4,
    click_weight: float = 0.5,
    warmup: int = 200,
    interactive: bool = False,
    max_clicks: int = 8,
) -> dict:
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    budget, start, step = minutes * 60, time.time(), 0
    history = []
    model.train()
    while time.time() - start < budget:
        progress = (time.time() - start) / budget  # the schedule follows wall time: it decays fully on any machine
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
        idx = rng.choice(len(pool), batch, replace=False)
        images = torch.stack([pool.images[i] for i in idx])
        masks = [pool.masks[i] for i in idx]
        boxes = [pool.boxes[i].clone() for i in idx]
        flip = rng.random(batch) < 0.5
        for k in np.nonzero(flip)[0]:
            images[k] = images[k].flip(-1)
            masks[k] = masks[k].flip(-1)
            boxes[k] = torch.stack([S - boxes[k][:, 2], boxes[k][:, 1], S - boxes[k][:, 0], boxes[k][:, 3]], 1)
        embed, high_res_0, high_res_1 = sam_ops.image_features(model, images)  # what the service runs
        owner = torch.cat([torch.full((len(b),), k) for k, b in enumerate(boxes)])
        target = torch.cat(masks)
        all_boxes = torch.cat(boxes)
        # Each instance gets a jittered box prompt and a click prompt (1-3 positives, maybe a negative).
        box_coords, box_labels = jittered_boxes(all_boxes, rng, S)
        logits, iou = decode_all(model, embed, (high_res_0, high_res_1), owner, box_coords, box_labels)
        small = F.interpolate(target[:, None], (LOSS_SIDE, LOSS_SIDE), mode="area")[:, 0]
        loss = mask_losses(logits, small, iou)
        if interactive:
            loss = loss + click_weight * interactive_loss(
                model, embed, (high_res_0, high_res_1), owner, target, small, rng, 1 + int(rng.integers(0, max_clicks))
            )
        else:
            coords, labels = random_clicks(target, all_boxes, rng, int(rng.integers(1, 4)), bool(rng.random() < 0.5))
            logits, iou = decode_all(model, embed, (high_res_0, high_res_1), owner, coords, labels)
            loss = loss + click_weight * mask_losses(logits, small, iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        if step % 50 == 0:
            recent = sum(history[-50:]) / len(history[-50:])
            print(
                f"step {step} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} t {time.time() - start:.0f}s",
                flush=True,
            )
        step += 1
    model.eval()
    return {"steps": step, "batch": batch, "final_loss": sum(history[-100:]) / max(1, len(history[-100:]))}


def evaluate(model: Any, count: int) -> float:
    """Mean mask IoU given ground-truth boxes on ``count`` test scenes, with sam2's SAM2ImagePredictor."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from service.shapes.dataset import scenes

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]
    ious = []
    with torch.inference_mode():
        for scene in scenes("test", count):
            predictor.set_image(scene.image)
            boxes = np.array([i.box for i in scene.instances], np.float32)
            masks, _, _ = predictor.predict(box=boxes, multimask_output=False)
            masks = masks.reshape(len(boxes), scene.height, scene.width) > 0
            for inst, m in zip(scene.instances, masks, strict=True):
                ious.append((m & inst.mask).sum() / max(1, (m | inst.mask).sum()))
    return float(np.mean(ious))


def evaluate_clicks(model: Any, count: int = 30) -> dict:
    """The simulated annotator of ``service.evaluation.noc`` on every instance of ``count`` test scenes, through
    sam2's SAM2ImagePredictor: clicks from ``noc.next_click`` at original resolution, all clicks so far as one
    point prompt, multimask (best score) for the first click only; up to 20 clicks, stopping at IoU 0.90.
    Returns ``noc.summarize``: NoC@85, NoC@90, the share never reaching them, mean IoU after clicks 1..20."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from service.evaluation import noc
    from service.shapes.dataset import scenes

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]
    efforts = []
    with torch.inference_mode():
        for scene in scenes("test", count):
            predictor.set_image(scene.image)
            for n, inst in enumerate(scene.instances):
                gt = inst.mask.astype(bool)
                mask = np.zeros_like(gt)
                clicks: list[noc.Click] = []
                ious: list[float] = []
                while len(clicks) < noc.MAX_CLICKS and (not ious or ious[-1] < max(noc.THRESHOLDS)):
                    clicks.append(noc.next_click(gt, mask, clicks))
                    masks, scores, _ = predictor.predict(
                        point_coords=np.array([[c.x, c.y] for c in clicks], np.float32),
                        point_labels=np.array([int(c.positive) for c in clicks], np.int32),
                        multimask_output=len(clicks) == 1,
                    )
                    mask = masks[int(np.argmax(scores))] > 0
                    ious.append(noc.mask_iou(mask, gt))
                efforts.append(noc.InstanceEffort(scene.seed * 100 + n, tuple(clicks), tuple(ious)))
    out = noc.summarize(efforts)
    out["mean_iou_per_click"] = [
        round(float(np.mean([e.ious[min(n, len(e.ious) - 1)] for e in efforts])), 4) for n in range(noc.MAX_CLICKS)
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.5, help="training wall-time budget")
    parser.add_argument("--scenes", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--init", type=Path, help="continue from this checkpoint instead of random init")
    parser.add_argument("--out", type=Path, default=HERE / "shapes-sam2-mini.pt")
    parser.add_argument("--interactive", action="store_true", help="simulated click sequences (module docstring)")
    parser.add_argument("--max-clicks", type=int, default=8, help="longest simulated click sequence")
    parser.add_argument("--click-weight", type=float, default=None, help="click loss weight (0.5; 1.0 interactive)")
    parser.add_argument("--click-scenes", type=int, default=30, help="test scenes for the annotator figures")
    parser.add_argument("--eval-only", action="store_true", help="measure --init (or a fresh model); no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = build(args.seed)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    if args.eval_only:
        model.eval()
        result = {"checkpoint": str(args.init), "test_mean_iou_gt_boxes": round(evaluate(model, 100), 4)}
        result["clicks"] = evaluate_clicks(model, args.click_scenes)
        print(json.dumps(dict(result, wall_s=round(time.time() - start))))
        return
    pool = Pool(args.scenes)
    print(f"{len(pool)} scenes ready in {time.time() - start:.0f}s", flush=True)
    click_weight = args.click_weight if args.click_weight is not None else (1.0 if args.interactive else 0.5)
    stats = train(
        model,
        pool,
        args.minutes,
        args.seed,
        lr=args.lr,
        click_weight=click_weight,
        warmup=args.warmup,
        interactive=args.interactive,
        max_clicks=args.max_clicks,
    )
    miou = evaluate(model, 100)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": half}, args.out)
    stats.update(test_mean_iou_gt_boxes=round(miou, 4), scenes=args.scenes)
    stats.update(interactive=args.interactive, lr=args.lr, warmup=args.warmup, click_weight=click_weight)
    if args.interactive:
        stats.update(max_clicks=args.max_clicks)
        stats["clicks"] = evaluate_clicks(model, args.click_scenes)
    stats.update(seed=args.seed, size_mb=round(args.out.stat().st_size / 1e6, 2), wall_s=round(time.time() - start))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
