"""Kept low-res masks (options.keep_masks) are SAM2ImagePredictor's: its logits clamped to [-32, 32]."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from service.pipeline.pipeline import Pipeline
from service.processing.segmentation import SamPrompt


class Kept:
    """The image store's add_masks as the pipeline sees it: records what it is given, keeps all of it."""

    def __init__(self) -> None:
        self.masks: dict[str, np.ndarray] = {}

    async def add_masks(self, handle: str, masks: dict[str, np.ndarray]) -> set[str]:
        self.masks.update(masks)
        return set(masks)


def test_kept_logits_are_clamped_as_the_predictor_returns_them():
    """The predictor clamps its low-res logits to [-32, 32] before returning them (the mask_input of the next
    click); we kept them as the decoder gave them, so a follow-up click with logits past ±32 differed from the
    predictor's loop (IoU 0.979 measured with large logits)."""
    store = Kept()
    logits = np.linspace(-80, 150, 2 * 64 * 64, dtype=np.float32).reshape(2, 64, 64)
    prompts = [SamPrompt(np.array([0, 0, 9, 9], np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.int32))]
    prompts.append(SamPrompt(None, np.ones((1, 2), np.float32), np.ones(1, np.int32)))
    this = SimpleNamespace(images=store)
    handles = asyncio.run(
        Pipeline._keep_masks(this, "sha256:" + "0" * 64, prompts, logits, SimpleNamespace(multimask=False))
    )
    assert len(handles) == 2 and all(handles)
    for k, h in enumerate(handles):
        np.testing.assert_array_equal(store.masks[h], np.clip(logits[k], -32, 32))
