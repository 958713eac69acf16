"""An ultralytics YOLO segmentation dataset (see ``service.labeling.exports`` for what every writer takes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from service.labeling.exports.common import IMAGES_DIR, ImageMode, category_ids, place_images, write_files
from service.labeling.records import LabeledImage

YOLO_DATA_FILE = "data.yaml"


def write_yolo_seg(
    images: Sequence[LabeledImage],
    categories: Sequence[str],
    out: Path,
    image_dir: Path,
    *,
    image_mode: ImageMode = "symlink",
    dataset_root: Path | None = None,
) -> Path:
    """Writes an ultralytics YOLO segmentation dataset; returns the path of its ``data.yaml``.

    ``out/images/<file_name>``: the images (see ``service.labeling.exports`` for ``image_mode``);
    ``out/labels/...txt``: one label file per image where ultralytics looks for it (``img2label_paths``: the last
    ``images`` folder replaced by ``labels``, the suffix by ``.txt``; empty for an image without instances, a
    background image), one line ``cls x1 y1 x2 y2 ...`` per instance, class index 0..N-1 and polygon vertices
    normalised by the image's width and height. ``data.yaml``: ``path`` (``dataset_root``, default ``out``, absolute:
    where the dataset is read from, when ``out`` is a folder renamed into place afterwards), ``train`` and ``val``
    (both ``images``: one unsplit set), ``names`` ({index: label}).

    Polygons are made the way ultralytics' ``convert_coco(..., use_segments=True)`` makes them from RLE: the mask's
    outer contours (``cv2.findContours``, external, ``CHAIN_APPROX_SIMPLE``; holes are filled), parts of fewer than 3
    points dropped, several parts joined into one polygon by ``merge_multi_segment`` (zero-width bridges between
    nearest points). Vertices are the centres of the contour's pixels in the frame normalised coordinates live in
    (the image spans [0, 1]; pixel (r, c) covers [c, c + 1] × [r, r + 1] before dividing by (W, H)): pixel (r, c) →
    ((c + 0.5) / W, (r + 0.5) / H). ``convert_coco`` writes (c / W, r / H), half a pixel up and left; ultralytics
    rasterises with ``cv2.fillPoly`` after truncating to int32 (``polygon2mask``), where float rounding of c / W * W
    then loses about half the top and left boundary pixels (IoU ≈ 0.965 for a 50 px disc, measured) while centres give
    single-part masks back exactly at the original size. Extra pixels come only from the bridges.
    """
    from ultralytics.data.utils import img2label_paths

    ids = category_ids(images, categories)
    check_label_paths([image.file_name for image in images])
    files: dict[Path, bytes] = {}
    for image in images:
        lines = []
        for inst in image.instances:
            polygon = _yolo_polygon(inst.mask())
            if polygon is None:
                continue
            xy = ((polygon + 0.5) / (image.width, image.height)).ravel()
            lines.append(" ".join([str(ids[inst.label]), *(f"{v:.6f}" for v in xy)]))
        label = Path(img2label_paths([str(out / IMAGES_DIR / image.file_name)])[0])
        files[label] = "".join(f"{line}\n" for line in lines).encode("utf-8")
    root = (dataset_root if dataset_root is not None else out).resolve()
    data = {"path": str(root), "train": IMAGES_DIR, "val": IMAGES_DIR, "names": dict(enumerate(categories))}
    path = out / YOLO_DATA_FILE
    files[path] = yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")
    place_images(images, image_dir, out / IMAGES_DIR, image_mode)
    write_files(files)
    return path


def _yolo_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool mask → one polygon (K, 2) float64 of (column, row) pixel indices, as ``cv2.findContours`` gives
    them; None when no outer contour has 3 points."""
    from ultralytics.data.converter import merge_multi_segment

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1, 2) for c in contours if len(c) >= 3]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0].astype(np.float64)
    return np.concatenate(merge_multi_segment([p.ravel().tolist() for p in parts])).astype(np.float64)


def check_label_paths(file_names: Sequence[str]) -> None:
    """ValueError when two images would share a YOLO label file (same path but for the suffix: a.jpg, a.png)."""
    seen: dict[str, str] = {}
    for name in file_names:
        key = str(Path(name).with_suffix(""))
        if key in seen:
            raise ValueError(
                f"images {seen[key]!r} and {name!r} would share one YOLO label file: rename one, or leave yolo out of "
                "the formats"
            )
        seen[key] = name
