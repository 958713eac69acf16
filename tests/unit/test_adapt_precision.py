"""The number format detseg adapt's detector trains in: bfloat16 autocast where the CPU has a bfloat16 unit, float32
elsewhere; its loss reads float32 whatever the products ran in."""

from __future__ import annotations

import copy

import pytest
import torch

from service.adaptation import precision
from service.adaptation.detector import predict_in_bf16
from service.models.demo.profile import SHAPES_YOLO
from service.models.loading import safe_load_ultralytics


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_is_bf16_only_on_a_cpu_with_a_bf16_unit(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.resolve("auto") == expected
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'; known: auto, bf16, fp32"):
        precision.resolve("fp16")


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def test_the_detector_predicts_in_bf16_and_its_loss_reads_float32():
    from ultralytics.cfg import get_cfg

    model = safe_load_ultralytics(SHAPES_YOLO)["model"].float().train()
    model.args = get_cfg()  # the trainer's hyperparameters (the loss's box, cls and dfl gains), as its trainer sets
    reference_model = copy.deepcopy(model)  # as ultralytics' EMA copy, made before training starts
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    batch = {
        "img": x,
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.2, 0.4]]),  # normalised xywh
    }
    predict_in_bf16(model)
    with torch.no_grad():
        reference, ours = _tensors(reference_model(x)), _tensors(model(x))
        reference_loss, ours_loss = reference_model(batch)[0], model(batch)[0]
    assert ours and all(t.dtype == torch.float32 for t in ours if t.is_floating_point())
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True)) > 0  # products in bf16
    for a, b in zip(ours, reference, strict=True):  # the same predictions, to bfloat16's precision
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
    assert ours_loss.dtype == torch.float32 and torch.allclose(ours_loss, reference_loss, rtol=0.05)
    # the copy (ultralytics' EMA, which validates and is saved) still predicts in float32
    assert all(torch.equal(a, b) for a, b in zip(_tensors(reference_model(x)), reference, strict=True))
