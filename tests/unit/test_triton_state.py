"""`detseg triton up`'s state file: `triton down` signals only the process it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from service.runners.triton_local import process_start, read_state, stop_detached


def test_a_stale_state_names_no_process_and_is_removed(tmp_path: Path) -> None:
    """A state file left by a reboot or a crash made `triton down` SIGTERM (and killpg) whatever process had that
    pid now, and `triton up` refuse as 'already up'; a corrupt one was a traceback."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "local.json"
        started = process_start(bystander.pid)
        assert started is not None and process_start(os.getpid()) != started
        # the pid is alive, but it is not the process that was started then
        state.write_text(json.dumps({"pid": bystander.pid, "started": started - 1}))
        assert read_state(tmp_path) is None and not state.exists()
        state.write_text(json.dumps({"pid": bystander.pid, "started": started - 1}))
        assert stop_detached(tmp_path, timeout=1) is False
        assert bystander.poll() is None  # not signalled
        state.write_text("{not json")
        assert read_state(tmp_path) is None and not state.exists()
        state.write_text(json.dumps({"pid": bystander.pid, "started": started}))  # the one it started: stopped
        assert read_state(tmp_path) is not None
        assert stop_detached(tmp_path, timeout=1) is True  # (our own child stays a zombie until reaped below)
        assert bystander.wait(timeout=10) != 0
    finally:
        bystander.kill()
        bystander.wait()
