"""What every export writer shares: the checks of the inputs (``category_ids``, ``check_categories``), where the
formats that carry images place them (``IMAGES_DIR``, ``place_images``), XML serialisation
checked for well-formedness (``xml_bytes``, ``check_well_formed``) and atomic file writing (``write_files``). See
``service.labeling.exports`` for the conventions."""

from __future__ import annotations

import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from service.labeling.records import LabeledImage
from service.printable import unprintable

ImageMode = Literal["symlink", "copy"]

IMAGES_DIR = "images"  # where the formats that carry images (YOLO, CVAT) place them: <out>/images/<file_name>


def check_categories(categories: Sequence[str]) -> None:
    """ValueError for an empty label set, a label listed twice, or one that is blank or not printable."""
    if not categories:
        raise ValueError("categories is empty")
    for i, name in enumerate(categories):
        problem = "is blank" if not name.strip() else _contains(unprintable(name))
        if problem:
            raise ValueError(f"categories[{i}]: {problem}; labels must be printable text")
    duplicates = sorted(name for name, count in Counter(categories).items() if count > 1)
    if duplicates:
        raise ValueError(f"categories lists {duplicates} more than once")


def category_ids(images: Sequence[LabeledImage], categories: Sequence[str]) -> dict[str, int]:
    """Label → its index in ``categories`` (0-based), after checking every instance of ``images``: ValueError naming
    a label not in ``categories``, or an image whose instance mask is not (height, width)."""
    check_categories(categories)
    ids = {name: i for i, name in enumerate(categories)}
    for image in images:
        problem = _contains(unprintable(image.file_name))
        if problem:
            raise ValueError(f"file_name {image.file_name!r}: {problem}; file names must be printable text")
        for inst in image.instances:
            if inst.label not in ids:
                raise ValueError(
                    f"{image.file_name}: label {inst.label!r} is not in categories {list(categories)}; "
                    "add it or drop those instances"
                )
            if list(inst.rle["size"]) != [image.height, image.width]:
                raise ValueError(
                    f"{image.file_name}: {inst.label!r} mask is {list(inst.rle['size'])} (H, W), "
                    f"the image is {[image.height, image.width]}"
                )
    return ids


def _contains(problem: str | None) -> str | None:
    return None if problem is None else f"contains {problem}"


def xml_bytes(root: ET.Element, name: str) -> bytes:
    """``root`` serialized as UTF-8 XML with a declaration, checked by ``check_well_formed``."""
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    check_well_formed(data, name)
    return data


def check_well_formed(xml: str | bytes, name: str) -> None:
    """ValueError naming ``name`` when ``xml`` does not parse back (serializers escape markup, but write characters
    XML 1.0 forbids as they are)."""
    try:
        ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"{name} would not be well-formed XML ({e})") from None


def write_files(files: dict[Path, bytes]) -> None:
    """Writes each file atomically: into a new temporary sibling (the umask's permissions, as a plain write gets),
    then renamed over ``path`` (parents created)."""
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            with tmp.open("xb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def place_images(images: Sequence[LabeledImage], image_dir: Path, dest: Path, mode: ImageMode) -> None:
    """Puts ``image_dir/<file_name>`` at ``dest/<file_name>`` for every image: a symlink to the resolved source or a
    copy (``mode``); FileNotFoundError naming a missing source, before anything is placed."""
    if mode not in ("symlink", "copy"):
        raise ValueError(f"image_mode must be 'symlink' or 'copy', got {mode!r}")
    sources = [image_dir / image.file_name for image in images]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"images not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for image, source in zip(images, sources, strict=True):
        target = dest / image.file_name
        if target.exists() and target.resolve() == source.resolve():
            continue  # already there (a link from an earlier export, or ``dest`` is the source folder itself)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if mode == "copy":
            shutil.copy2(source, target)
        else:
            target.symlink_to(source.resolve())
