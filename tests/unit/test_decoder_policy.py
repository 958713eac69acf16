"""SAM's mask decoder as the runners run it (``sam_ops.PromptDecoder``): sam2's own decoder to float rounding in
float32, in every pass and upscaling split a device policy makes, with and without mask inputs; its bfloat16 image
tokens keep final masks within the quality gate (IoU >= 0.99 vs float32); the per-device policy is one table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models import sam_ops
from tests.helpers import seeded_decoder_sam

GATE_MIN_IOU = 0.99


@pytest.fixture(scope="module")
def sam():  # type: ignore[no-untyped-def]
    return seeded_decoder_sam()


def _sam2_decoder(model, features, coords, labels, mask_input=None):  # type: ignore[no-untyped-def]
    """sam2's own decoder on every prompt's copy of the image side (``SAM2ImagePredictor._predict``): all masks and
    IoUs, and its single-mask selection (dynamic multimask via stability)."""
    embed, hr0, hr1 = features
    b = coords.shape[0]
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
    decoder = model.sam_mask_decoder
    masks, iou, _, _ = decoder.predict_masks(
        image_embeddings=torch.repeat_interleave(embed, b, dim=0),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense.expand(b, -1, -1, -1),
        repeat_image=False,
        high_res_features=[torch.repeat_interleave(hr0, b, dim=0), torch.repeat_interleave(hr1, b, dim=0)],
    )
    single, single_iou = decoder._dynamic_multimask_via_stability(masks, iou)
    return masks, iou, single, single_iou


def _inputs(model, prompts: int, points: int, seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    features = sam_ops.image_features(model, torch.randn(1, 3, 256, 256, generator=gen))
    coords = torch.rand(prompts, points, 2, generator=gen) * 256
    labels = torch.randint(0, 4, (prompts, points), generator=gen, dtype=torch.int32)
    return features, coords, labels


POLICIES = {
    "one pass": sam_ops.DecoderPolicy(),
    "passes of 3, upscaled 2 at a time": sam_ops.DecoderPolicy(prompts_per_pass=3, upscale_group=2),
}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize(("prompts", "points"), [(1, 2), (7, 3), (5, 1)])
def test_float32_decoder_equals_sam2s_in_every_split(sam, policy, prompts: int, points: int) -> None:  # type: ignore[no-untyped-def]
    decoder = sam_ops.PromptDecoder(sam, policy)
    with torch.inference_mode():
        features, coords, labels = _inputs(sam, prompts, points, seed=prompts * 10 + points)
        masks, iou, single, single_iou = _sam2_decoder(sam, features, coords, labels)
        got_single, got_single_iou = decoder(*features, coords, labels, multimask=False)
        got_multi, got_multi_iou = decoder(*features, coords, labels, multimask=True)
    scale = float(masks.abs().max())
    assert scale > 0.1  # logits of some size, so the tolerance below means something
    assert got_single.shape == (prompts, 1, 64, 64) and got_multi.shape == (prompts, 3, 64, 64)
    torch.testing.assert_close(got_single, single, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(got_single_iou, single_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_multi, masks[:, 1:], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(got_multi_iou, iou[:, 1:], atol=1e-5, rtol=1e-5)


def test_dynamic_fallback_is_taken_where_token_0_is_unstable(sam, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The single mask is token 0's where it is stable and the best multimask output's elsewhere, as sam2 picks it:
    with the stability threshold between the prompts' middle two, both branches are taken."""
    decoder = sam.sam_mask_decoder
    with torch.inference_mode():
        features, coords, labels = _inputs(sam, 24, 2, seed=7)
        masks, _, _, _ = _sam2_decoder(sam, features, coords, labels)
        stability = decoder._get_stability_scores(masks[:, 0]).sort().values
        between = float(stability[11] + stability[12]) / 2  # half the prompts on each side, none on the threshold
        monkeypatch.setattr(decoder, "dynamic_multimask_stability_thresh", between)
        masks, _, single, single_iou = _sam2_decoder(sam, features, coords, labels)
        got, got_iou = sam_ops.PromptDecoder(sam)(*features, coords, labels, multimask=False)
    took_token_0 = (single == masks[:, :1]).flatten(1).all(1)
    assert 0 < int(took_token_0.sum()) < len(single)
    torch.testing.assert_close(got, single, atol=1e-5 * float(masks.abs().max()), rtol=1e-5)
    torch.testing.assert_close(got_iou, single_iou, atol=1e-5, rtol=1e-5)


def test_mask_inputs_give_each_prompt_its_own_image_side(sam) -> None:  # type: ignore[no-untyped-def]
    """Prompts that bring a previous mask (sam2's ``mask_input``): sam2's decoder with the mask's dense embedding."""
    decoder = sam_ops.PromptDecoder(sam, sam_ops.DecoderPolicy(prompts_per_pass=2, upscale_group=1))
    with torch.inference_mode():
        features, coords, labels = _inputs(sam, 3, 2, seed=11)
        previous = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(12)) * 4
        masks, iou, single, single_iou = _sam2_decoder(sam, features, coords, labels, previous)
        got, got_iou = decoder(*features, coords, labels, multimask=False, mask_input=previous)
        got_multi, got_multi_iou = decoder(*features, coords, labels, multimask=True, mask_input=previous)
        without, _ = decoder(*features, coords, labels, multimask=True)
    scale = float(masks.abs().max())
    torch.testing.assert_close(got, single, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(got_iou, single_iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_multi, masks[:, 1:], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(got_multi_iou, iou[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(without, got_multi, atol=1e-3)


def test_each_device_type_has_one_measured_policy() -> None:
    cpu, gpu = sam_ops.decoder_policy("cpu"), sam_ops.decoder_policy("cuda:1")
    assert cpu == sam_ops.DECODER_POLICIES["cpu"] and gpu == sam_ops.DECODER_POLICIES["cuda"]
    assert cpu.prompts_per_pass and gpu.prompts_per_pass is None  # a GPU takes every prompt of a call at once
    assert cpu.image_dtype == gpu.image_dtype == torch.float32
    bf16 = sam_ops.decoder_policy("cpu", bf16=True)
    assert bf16.image_dtype == torch.bfloat16 and bf16.prompts_per_pass == cpu.prompts_per_pass


def test_bf16_image_tokens_pass_the_quality_gate_on_photos(figures) -> None:  # type: ignore[no-untyped-def]
    """Final masks (upsampled to the photo, threshold 0) of the bf16 policy vs sam2's float32 decoder, same weights
    and features: min IoU >= 0.99 over 52 box prompts on bus.jpg and zidane.jpg (the gate's photos): every other one
    of each photo's grid and random boxes (on a CPU without bf16 dot products torch's bf16 matmuls run ~25x slower
    than fp32: all 104 took 150 s here)."""
    from tests.benchmarks.decoder_bench import gate_prompts, photo_features, seeded_sam

    model = seeded_sam()  # the benchmarks' SAM 2.1-T at 1024² (testing.write_segmenter(seed=0, 1024))
    fast, exact = (sam_ops.PromptDecoder(model, sam_ops.decoder_policy("cpu", bf16)) for bf16 in (True, False))
    ious: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for photo in photo_features(model):
        coords, labels = (t[::2] for t in gate_prompts(photo))
        with torch.inference_mode():
            _, _, reference, _ = _sam2_decoder(model, photo.features, coords, labels)
            for name, decoder in (("bf16", fast), ("fp32", exact)):
                got, _ = decoder(*photo.features, coords, labels, multimask=False)
                ious[name] += _final_mask_ious(got, reference, photo.hw)
    figures[f"decoder bf16 vs sam2 fp32 (SAM 2.1-T 1024², {len(ious['bf16'])} boxes): min / mean mask IoU"] = (
        f"{min(ious['bf16']):.4f} / {np.mean(ious['bf16']):.4f}"
    )
    assert len(ious["bf16"]) >= 50
    assert min(ious["bf16"]) >= GATE_MIN_IOU
    assert min(ious["fp32"]) >= 0.9999


def _final_mask_ious(a: torch.Tensor, b: torch.Tensor, hw: tuple[int, int]) -> list[float]:
    """(B, 1, s, s) logits each → IoU of their masks upsampled to ``hw`` as sam2 does it (bilinear, threshold 0)."""
    up = [torch.nn.functional.interpolate(x.float(), hw, mode="bilinear", align_corners=False) > 0 for x in (a, b)]
    inter = (up[0] & up[1]).flatten(1).sum(1)
    union = (up[0] | up[1]).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).tolist()


def test_bf16_decoder_serves_only_where_its_gate_passes_and_its_figures_are_stored(sam, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """``gated_decoder``: bf16 when the smallest IoU reaches the threshold, else the exact decoder; one INFO line
    names the figures; they are measured once per key and read back."""
    from service.runners.openvino import gated_decoder

    exact = sam_ops.PromptDecoder(sam)
    measured: list[sam_ops.PromptDecoder] = []

    def measure(decoder: sam_ops.PromptDecoder) -> tuple[int, list[float]]:
        measured.append(decoder)
        return 2, [0.995, 0.999, 1.0]

    path, key = tmp_path / "bf16-gate.json", {"decoder": sam_ops.DECODER_VERSION, "held_out_set": "x"}
    decoder, execution = gated_decoder(sam, exact, path, key, measure, 0.99, "sam")
    assert decoder.policy.image_dtype == torch.bfloat16 and str(execution) == "torch-bf16"
    assert len(measured) == 1 and measured[0].policy.image_dtype == torch.bfloat16 and path.exists()
    with caplog.at_level("INFO", logger="service.runners.openvino"):
        decoder, execution = gated_decoder(sam, exact, path, key, measure, 0.999, "sam")
    assert decoder is exact and str(execution) == "torch-fp32" and len(measured) == 1  # read back, not measured
    (line,) = [r.getMessage() for r in caplog.records if "bf16 decoder" in r.getMessage()]
    assert "failed its quality gate" in line and "min mask IoU 0.9950" in line and "serving its fp32" in line
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    gated_decoder(sam, exact, path, {**key, "held_out_set": "y"}, measure, 0.99, "sam")
    assert len(measured) == 2  # another key: measured anew
