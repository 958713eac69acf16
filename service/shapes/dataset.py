"""Scenes → on-disk datasets: YOLO (images + labels + data.yaml) and COCO instance annotations (RLE)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service.shapes import shifted
from service.shapes.world import CLASSES, Scene, render_scene, split_seed, yolo_label_lines

# The image worlds a COCO dataset can be written from: "plain" (world.render_scene, the demo models' domain) and
# "shifted" (shifted.render_shifted_scene, a domain they have not seen, with the new class "cross").
WORLDS = ("plain", "shifted")


def scenes(split: str, count: int, start: int = 0, world: str = "plain") -> Iterable[Scene]:
    """``count`` scenes of ``split`` (train | val | test) of ``world`` (one of WORLDS), deterministic."""
    if world == "shifted":
        yield from shifted.shifted_scenes(split, count, start)
        return
    if world != "plain":
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    for i in range(start, start + count):
        yield render_scene(split_seed(split, i))


def coco_annotations(
    items: Sequence[Scene], file_names: Sequence[str] | None = None, world: str = "plain"
) -> dict[str, Any]:
    """COCO instances dict (RLE segmentations with str counts, XYWH bboxes) for ``items`` of ``world``; image id =
    seed."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n, scene in enumerate(items):
        name = file_names[n] if file_names else f"{scene.seed:07d}.png"
        images.append({"id": scene.seed, "file_name": name, "width": scene.width, "height": scene.height})
        for inst in scene.instances:
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            x0, y0, x1, y1 = inst.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene.seed,
                    "category_id": inst.category_id + 1,  # COCO ids start at 1
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    names = shifted.SHIFTED_CLASSES if world == "shifted" else CLASSES
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_yolo_dataset(root: Path, counts: dict[str, int], workers: int = 1) -> Path:
    """Writes images/<split>/*.png, labels/<split>/*.txt and data.yaml; returns data.yaml's path.

    ``workers`` > 1 renders scenes in that many processes (the files are the same either way).
    """
    jobs = []
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(root, split, i) for i in range(count)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_yolo_item, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_yolo_item(job)
    data = root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    splits = "".join(f"{split}: images/{split}\n" for split in counts)
    data.write_text(f"path: {root}\n{splits}names:\n{names}\n")
    return data


def _write_yolo_item(job: tuple[Path, str, int]) -> None:
    root, split, index = job
    (scene,) = scenes(split, 1, start=index)
    stem = f"{scene.seed:07d}"
    Image.fromarray(scene.image).save(root / "images" / split / f"{stem}.png")
    (root / "labels" / split / f"{stem}.txt").write_text("\n".join(yolo_label_lines(scene)) + "\n")


def object_count_slice(count: int) -> str:
    """A scene's crowding, as an evaluation slice: "1-3", "4-6" or "7-8" objects."""
    return "1-3" if count <= 3 else "4-6" if count <= 6 else "7-8"


def image_size_slice(width: int, height: int) -> str:
    """A scene's size, as an evaluation slice: "small" (longest side <= 352 px), "medium" (<= 512) or "large"."""
    side = max(width, height)
    return "small" if side <= 352 else "medium" if side <= 512 else "large"


def write_coco_dataset(root: Path, split: str = "test", count: int = 100, world: str = "plain", start: int = 0) -> Path:
    """``count`` scenes of ``split`` of ``world`` (from index ``start``) as images/*.png and instances.json (COCO,
    RLE) whose image entries carry slice attributes ("objects": crowding, "image_size"); returns the JSON's path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = list(scenes(split, count, start, world))
    names = [f"{scene.seed:07d}.png" for scene in items]
    for scene, name in zip(items, names, strict=True):
        Image.fromarray(scene.image).save(root / "images" / name)
    coco = coco_annotations(items, [f"images/{n}" for n in names], world)
    for entry, scene in zip(coco["images"], items, strict=True):
        entry["attributes"] = {
            "objects": object_count_slice(len(scene.instances)),
            "image_size": image_size_slice(scene.width, scene.height),
        }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a shapes-world COCO dataset (for `detseg eval`).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--start", type=int, default=0, help="index of the first scene of the split")
    parser.add_argument("--world", default="plain", choices=WORLDS)
    args = parser.parse_args()
    print(write_coco_dataset(args.out, args.split, args.count, args.world, args.start))


if __name__ == "__main__":
    main()
