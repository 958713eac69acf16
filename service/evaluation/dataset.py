"""An evaluation dataset: COCO instance-segmentation JSON, its images, and optional per-image slices.

Slices are per-image attributes (e.g. {"weather": "rain", "source": "cam-3"}): from a JSON file mapping each
image's ``file_name`` (or its id, as a string) to a dict of attribute → value, and/or from an ``"attributes"``
dict inside each COCO image entry (the file wins where both name an attribute).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from service.printable import normalise_class_name


@dataclasses.dataclass(frozen=True)
class EvalImage:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    slices: dict[str, str]

    def clipped_box(self, bbox: Sequence[float]) -> tuple[float, float, float, float] | None:
        """A COCO ``bbox`` (x, y, w, h) as XYXY clipped to the image (annotators draw past the edge: the server and
        ultralytics refuse such a box), None when nothing of it is left inside."""
        x, y, w, h = bbox
        x0, y0 = min(max(x, 0.0), self.width), min(max(y, 0.0), self.height)
        x1, y1 = min(max(x + w, 0.0), self.width), min(max(y + h, 0.0), self.height)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    """``coco``: the ground truth dict as loaded (pycocotools reads it); ``categories``: id → name."""

    coco: dict[str, Any]
    images: tuple[EvalImage, ...]
    categories: dict[int, str]

    def category_id(self, name: str) -> int | None:
        """The id of a category name, compared as the server compares class names (``normalise_class_name``: case,
        spaces, "_" and "-" aside), None when unknown."""
        key = normalise_class_name(name)
        return next((i for i, n in self.categories.items() if normalise_class_name(n) == key), None)

    def image(self, image_id: int) -> EvalImage:
        return self._images[image_id]

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        return list(self._annotations.get(image_id, ()))

    @functools.cached_property
    def _images(self) -> dict[int, EvalImage]:
        return {i.id: i for i in self.images}

    @functools.cached_property
    def _annotations(self) -> dict[int, list[dict[str, Any]]]:
        """image id → its annotations, in dataset order (one pass, not one per image)."""
        out: dict[int, list[dict[str, Any]]] = {}
        for a in self.coco["annotations"]:
            out.setdefault(a["image_id"], []).append(a)
        return out

    @property
    def slice_names(self) -> list[str]:
        return sorted({k for image in self.images for k in image.slices})

    def limit(self, count: int) -> EvalDataset:
        """The first ``count`` images (their annotations only)."""
        return self.subset({i.id for i in self.images[:count]})

    def subset(self, ids: set[int]) -> EvalDataset:
        """The images with these ids, in dataset order, and their annotations only."""
        coco = {
            **self.coco,
            "images": [i for i in self.coco["images"] if i["id"] in ids],
            "annotations": [a for a in self.coco["annotations"] if a["image_id"] in ids],
        }
        return EvalDataset(coco, tuple(i for i in self.images if i.id in ids), self.categories)


def load_dataset(annotations: Path, images: Path | None = None, slices: Path | None = None) -> EvalDataset:
    """Reads a COCO JSON; ``images``: the folder its file_names are relative to (default: the JSON's folder,
    or its ``images`` subfolder when that holds the first image). ValueError names the file, the entry and what is
    wrong with it (``_checked``)."""
    coco = _checked(_json(Path(annotations)), Path(annotations))
    folder = images if images is not None else _image_folder(Path(annotations), coco)
    extra = _json(Path(slices)) if slices is not None else {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(f"{slices}: not a slices file (an object: file_name or image id -> {{attribute: value}})")
    named = {e["file_name"] for e in coco["images"]} | {str(e["id"]) for e in coco["images"]}
    unknown = [k for k in extra if k not in named]
    if unknown:  # e.g. "a.png" where the file_name is "images/a.png": its slices were dropped without a word
        raise ValueError(
            f"{slices}: {len(unknown)} key(s) name no image of {annotations} (keys are file_names as written there, "
            f"or image ids): {', '.join(repr(k) for k in unknown[:3])}"
        )
    out = []
    for entry in coco["images"]:
        path = folder / entry["file_name"]
        if not path.is_file():
            raise ValueError(
                f"image {entry['file_name']!r} (id {entry['id']}) is not in {folder}; --images names the folder the "
                "file_names are relative to"
            )
        attrs = entry.get("attributes", {})
        attrs = {
            **(attrs if isinstance(attrs, dict) else {}),
            **extra.get(entry["file_name"], extra.get(str(entry["id"]), {})),
        }
        out.append(
            EvalImage(
                entry["id"],
                entry["file_name"],
                path,
                entry["width"],
                entry["height"],
                {str(k): str(v) for k, v in attrs.items() if v is not None},  # null: the image has no value
            )
        )
    categories = {c["id"]: str(c["name"]) for c in coco["categories"]}
    return EvalDataset(coco, tuple(out), categories)


def _checked(coco: Any, source: Path) -> dict[str, Any]:
    """``coco`` with what COCOeval and the requests read checked, and with what COCO derives from an instance's
    mask filled in where an annotation leaves it out: ``area`` (the mask's pixels), ``bbox`` (the mask's box) and
    ``iscrowd`` (0). An annotation id 0 (Label Studio's and Roboflow's exports number annotations from 0) becomes the
    largest id + 1: COCOeval takes a match to id 0 for no match. ValueError: ``{source}: images[3]: 'width' ...``
    -- the entry and the field, never a traceback later (pycocotools would raise KeyError, or silently skip an
    annotation of an unknown image)."""
    from pycocotools import mask as mask_utils

    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise ValueError(f"{source}: not a COCO instances file (no {key!r} list)")
    if not coco["images"]:
        raise ValueError(f"{source}: has no images")
    sizes: dict[int, tuple[int, int]] = {}
    images = []
    for k, entry in enumerate(coco["images"]):
        where = f"{source}: images[{k}]"
        image_id = _id(entry, "id", where)
        if image_id in sizes:
            raise ValueError(f"{where}: id {image_id} is another image's id too")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise ValueError(f"{where}: 'file_name' must be a non-empty string")
        width, height = _size(entry, "width", where), _size(entry, "height", where)
        sizes[image_id] = (height, width)
        images.append({**entry, "width": width, "height": height})
    categories: set[int] = set()
    names: set[str] = set()
    for k, entry in enumerate(coco["categories"]):
        where = f"{source}: categories[{k}]"
        category_id = _id(entry, "id", where)
        if category_id in categories:
            raise ValueError(f"{where}: id {category_id} is another category's id too")
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        if normalise_class_name(entry["name"]) in names:  # answers' labels are matched as `category_id` does
            raise ValueError(
                f"{where}: name {entry['name']!r} is another category's name too (case, spaces, '_' and '-' aside)"
            )
        categories.add(category_id)
        names.add(normalise_class_name(entry["name"]))
    annotations, ids = [], set()
    for k, entry in enumerate(coco["annotations"]):
        where = f"{source}: annotations[{k}]"
        annotation_id = _id(entry, "id", where)
        if annotation_id in ids:
            raise ValueError(f"{where}: id {annotation_id} is another annotation's id too")
        ids.add(annotation_id)
        if _id(entry, "image_id", where) not in sizes:
            raise ValueError(f"{where}: image_id {entry['image_id']} is not an image's id")
        if _id(entry, "category_id", where) not in categories:
            raise ValueError(f"{where}: category_id {entry['category_id']} is not a category's id")
        rle = _rle(entry.get("segmentation"), sizes[entry["image_id"]], where)
        filled = {"iscrowd": 0, **entry}
        if "area" not in entry:
            filled["area"] = float(mask_utils.area(rle()))
        if "bbox" not in entry:
            filled["bbox"] = [float(v) for v in mask_utils.toBbox(rle())]
        elif not _box(entry["bbox"]):
            raise ValueError(f"{where}: 'bbox' must be [x, y, width, height], finite, width and height >= 0")
        annotations.append(filled)
    if 0 in ids:  # COCOeval records a match as the ground truth's id, 0 meaning none: a match to id 0 was a miss
        for a in annotations:
            if a["id"] == 0:
                a["id"] = max(ids) + 1
    return {**coco, "images": images, "annotations": annotations}


def _id(entry: Any, key: str, where: str) -> int:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), int) or isinstance(entry[key], bool):
        raise ValueError(f"{where}: {key!r} must be an integer (COCO's ids are)")
    return int(entry[key])


def _size(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if not _number(value) or value != int(value) or value < 1:
        raise ValueError(f"{where}: {key!r} must be a whole number of pixels >= 1")
    return int(value)


def _box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(_number(v) for v in value)
        and value[2] >= 0
        and value[3] >= 0
    )


def _rle(segmentation: Any, size: tuple[int, int], where: str) -> Callable[[], dict[str, Any]]:
    """Checks an annotation's segmentation (polygons, uncompressed or compressed RLE at its image's size) and
    returns what computes its compressed RLE (only called when a field must be derived from it)."""
    from pycocotools import mask as mask_utils

    height, width = size
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_number(v) for v in p) for p in segmentation
        ):
            raise ValueError(f"{where}: 'segmentation' polygons must each be [x1, y1, x2, y2, ...], 3 points or more")
        return lambda: mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}: 'segmentation' must be polygons or an RLE ({{'size': [h, w], 'counts': ...}})")
    if segmentation["size"] != [height, width]:
        raise ValueError(
            f"{where}: the RLE's size {segmentation['size']} is not its image's [height, width] [{height}, {width}]"
        )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return lambda: mask_utils.frPyObjects(segmentation, height, width)
    if not isinstance(counts, str):
        raise ValueError(f"{where}: an RLE's 'counts' must be a list of run lengths or a compressed string")
    return lambda: {"size": [height, width], "counts": counts.encode()}


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None


def _image_folder(annotations: Path, coco: dict[str, Any]) -> Path:
    here = annotations.parent
    if coco["images"] and not (here / coco["images"][0]["file_name"]).is_file():
        return here / "images"
    return here
