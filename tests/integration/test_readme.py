"""The README's Python client example runs against a live server and prints labeled instances."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_client_example_runs(demo_server):
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "TARGET" in s)
    code = snippet.replace('TARGET = "127.0.0.1:50051"', f'TARGET = "{demo_server.target}"')
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=README.parent
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(tuple("0123456789abcdef")) and "shapes-yolo11n" in lines[-1]
    assert lines[-1].endswith(f"{len(lines) - 1} detections, 1 region")
    labels = [line.split()[0] for line in lines[:-1]]
    assert "circle" in labels and "star" in labels and set(labels) <= {"circle", "star"}
    assert any(line.split()[-2:] == ["round", "shape"] for line in lines[:-1])  # the text's answer says so
