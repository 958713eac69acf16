"""The number format ``detseg adapt``'s detector trains in (on the CPU): bfloat16 autocast where the CPU computes it
natively, float32 elsewhere. Weights, optimizer state and the loss stay float32 (``torch.autocast`` runs the matrix
products and convolutions in bfloat16); what is saved and served is float32.

Measured on a 2-core AMD EPYC with AVX512-BF16 (docs/adaptation.md): the shapes YOLO11n's forward and backward at
batch 8 × 320² take 0.27 s instead of 0.48 s, a training epoch 16.5 s instead of 25 s. SAM's training stays float32:
under autocast it gained about 1 % more steps in 5 minutes. A CPU without a bfloat16 unit would emulate it, slower
than float32, so ``auto`` keeps float32 there."""

from __future__ import annotations

import torch

from service.adaptation.recipes import PRECISIONS


def native_bf16() -> bool:
    """Whether this CPU has a bfloat16 unit (AVX512-BF16 or AMX), which oneDNN uses for bfloat16 products."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve(precision: str) -> str:
    """``auto`` → ``bf16`` on a CPU with a bfloat16 unit, else ``fp32``; the others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision
