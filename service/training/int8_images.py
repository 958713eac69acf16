"""Writes the shapes-world images the int8 OpenVINO image encoder is calibrated and gated with.

    python -m service.training.int8_images [--out service/models/int8_images]

``service.runners.openvino`` reads them from ``INT8_IMAGES`` (shipped with the package) instead of rendering the
synthetic worlds on the serving path: CALIBRATION_SCENES train scenes of the plain world (CALIBRATION's
"shapes-train-4", beside scikit-learn's photos) and GATE_SCENES val scenes of each world with their ground-truth
boxes (GATE_SETS["shapes"], the demo SAM's quality gate). Lossless PNGs (RGB, the scenes' own sizes) and a
manifest.json naming them, with the gate's boxes (XYXY pixels) and the set names they were rendered for. The worlds
are deterministic, so running this again writes the same pixels; tests/unit/test_int8_images.py checks that the
shipped files are what the worlds render. Changing what is rendered means renaming the sets (CALIBRATION,
GATE_SETS), which rebuilds cached int8 encoders and measures their gates anew.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.runners.openvino import (
    CALIBRATION,
    CALIBRATION_SCENES,
    GATE_SCENES,
    GATE_SETS,
    INT8_IMAGES,
    GateImage,
    Int8Images,
)
from service.shapes.attributes import attribute_scenes
from service.shapes.dataset import scenes


def render() -> Int8Images:
    """The images as the worlds render them now (what ``load_int8_images`` must return)."""
    plain = list(scenes("val", GATE_SCENES))
    attribute = attribute_scenes("val", GATE_SCENES)
    return Int8Images(
        calibration=[scene.image for scene in scenes("train", CALIBRATION_SCENES)],
        gate_scenes=[
            GateImage(scene.image, np.array([i.box for i in scene.instances], dtype=np.float32).reshape(-1, 4))
            for world in (plain, attribute)
            for scene in world
        ],
    )


def gate_names() -> list[str]:
    """The gate scenes' file names, in ``render``'s order: the plain world's, then the attribute world's."""
    return [f"gate-shapes-val-{i:02d}.png" for i in range(GATE_SCENES)] + [
        f"gate-attributes-val-{i:02d}.png" for i in range(GATE_SCENES)
    ]


def write(folder: Path, images: Int8Images | None = None) -> Path:
    """Writes ``images`` (default ``render()``) into ``folder``, its previous PNGs removed; returns manifest.json's
    path."""
    images = images or render()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    calibration = [f"calibration-shapes-train-{i}.png" for i in range(CALIBRATION_SCENES)]
    for name, rgb in zip(calibration, images.calibration, strict=True):
        Image.fromarray(rgb).save(folder / name, optimize=True)
    gate = []
    for name, item in zip(gate_names(), images.gate_scenes, strict=True):
        Image.fromarray(item.rgb).save(folder / name, optimize=True)
        gate.append({"image": name, "boxes": [[float(v) for v in box] for box in item.boxes]})
    manifest = {
        "about": "written by python -m service.training.int8_images; read by service.runners.openvino",
        "calibration_set": CALIBRATION,
        "gate_set": GATE_SETS["shapes"],
        "calibration": calibration,
        "gate_scenes": gate,
    }
    head = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in manifest.items() if key != "gate_scenes"]
    items = ",\n".join(f"  {json.dumps(item)}" for item in gate)  # one line per image
    path = folder / "manifest.json"
    path.write_text("{\n" + ",\n".join(head) + ',\n "gate_scenes": [\n' + items + "\n ]\n}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=INT8_IMAGES, help="folder to write (default: %(default)s)")
    args = parser.parse_args()
    manifest = write(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {manifest.parent} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
