"""The tracker's trainer: the frame-feature path stays the image module's bit for bit, and one step on a short clip
lowers SAM 2's tracking loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.training import train_tracker


@pytest.fixture(scope="module")
def setup() -> tuple:
    torch.set_num_threads(2)
    image_sam = train_tracker.load_image_module()
    state = train_tracker.image_state()
    sam = train_tracker.build(0)
    train_tracker.init_from_image(sam, state)
    pool = train_tracker.ClipPool(image_sam, videos=1, frames=2)
    return sam, state, pool


def test_the_feature_path_is_copied_and_frozen(setup: tuple) -> None:
    sam, state, _ = setup
    for name, p in sam.named_parameters():
        frozen = name.startswith(train_tracker.FROZEN)
        assert p.requires_grad is not frozen, name
        if frozen:
            assert torch.equal(p.detach().half(), state[name]), name
    assert sam.image_encoder.neck.position_encoding.num_pos_feats * 2 == sam.hidden_dim  # the memory path fits


def test_one_step_on_a_two_frame_clip_lowers_the_loss_and_leaves_the_frozen_tensors(
    setup: tuple, tmp_path: Path
) -> None:
    sam, state, pool = setup
    clip = pool.sample(np.random.default_rng(0), clips=1, max_objects=4, length=2)
    opt = train_tracker.optimiser(sam, lr=1e-3, pretrained_lr=1e-4)
    before, _ = train_tracker.run_clip(sam, pool, clip, "box", np.random.default_rng(1))
    opt.zero_grad(set_to_none=True)
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = train_tracker.run_clip(sam, pool, clip, "box", np.random.default_rng(1))
    assert after.item() < before.item()
    half = train_tracker.save(sam, tmp_path / "tracker.pt")
    assert train_tracker.frozen_mismatches(half, state) == []
