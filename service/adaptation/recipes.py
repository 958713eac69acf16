"""What ``detseg adapt`` trains with: one recipe per model, the defaults in one place (the CLI's help states them).
No torch here, so that ``detseg --help`` starts without it."""

from __future__ import annotations

import dataclasses

# How SAM 2 is adapted (service.adaptation.segmenter explains each).
METHODS = ("decoder", "lora", "encoder-lora", "full", "none")
# The number format the detector trains in (service.adaptation.precision): auto = bf16 where the CPU has a bfloat16
# unit, else fp32.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class DetectorRecipe:
    minutes: float = 8.0  # ultralytics' `time` budget (training and per-epoch validation)
    # 8, not 16: twice the updates in the same epochs; shifted world, 8 min alone: held-out mAP50 0.892 vs 0.872
    batch: int = 8
    lr0: float = 0.005  # SGD; half the demo detector's from-scratch rate: a fine-tune
    patience: int = 8  # epochs without a better held-out fitness
    close_mosaic: int = 2  # last epochs without mosaic
    seed: int = 0
    threads: int = 0  # torch threads while training (0: every core the process may use)
    # bf16 where the CPU has a bfloat16 unit (service.adaptation.precision): on the shifted world, 26 epochs in
    # 8 min instead of 19; whole runs' held-out mask AP50 0.841 and 0.807 vs 0.788 in fp32 (docs/adaptation.md)
    precision: str = "auto"


@dataclasses.dataclass(frozen=True)
class SegmenterRecipe:
    # encoder-lora: on the shifted shapes world the frozen encoder bounds decoder-only training (held-out box IoU
    # after 3 min: decoder 0.611, lora 0.599; after 4 min: encoder-lora 0.751, full 0.727; base 0.019).
    method: str = "encoder-lora"
    minutes: float = 5.0  # wall-time budget of the decoder's training (features excluded)
    # images per step; 4, not 8: 409 steps instead of 240 in 5 min, held-out box IoU 0.729 vs 0.717
    batch: int = 4
    lr: float = 5e-4  # decoder; LoRA takes lora_lr
    lora_lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    warmup: int = 30
    eval_every: int = 40  # steps
    patience: int = 5  # measurements without gain before stopping
    max_clicks: int = 8  # longest simulated click sequence per instance and step (0: random clicks instead)
    # Only each sequence's last prediction supervised, the clicks before it simulated without gradients (RITM's
    # iterative training): on the shifted world in 5 min, 309 steps instead of 232, held-out box IoU 0.736 vs 0.715,
    # mean IoU after 5 clicks 0.739 vs 0.698 (docs/adaptation.md). True: every click's prediction (SAM's recipe).
    every_click: bool = False
    seed: int = 0
    threads: int = 0  # torch threads while training (0: every core the process may use)
