"""The int8 encoder's shipped shapes-world images (service.runners.openvino.INT8_IMAGES) are exactly what the worlds
render (service.training.int8_images), so the int8 IR cached under CALIBRATION's name and the gate measured on
GATE_SETS["shapes"] see the same pixels and boxes as when the serving path rendered them itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.errors import ModelUnavailable
from service.models.tensors import SegmenterSpec
from service.processing.segmentation import SegmenterProcessing
from service.runners import openvino
from service.training import int8_images


@pytest.fixture(scope="module")
def rendered() -> openvino.Int8Images:
    return int8_images.render()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, rendered: openvino.Int8Images) -> Path:
    folder = tmp_path_factory.mktemp("int8_images")
    int8_images.write(folder, rendered)
    return folder


def _assert_equal(a: openvino.Int8Images, b: openvino.Int8Images) -> None:
    assert len(a.calibration) == len(b.calibration) == openvino.CALIBRATION_SCENES
    assert len(a.gate_scenes) == len(b.gate_scenes) == 2 * openvino.GATE_SCENES
    for x, y in zip(a.calibration, b.calibration, strict=True):
        assert x.dtype == y.dtype == np.uint8 and x.shape == y.shape and x.shape[2] == 3
        assert np.array_equal(x, y)
    for g, h in zip(a.gate_scenes, b.gate_scenes, strict=True):
        assert g.rgb.dtype == h.rgb.dtype == np.uint8 and np.array_equal(g.rgb, h.rgb)
        assert g.boxes.dtype == h.boxes.dtype == np.float32 and g.boxes.shape == h.boxes.shape
        assert np.array_equal(g.boxes, h.boxes)


def test_the_shipped_images_are_what_the_worlds_render(rendered: openvino.Int8Images) -> None:
    _assert_equal(openvino.load_int8_images(), rendered)
    # The files are the manifest's and nothing else.
    manifest = json.loads((openvino.INT8_IMAGES / "manifest.json").read_text())
    named = set(manifest["calibration"]) | {item["image"] for item in manifest["gate_scenes"]}
    assert {p.name for p in openvino.INT8_IMAGES.iterdir()} == named | {"manifest.json"}


def test_the_gate_and_the_calibration_take_them(rendered: openvino.Int8Images) -> None:
    gate = openvino.gate_images(openvino.GATE_SETS["shapes"])
    _assert_equal(openvino.Int8Images(calibration=rendered.calibration, gate_scenes=gate), rendered)
    image_size = 64
    processing = SegmenterProcessing(SegmenterSpec(image_size=image_size))
    calibration = openvino.calibration_images(image_size)
    assert len(calibration) == 8 + openvino.CALIBRATION_SCENES
    for got, rgb in zip(calibration[8:], rendered.calibration, strict=True):
        assert np.array_equal(got, processing.preprocess(np.ascontiguousarray(rgb)))


def test_writing_them_again_reads_back_the_same(written: Path, rendered: openvino.Int8Images) -> None:
    _assert_equal(openvino.load_int8_images(written), rendered)
    shipped = (openvino.INT8_IMAGES / "manifest.json").read_text()
    assert (written / "manifest.json").read_text() == shipped


def test_images_rendered_for_other_sets_are_refused(tmp_path: Path, written: Path) -> None:
    for file in written.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "calibration_set": "shapes-train-5"}))
    with pytest.raises(ModelUnavailable, match="regenerate it with python -m service.training.int8_images"):
        openvino.load_int8_images(tmp_path)
