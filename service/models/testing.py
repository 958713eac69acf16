"""Seeded random-init test models: real architectures, written as real checkpoints.

They load through exactly the code that loads official weights, so tests exercise the real path.
Random weights make the outputs meaningless but deterministic, which is what parity tests need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

TEST_VOCABULARY = ("person", "bus", "car", "dog", "cat", "bicycle")
TEST_DETECTOR_ARCH = "yolo11n.yaml"
TEST_SEGMENTER_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
TEST_SEGMENTER_IMAGE_SIZE = 256
TEST_SEGMENTER_OVERRIDES = (f"++model.image_size={TEST_SEGMENTER_IMAGE_SIZE}",)
TEST_OPEN_DETECTOR_ARCH = "yoloe-11n.yaml"  # YOLOE: classes are text embeddings given per request


class SeededModels(NamedTuple):
    """The checkpoint paths of the seeded test models."""

    detector: Path
    segmenter: Path


def make_test_models(directory: Path, seed: int = 0) -> SeededModels:
    """Writes (once) the seeded test detector and segmenter checkpoints; returns their paths.

    Detector: ultralytics checkpoint of ``yolo11n.yaml`` with the 6-class TEST_VOCABULARY.
    Segmenter: ``{"model": state_dict}`` of SAM 2.1 hiera-tiny at image_size 256.
    """
    directory = directory / f"seed-{seed}"
    detector, segmenter = directory / "test-yolo11n.pt", directory / "test-sam2.1_hiera_t_256.pt"
    stamp = directory / "manifest.json"
    if stamp.exists() and detector.exists() and segmenter.exists():
        return SeededModels(detector, segmenter)
    directory.mkdir(parents=True, exist_ok=True)
    _write_detector(detector, seed)
    write_segmenter(segmenter, seed, TEST_SEGMENTER_IMAGE_SIZE)
    stamp.write_text(json.dumps({"seed": seed, "detector": detector.name, "segmenter": segmenter.name}))
    return SeededModels(detector, segmenter)


def make_test_open_detector(
    directory: Path, seed: int = 0, architecture: str = TEST_OPEN_DETECTOR_ARCH, text_model: str = ""
) -> Path:
    """Writes (once) the seeded open-vocabulary test detector: an ultralytics checkpoint of ``yoloe-11n.yaml``
    (or another YOLOE ``architecture``, a ``-seg`` one builds the segmentation variant; or YOLO-World v2, e.g.
    ``yolov8n-worldv2.yaml``) whose text encoder is ``minilm-512:seed<seed>`` (all-MiniLM-L6-v2 + a fixed
    projection to 512), or the ``text_model`` given (e.g. "mobileclip:blt"; the contrastive bias is calibrated
    with the MiniLM features either way)."""
    suffix = "-" + text_model.replace(":", "-").replace("/", "-") if text_model else ""
    path = directory / f"seed-{seed}" / f"test-{architecture.removesuffix('.yaml')}{suffix}.pt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from ultralytics.nn.tasks import WorldModel, YOLOEModel, YOLOESegModel

    from service.models.text import PROJECTED_MINILM, ClassTextEncoder, SentenceEncoder

    torch.manual_seed(seed)
    kind = WorldModel if "world" in architecture else YOLOESegModel if "-seg" in architecture else YOLOEModel
    model = kind(architecture, nc=len(TEST_VOCABULARY), verbose=False)
    model.text_model = f"{PROJECTED_MINILM}{seed}"
    texts = ClassTextEncoder.for_detector(model.text_model, SentenceEncoder.load()).encode(TEST_VOCABULARY)
    _calibrate_open(model, torch.from_numpy(texts)[None])
    model.text_model = text_model or model.text_model
    model.names = dict(enumerate(TEST_VOCABULARY))
    _save_detector(model, path, seed)
    return path


def _write_detector(path: Path, seed: int) -> None:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(TEST_DETECTOR_ARCH, nc=len(TEST_VOCABULARY), verbose=False)
    model.names = dict(enumerate(TEST_VOCABULARY))
    _calibrate(model)
    _save_detector(model, path, seed)


def _save_detector(model: torch.nn.Module, path: Path, seed: int) -> None:
    """Writes ``model`` (fp16) as an ultralytics checkpoint, atomically."""
    import ultralytics
    from ultralytics.nn.tasks import SegmentationModel

    task = "segment" if isinstance(model, SegmentationModel) else "detect"
    ckpt = {  # the layout ultralytics' Model.save writes
        "ema": None,
        "model": model.half(),
        "date": "2026-01-01T00:00:00+00:00",  # fixed: same seed, same bytes
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "train_args": {"task": task, "imgsz": 640, "seed": seed},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def _calibrate(model: torch.nn.Module) -> None:
    """Makes random weights give varied, untied scores: BatchNorm statistics re-estimated on the photos that
    ship with ultralytics, and class logits shifted by +3 so a few boxes clear the default 0.25 threshold.
    Still random weights (no training); without this every anchor scores the same ~0.002.
    """
    batch = _calibration_batch()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(batch)
        head: Any = model.model[-1]  # type: ignore[index]
        for branch in head.cv3:  # Detect head: last conv of each class branch
            branch[-1].bias += 3.0
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1


def _calibrate_open(model: Any, texts: torch.Tensor) -> None:
    """As ``_calibrate`` for YOLOE: BatchNorm statistics from the sample photos, then the contrastive heads'
    bias (−10 when initialised, which leaves every score near 4.5e-5 on random weights) set so that about 0.5 %
    of anchor-class scores clear 0.25. Still random weights. ``texts``: (1, N, 512) class-text features."""
    from service.models import open_vocabulary

    batch = _calibration_batch()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        open_vocabulary.detect(model, batch, open_vocabulary.class_embeddings_from_text(model, texts))
    model.eval()
    head: Any = model.model[-1]
    with torch.no_grad():
        for contrastive in head.cv4:
            contrastive.bias.fill_(0.0)
        classes = open_vocabulary.class_embeddings_from_text(model, texts)
        scores = open_vocabulary.detect(model, batch, classes)[:, 4:]
        logits = torch.logit(scores.clamp(1e-6, 1 - 1e-6))
        shift = -float(torch.quantile(logits.flatten().float(), 0.995)) - 1.1  # logit(0.25) = -1.1
        for contrastive in head.cv4:
            contrastive.bias.fill_(shift)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1


def _calibration_batch() -> torch.Tensor:
    """(2, 3, 640, 640) float32 in [0, 1]: bus.jpg and zidane.jpg letterboxed."""
    import numpy as np
    from PIL import Image
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import ASSETS

    letterbox = LetterBox((640, 640), auto=False)
    images = [np.asarray(Image.open(ASSETS / name).convert("RGB")) for name in ("bus.jpg", "zidane.jpg")]
    batch = torch.stack([torch.from_numpy(np.asarray(letterbox(image=im)).transpose(2, 0, 1).copy()) for im in images])
    return batch.float() / 255.0


def write_segmenter(path: Path, seed: int, image_size: int) -> None:
    """A seeded SAM 2.1 hiera-tiny state dict at ``image_size`` (1024 = the official checkpoint's FLOPs)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(
        TEST_SEGMENTER_CONFIG,
        None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    )
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(path)
