"""The decoder rewrite that shares the first block's image side between prompts is sam2's decoder, exactly."""

from __future__ import annotations

import pytest
import torch

from service.models import sam_ops
from tests.helpers import seeded_decoder_sam


@pytest.fixture(scope="module")
def sam():  # type: ignore[no-untyped-def]
    return seeded_decoder_sam()


def _reference(model, features, coords, labels):  # type: ignore[no-untyped-def]
    """sam2's own decoder on every prompt's copy of the image side (what ``SAM2ImagePredictor`` runs)."""
    embed, hr0, hr1 = features
    b = coords.shape[0]
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou, _, _ = model.sam_mask_decoder.predict_masks(
        image_embeddings=torch.repeat_interleave(embed, b, dim=0),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[torch.repeat_interleave(hr0, b, dim=0), torch.repeat_interleave(hr1, b, dim=0)],
    )
    return masks, iou


@pytest.mark.parametrize(("prompts", "points"), [(1, 2), (5, 2), (7, 3), (4, 1)])
def test_shared_decoder_equals_sam2s(sam, prompts: int, points: int) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(prompts * 10 + points)
    with torch.inference_mode():
        features = sam_ops.image_features(sam, torch.randn(1, 3, 256, 256, generator=gen))
        coords = torch.rand(prompts, points, 2, generator=gen) * 256
        labels = torch.randint(0, 4, (prompts, points), generator=gen, dtype=torch.int32)
        ref_masks, ref_iou = _reference(sam, features, coords, labels)
        sparse, _ = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, iou = sam_ops._predict_masks_shared(sam, *features, sparse)
        single, single_iou, multi, multi_iou = sam_ops.decode(sam, *features, coords, labels)
    assert masks.shape == ref_masks.shape == (prompts, 4, 64, 64)
    scale = float(ref_masks.abs().max())
    assert scale > 0.1  # logits of some size, so the tolerance below means something
    torch.testing.assert_close(masks, ref_masks, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multi, ref_masks[:, 1:], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(multi_iou, ref_iou[:, 1:], atol=1e-5, rtol=1e-5)
    assert single.shape == (prompts, 1, 64, 64) and single_iou.shape == (prompts, 1)


def test_decode_with_mask_inputs_keeps_sam2s_path(sam) -> None:  # type: ignore[no-untyped-def]
    """With mask inputs (the exported graph) each prompt has its own image side; no mask = the shared path's answer."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        features = sam_ops.image_features(sam, torch.randn(1, 3, 256, 256, generator=gen))
        coords = torch.rand(3, 2, 2, generator=gen) * 256
        labels = torch.tensor([[2, 3]] * 3, dtype=torch.int32)
        shared = sam_ops.decode(sam, *features, coords, labels)
        none = sam_ops.decode(sam, *features, coords, labels, torch.zeros(3, 1, 64, 64), torch.zeros(3))
        some = sam_ops.decode(sam, *features, coords, labels, torch.randn(3, 1, 64, 64, generator=gen), torch.ones(3))
    for a, b in zip(shared, none, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared[2], some[2], atol=1e-3)
