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


class _Reports:
    """write_repository as ensure_repository sees it: writes each role's model.onnx, or dies halfway (a crash)."""

    def __init__(self) -> None:
        self.calls = 0
        self.crash = False

    def __call__(self, models, settings, out: Path) -> list:
        from types import SimpleNamespace

        from service.models.roles import MODEL_ROLES

        self.calls += 1
        reports = []
        for n, role in enumerate(MODEL_ROLES):
            if self.crash and n == 1:
                raise KeyboardInterrupt  # killed while writing the second graph
            graph = out / role / "1" / "model.onnx"
            graph.parent.mkdir(parents=True, exist_ok=True)
            graph.write_bytes(b"graph")
            reports.append(SimpleNamespace(role=role))
        return reports


def _models(segmenter_sha: str = "b" * 64):
    from types import SimpleNamespace

    return SimpleNamespace(
        detector=SimpleNamespace(sha256="a" * 64), segmenter=SimpleNamespace(sha256=segmenter_sha, overrides=())
    )


def test_the_onnx_cache_is_one_export_whatever_the_serving_knobs(tmp_path: Path, monkeypatch) -> None:
    """The stamp held the threads and Triton's knobs, so `serve` and `serve --workers 2` (1 thread per worker)
    re-exported every graph in turn; the runners read only the graphs and their parameters from the cache."""
    from service.config import Settings

    export = _Reports()
    monkeypatch.setattr(triton_repo, "write_repository", export)
    for threads in (0, 1, 2):
        settings = triton_repo.cache_settings(Settings(threads=threads, triton_instances=3))
        triton_repo.ensure_repository(_models(), settings, tmp_path)
    assert export.calls == 1


def test_an_export_killed_midway_is_exported_again(tmp_path: Path, monkeypatch) -> None:
    """A re-export rewrote the graphs in place under the old stamp: killed halfway, the next start found a matching
    stamp and loaded a graph cut short (ORT: InvalidProtobuf), for good."""
    from service.config import Settings

    export = _Reports()
    monkeypatch.setattr(triton_repo, "write_repository", export)
    settings = Settings()
    assert triton_repo.ensure_repository(_models(), settings, tmp_path)
    export.crash = True
    with pytest.raises(KeyboardInterrupt):
        triton_repo.ensure_repository(_models("c" * 64), settings, tmp_path)  # other weights: export again, killed
    export.crash = False
    assert not (tmp_path / triton_repo.STAMP).exists()
    assert triton_repo.ensure_repository(_models(), settings, tmp_path)  # the first weights again: not trusted
    assert export.calls == 3
    # `detseg export` stamps what it writes: a later `triton up` of other weights exports again, of these does not
    triton_repo.export_repository(_models("d" * 64), settings, tmp_path)
    assert triton_repo.ensure_repository(_models(), settings, tmp_path)
    assert not triton_repo.ensure_repository(_models(), settings, tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_ir_is_keyed_by_the_libraries_that_built_it(tmp_path: Path, monkeypatch, precision: str) -> None:
    """The IR's key (and the int8 gate's, through int8_identity) named no OpenVINO or NNCF version, though their
    conversion and quantisation rounding is what the int8 gate measures: an upgrade kept trusting old figures."""
    from importlib.metadata import version

    graph = tmp_path / "sam2_image_encoder" / "1" / "model.onnx"
    graph.parent.mkdir(parents=True)
    graph.write_bytes(b"graph")
    keys: list[dict] = []
    monkeypatch.setattr(openvino_ir, "_cached", lambda folder, key: keys.append(key))  # a miss, key recorded

    def build(*args):
        raise RuntimeError("would build")

    monkeypatch.setattr(openvino_ir, "read_encoder", build)
    with pytest.raises(RuntimeError, match="would build"):
        openvino_ir.encoder_ir(None, graph, 256, precision, list, "held-out")
    expected = {"openvino": version("openvino")} | ({"nncf": version("nncf")} if precision == "int8" else {})
    assert keys[0]["libraries"] == expected
    ir = openvino_ir.EncoderIR(tmp_path / "x.xml", precision, dict(keys[0]), built=False)
    assert openvino_ir.int8_identity(ir)["libraries"] == expected


def test_an_export_that_differs_from_torch_is_not_served() -> None:
    """Each export measured its graph against torch (max_abs_diff) but nothing enforced it: a graph answering NaN
    or far from torch was stamped and served by the onnx, openvino and Triton backends."""
    from types import SimpleNamespace

    from service.errors import ModelUnavailable
    from service.models.roles import Role

    good = [
        SimpleNamespace(role=Role.DETECTOR, max_abs_diff=0.4),
        SimpleNamespace(role=Role.SAM2_MASK_DECODER, max_abs_diff=2e-5),
    ]
    triton_repo.check_parity(good)
    for bad in (
        SimpleNamespace(role=Role.SAM2_IMAGE_ENCODER, max_abs_diff=float("nan")),
        SimpleNamespace(role=Role.DETECTOR, max_abs_diff=7.0),
    ):
        with pytest.raises(ModelUnavailable, match=f"the exported {bad.role} graph differs from torch by"):
            triton_repo.check_parity([*good, bad])
