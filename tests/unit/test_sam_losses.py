"""The click-sequence loss ``detseg adapt`` and the demo's SAM training share: with ``every_click`` off only the
sequence's last prediction is supervised, the clicks before it are simulated without gradients, and they are the
clicks the full recipe makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.adaptation.sam_losses import LOSS_SIDE, interactive_loss
from service.config import Settings
from service.models import sam_ops
from service.models.loading import load_segmenter_module
from service.models.profiles import resolve_models


@pytest.fixture(scope="module")
def sam():
    ref = resolve_models(Settings(models="demo", offline=True), progress=False).segmenter
    model = load_segmenter_module(ref.architecture, ref.path, ref.overrides).eval()
    model.requires_grad_(False)
    model.sam_mask_decoder.requires_grad_(True)
    return model


def _scene(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images (2, 3, S, S) of noise and three instance masks (3, S, S) on them: a square, a disc, a bar."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, side, side, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    masks = torch.zeros(3, side, side)
    masks[0, 40:120, 50:140] = 1
    masks[1] = (((yy - 170) ** 2 + (xx - 90) ** 2) < 45**2).float()
    masks[2, 60:200, 180:215] = 1
    return images, masks


def _loss(sam, n: int, every_click: bool, calls: list[bool]) -> torch.Tensor:
    images, target = _scene(int(sam.image_size))
    embed, h0, h1 = sam_ops.image_features(sam, images)
    owner = torch.tensor([0, 0, 1])
    small = F.interpolate(target[:, None], (LOSS_SIDE, LOSS_SIDE), mode="area")[:, 0]
    hook = sam.sam_mask_decoder.transformer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        return interactive_loss(sam, embed, (h0, h1), owner, target, small, np.random.default_rng(3), n, every_click)
    finally:
        hook.remove()


def test_only_the_last_click_is_supervised_and_the_clicks_are_the_full_recipes(sam):
    calls: list[bool] = []
    last = _loss(sam, 4, every_click=False, calls=calls)
    assert calls == [False, False, False, True]  # three simulated clicks without a graph, one decoder pass with
    every: list[bool] = []
    mean_4, mean_3 = _loss(sam, 4, True, every), _loss(sam, 3, True, every)
    assert every == [True] * 7
    # The same rng gives the same sequence: the 4th click's loss of the full recipe is the last-click loss.
    torch.testing.assert_close(last, 4 * mean_4 - 3 * mean_3, rtol=1e-4, atol=1e-4)
    last.backward()
    grads = [p.grad for p in sam.sam_mask_decoder.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
