"""ONNX export of detector, SAM 2 encoder and prompt decoder, each checked against torch by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.models import export
from service.models.loading import load_detector_module, load_segmenter_module
from service.models.profiles import resolve_models

pytestmark = pytest.mark.slow  # exports and runs the ONNX graphs


@pytest.mark.parametrize("profile", ["test", "demo"])
def test_export_matches_torch(settings, tmp_path, figures, profile):
    models = resolve_models(settings.replace(models=profile))
    detector = load_detector_module(models.detector.path)
    seg = models.segmenter
    sam = load_segmenter_module(seg.architecture, seg.path, seg.overrides)
    det = export.export_detector(detector.module, detector.input_size(), tmp_path / "det.onnx")
    enc = export.export_encoder(sam, tmp_path / "enc.onnx")
    dec = export.export_decoder(sam, tmp_path / "dec.onnx")
    figures[f"onnx vs torch max |Δ| ({profile}): detector / encoder / decoder"] = (
        f"{det.max_abs_diff:.2e} / {enc.max_abs_diff:.2e} / {dec.max_abs_diff:.2e}"
    )
    # Detector outputs are pixel boxes (hundreds) and scores; random weights amplify rounding.
    assert det.max_abs_diff < 1.0
    assert enc.max_abs_diff < 1e-3 and dec.max_abs_diff < 1e-3
    # The decoder takes any number of prompts and points: 9 prompts of 4 points here.
    session = ort.InferenceSession(str(dec.path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["point_coords"][:2] == ["prompts", "points"]
    s = int(sam.image_size)
    rng = np.random.default_rng(0)
    feeds = {
        "image_embed": rng.standard_normal([1, *shapes["image_embed"][1:]], dtype=np.float32),
        "high_res_0": rng.standard_normal([1, *shapes["high_res_0"][1:]], dtype=np.float32),
        "high_res_1": rng.standard_normal([1, *shapes["high_res_1"][1:]], dtype=np.float32),
        "point_coords": rng.uniform(0, s, (9, 4, 2)).astype(np.float32),
        "point_labels": np.ones((9, 4), np.int32),
        "mask_input": np.zeros((9, 1, s // 4, s // 4), np.float32),
        "has_mask_input": np.zeros(9, np.float32),
    }
    single, single_iou, multi, multi_iou = session.run(None, feeds)
    assert single.shape == (9, 1, s // 4, s // 4) and multi.shape == (9, 3, s // 4, s // 4)
    assert single_iou.shape == (9, 1) and multi_iou.shape == (9, 3)
