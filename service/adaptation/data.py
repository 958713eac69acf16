"""A user's COCO dataset for adaptation: a seeded train / held-out split, the YOLO files ultralytics' trainer reads,
and the examples SAM's decoder trains on (in the model's input frame)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from service.evaluation.dataset import EvalDataset
from service.evaluation.metrics import dataset_rle
from service.pixels import upright_rgb
from service.printable import normalise_class_name


@dataclasses.dataclass(frozen=True)
class Split:
    """``train`` and ``holdout`` are subsets of one dataset (no image in both); ``holdout`` picks the early stop and
    is what the before/after figures are measured on. ``replay``: labelled images of the base models' own domain,
    trained beside ``train`` so the adapted models keep what they knew; never evaluated."""

    train: EvalDataset
    holdout: EvalDataset
    replay: EvalDataset | None = None


def split(dataset: EvalDataset, holdout_fraction: float, seed: int) -> Split:
    """A seeded random ``holdout_fraction`` of the images (at least one) is held out; the rest trains."""
    if len(dataset.images) < 2:
        raise ValueError("adaptation needs at least 2 labeled images (one to train on, one held out)")
    order = np.random.default_rng(seed).permutation(len(dataset.images))
    n_holdout = min(len(order) - 1, max(1, round(holdout_fraction * len(order))))
    held = {dataset.images[k].id for k in order[:n_holdout]}
    return Split(dataset.subset({i.id for i in dataset.images} - held), dataset.subset(held))


def class_names(split: Split) -> list[str]:
    """The adapted detector's classes, index = class id: the training data's category names in category-id order,
    then the replay's names the data lacks."""
    names = [split.train.categories[k] for k in sorted(split.train.categories)]
    if split.replay is not None:
        known = {normalise_class_name(n) for n in names}
        for k in sorted(split.replay.categories):
            if normalise_class_name(name := split.replay.categories[k]) not in known:
                names.append(name)
                known.add(normalise_class_name(name))
    return names


def write_yolo(split: Split, root: Path) -> Path:
    """ultralytics' detection layout under ``root`` (images linked, not copied; labels from the COCO boxes) with
    ``data.yaml``; returns its path."""
    names = class_names(split)
    classes = {normalise_class_name(n): k for k, n in enumerate(names)}  # a replay's "traffic_light" is "Traffic light"
    parts = [("train", "", split.train), ("val", "", split.holdout)]
    if split.replay is not None:
        parts.append(("train", "replay-", split.replay))
    for part, prefix, data in parts:
        index = {cid: classes[normalise_class_name(name)] for cid, name in data.categories.items()}
        (root / "images" / part).mkdir(parents=True, exist_ok=True)
        (root / "labels" / part).mkdir(parents=True, exist_ok=True)
        for image in data.images:
            stem = f"{prefix}{image.id}"
            link = root / "images" / part / f"{stem}{image.path.suffix.lower()}"
            if not link.exists():
                os.symlink(image.path.resolve(), link)
            lines = []
            for a in data.annotations(image.id):
                if a.get("iscrowd"):
                    continue
                # within the image: ultralytics refuses a whole image as corrupt when a label's coordinates pass 1
                box = image.clipped_box(a["bbox"])
                if box is None:
                    continue
                x0, y0, x1, y1 = box
                cx, cy = (x0 + x1) / 2 / image.width, (y0 + y1) / 2 / image.height
                bw, bh = (x1 - x0) / image.width, (y1 - y0) / image.height
                lines.append(f"{index[a['category_id']]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
            (root / "labels" / part / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    names_yaml = "".join(f"  {k}: {_yaml_string(n)}\n" for k, n in enumerate(names))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}")
    return data_yaml


def _yaml_string(text: str) -> str:
    """A class name as a double-quoted YAML scalar (JSON's escaping is valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class SamExample:
    """One image in SAM's square input frame of side S: ``image`` (3, S, S) float32 normalised, ``masks`` (P, S, S)
    float32 0/1, ``boxes`` (P, 4) XYXY float32 (P ≥ 1)."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


def sam_examples(dataset: EvalDataset, side: int) -> list[SamExample]:
    """Every image with at least one non-crowd instance, read as the server reads it (EXIF orientation applied: the
    frame of the masks; a phone photo's stored pixels were paired with its upright masks) and resized to ``side`` ×
    ``side`` as the service's SAM pre-processing does (service.processing.segmentation), with its instance masks and
    boxes in that frame."""
    import cv2
    from PIL import Image
    from pycocotools import mask as mask_utils

    from service.models.tensors import SegmenterSpec
    from service.processing.segmentation import SegmenterProcessing

    processing = SegmenterProcessing(SegmenterSpec(image_size=side))
    out = []
    for image in dataset.images:
        anns = [a for a in dataset.annotations(image.id) if not a.get("iscrowd")]
        if not anns:
            continue
        with Image.open(image.path) as opened:
            rgb = upright_rgb(opened)  # as the server reads it: the frame of the masks
        masks, boxes = [], []
        for a in anns:
            full = mask_utils.decode(dataset_rle(a, dataset)).astype(np.float32)
            small = cv2.resize(full, (side, side), interpolation=cv2.INTER_LINEAR) > 0.5
            if not small.any():  # too small to exist in SAM's frame
                continue
            x, y, w, h = a["bbox"]
            sx, sy = side / image.width, side / image.height
            masks.append(small.astype(np.float32))
            boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        if masks:
            out.append(SamExample(processing.preprocess(rgb)[0], np.stack(masks), np.asarray(boxes, np.float32)))
    return out
