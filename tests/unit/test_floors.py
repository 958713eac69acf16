"""The floors as a contract: import-linter's contracts from pyproject.toml hold on the tree, and each import that
ran against the floors before the re-floor (issue 21) would break one of them again.

`lint-imports` runs the same contracts in `make test`; this test shows that they catch what they are for.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter.configuration import configure
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import Contract

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_TYPES: dict[str, type[Contract]] = {
    "layers": LayersContract,
    "forbidden": ForbiddenContract,
    "acyclic_siblings": AcyclicSiblingsContract,
}

# The imports the re-floor removed (issue 21, "What was found"), each as it would look in today's tree:
# (importer, imported).
REVERTED = [
    pytest.param("service.client", "service.api.servicer", id="client-imports-the-server"),
    pytest.param("service.evaluation.metrics", "service.pipeline.review", id="eval-takes-a-server-enum"),
    pytest.param("service.models.sam_ops", "service.processing.segmentation", id="models-import-processing"),
    pytest.param("service.models.loading", "service.runners.base", id="models-import-runners"),
    pytest.param("service.shapes.world", "service.models.text", id="demo-evaluation-in-shapes"),
    pytest.param("service.processing.detection", "service.runners.base", id="processing-imports-runners"),
    pytest.param("service.runners.openvino", "service.pipeline.review", id="runner-imports-pipeline"),
    pytest.param("service.runners.openvino", "service.shapes.dataset", id="runner-imports-the-demo-world"),
    pytest.param("service.models.profiles", "service.training.train_detector", id="serving-imports-training"),
    pytest.param("service.shapes.attributes", "service.shapes.dataset", id="shapes-cycle"),
    pytest.param("service.provenance", "service.models.download", id="provenance-imports-models"),
    pytest.param("service.labeling.run", "service.models.download", id="labeling-imports-a-server-module"),
    pytest.param("service.pipeline.pipeline", "service.api.servicer", id="pipeline-imports-the-face"),
]


def _contracts() -> list[Contract]:
    configure()  # import-linter's adapters (its timer, printer), as `lint-imports` sets them
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    session = {"root_packages": [config["root_package"]]}
    contracts = []
    for options in config["contracts"]:
        raw: dict[str, Any] = {k: (str(v) if isinstance(v, bool) else v) for k, v in options.items()}
        contracts.append(
            CONTRACT_TYPES[options["type"]](name=options["name"], session_options=session, contract_options=raw)
        )
    return contracts


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("service", cache_dir=None)


def _broken(graph: grimp.ImportGraph) -> list[str]:
    return [c.name for c in _contracts() if not c.check(copy.deepcopy(graph), verbose=False).kept]


def test_every_contract_holds_on_the_tree(graph: grimp.ImportGraph) -> None:
    assert len(_contracts()) >= 4
    assert _broken(graph) == []


def test_the_contracts_see_imports_inside_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A function-local import (the way back-up imports used to hide) is an edge of the graph like any other.
    package = tmp_path / "floorsdemo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from floorsdemo import high\n    return high\n")
    (package / "high.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    demo = grimp.build_graph("floorsdemo", cache_dir=None)
    assert demo.direct_import_exists(importer="floorsdemo.low", imported="floorsdemo.high")


@pytest.mark.parametrize(("importer", "imported"), REVERTED)
def test_a_reverted_import_breaks_a_contract(graph: grimp.ImportGraph, importer: str, imported: str) -> None:
    assert importer in graph.modules and imported in graph.modules
    assert not graph.direct_import_exists(importer=importer, imported=imported)
    reverted = copy.deepcopy(graph)
    reverted.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert _broken(reverted), f"{importer} -> {imported} passes every contract"
