"""An evaluation dataset: COCO instance-segmentation JSON, its images, and optional per-image slices.

Slices are per-image attributes (e.g. {"weather": "rain", "source": "cam-3"}): from a JSON file mapping each
image's ``file_name`` (or its id, as a string) to a dict of attribute → value, and/or from an ``"attributes"``
dict inside each COCO image entry (the file wins where both name an attribute).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalImage:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    slices: dict[str, str]


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    """``coco``: the ground truth dict as loaded (pycocotools reads it); ``categories``: id → name."""

    coco: dict[str, Any]
    images: tuple[EvalImage, ...]
    categories: dict[int, str]

    def category_id(self, name: str) -> int | None:
        """The id of a category name (case- and space-insensitive), None when unknown."""
        key = name.strip().lower()
        return next((i for i, n in self.categories.items() if n.strip().lower() == key), None)

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        return [a for a in self.coco["annotations"] if a["image_id"] == image_id]

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
    or its ``images`` subfolder when that holds the first image). ValueError names the file and what it lacks."""
    coco = _json(Path(annotations))
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or key not in coco:
            raise ValueError(f"{annotations}: not a COCO instances file (no {key!r})")
    folder = images if images is not None else _image_folder(Path(annotations), coco)
    extra: dict[str, dict[str, Any]] = _json(Path(slices)) if slices is not None else {}
    out = []
    for entry in coco["images"]:
        path = folder / entry["file_name"]
        if not path.is_file():
            raise ValueError(f"image {entry['file_name']!r} (id {entry['id']}) is not in {folder}")
        attrs = {**entry.get("attributes", {}), **extra.get(entry["file_name"], extra.get(str(entry["id"]), {}))}
        out.append(
            EvalImage(
                int(entry["id"]),
                entry["file_name"],
                path,
                int(entry["width"]),
                int(entry["height"]),
                {str(k): str(v) for k, v in attrs.items()},
            )
        )
    categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    return EvalDataset(coco, tuple(out), categories)


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
