"""The suite's markers select what they say: ``-m triton`` exactly the tests that start a tritonserver,
``-m 'not slow'`` a fast subset without them or the demo-quality runs."""

from __future__ import annotations

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


def _collect(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args, "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return {line for line in result.stdout.splitlines() if "::" in line}


@pytest.mark.slow  # collects the suite three times
def test_triton_and_slow_markers_select_what_they_say():
    everything, triton, fast = _collect(), _collect("-m", "triton"), _collect("-m", "not slow")
    assert triton == {t for t in everything if t.startswith(TRITON_MODULES)} and triton
    assert fast and len(fast) < len(everything) and not fast & triton
    assert not any("test_demo_quality" in t or "test_cli.py" in t for t in fast)
