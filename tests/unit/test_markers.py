"""The suite's markers select what they say: ``-m triton`` exactly the tests that start a tritonserver,
``-m 'not slow'`` a fast subset without them or the demo-quality runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRITON_MODULES = (
    "tests/integration/test_triton.py",
    "tests/integration/test_triton_cli.py",
    "tests/integration/test_triton_open_vocabulary.py",
)

# One collection of the suite in a fresh interpreter (three took 48 s in CI); each expression given is evaluated by
# pytest's own `-m` matcher on every collected item, as `pytest -m EXPR` selects. Printed as JSON: every node id
# collected, and {expression: [node ids selected]}.
_COLLECT = """
import json, sys
import pytest
from _pytest.mark import MarkMatcher
from _pytest.mark.expression import Expression

class Selected:
    def pytest_collection_finish(self, session):
        self.collected = [i.nodeid for i in session.items]
        matchers = [(i.nodeid, MarkMatcher.from_markers(i.iter_markers())) for i in session.items]
        self.selected = {e: [n for n, m in matchers if Expression.compile(e).evaluate(m)] for e in sys.argv[1:]}

selected = Selected()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"], plugins=[selected])
print("COLLECTED", json.dumps([selected.collected, selected.selected]))
sys.exit(code)
"""


@pytest.mark.slow  # collects the suite
def test_triton_and_slow_markers_select_what_they_say():
    result = subprocess.run(
        [sys.executable, "-c", _COLLECT, "triton", "not slow"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("COLLECTED ")]
    collected, selected = json.loads(line.removeprefix("COLLECTED "))
    everything, triton, fast = set(collected), set(selected["triton"]), set(selected["not slow"])
    assert triton == {t for t in everything if t.startswith(TRITON_MODULES)} and triton
    assert fast and len(fast) < len(everything) and not fast & triton
    assert not any("test_demo_quality" in t or "test_cli.py" in t for t in fast)
