"""What a start reads back from the disk caches of builds (OpenVINO IRs, ONNX exports): a file that does not parse,
or a build without its weights, is a miss (built again), never an error ("a value that does not parse is a miss").
Both were a JSONDecodeError at every start after a crash left a file cut short."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.models import openvino_ir, triton_repo


@pytest.mark.parametrize("meta", ['{"precision": "int8", "sou', "[1, 2]", "\udcff"])
def test_an_ir_whose_metadata_does_not_parse_is_a_miss(tmp_path: Path, meta: str) -> None:
    folder = tmp_path / "int8-abc"
    folder.mkdir()
    (folder / openvino_ir._XML).write_text("<net/>")
    (folder / openvino_ir._XML).with_suffix(".bin").write_bytes(b"\0")
    (folder / openvino_ir._META).write_text(meta, errors="surrogateescape")
    assert openvino_ir._cached(folder, {"precision": "int8"}) is None


def test_an_ir_without_its_weights_is_a_miss(tmp_path: Path) -> None:
    folder = tmp_path / "fp32-abc"
    folder.mkdir()
    (folder / openvino_ir._XML).write_text("<net/>")
    (folder / openvino_ir._META).write_text('{"precision": "fp32"}')
    assert openvino_ir._cached(folder, {"precision": "fp32"}) is None
    (folder / openvino_ir._XML).with_suffix(".bin").write_bytes(b"\0")
    assert openvino_ir._cached(folder, {"precision": "fp32"}) == {"precision": "fp32"}


@pytest.mark.parametrize("text", ['{"detector": "ab', "null", ""])
def test_an_export_stamp_that_does_not_parse_means_export_again(tmp_path: Path, text: str) -> None:
    stamp = tmp_path / triton_repo.STAMP
    stamp.write_text(text)
    assert triton_repo._stamp(stamp) == {}
    assert triton_repo._stamp(tmp_path / "absent.json") == {}
