"""The suite's memory budget (a pytest plugin, loaded by pyproject's addopts): a contributor's 16 GB laptop runs
`make test`, so the test process and everything it starts (servers, tritonserver, redis) stay under
``BUDGET_BYTES`` resident, summed, at every moment.

- A sampler thread sums the resident memory of the pytest process and all its descendants every
  ``SAMPLE_SECONDS``; the run fails at its end when the peak went over the budget, naming the test that was running,
  and the summary prints the peak either way. With ``DETSEG_TEST_MEMORY_LOG`` set to a file, each test's peak and
  the test process's own resident memory after it are appended there (to find what holds memory between tests).
- glibc keeps freed memory in its heap when its mmap threshold has grown (it grows each time a large block is
  freed), so weights of a model a test module has finished with stayed resident for the rest of the run. The
  threshold is fixed here (this process only; what servers and tools start with is their own business) and
  the heap is trimmed after each module's fixtures are torn down (``release_memory``; a module whose tests each
  load large models calls it after each test too).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# DETSEG_TEST_MEMORY_BUDGET_GIB overrides it (to check the check itself).
BUDGET_BYTES = int(float(os.environ.get("DETSEG_TEST_MEMORY_BUDGET_GIB", "8")) * 1024**3)
SAMPLE_SECONDS = 0.5
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_LOG = os.environ.get("DETSEG_TEST_MEMORY_LOG")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def _resident(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_resident(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants (pages shared between them are counted in each)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _resident(p)
        todo += _children(p)
    return total


class _Sampler:
    def __init__(self) -> None:
        self.peak = 0
        self.peak_test = "(collection)"
        self.current = "(collection)"
        self.test_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-budget", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _sample(self) -> None:
        now = tree_resident(os.getpid())
        self.test_peak = max(self.test_peak, now)
        if now > self.peak:
            self.peak, self.peak_test = now, self.current

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()


_SAMPLER = _Sampler()
_LIBC = _libc()


def release_memory() -> None:
    """Collects garbage and gives the heap's free memory back to the system (~0.3 s with the suite's imports: after
    each module, and after each test of a module whose tests each start servers with large models)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def pytest_configure(config: pytest.Config) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    _SAMPLER.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _SAMPLER.current, _SAMPLER.test_peak = item.nodeid, 0
    yield
    if _LOG:
        gib = 1024**3
        with open(_LOG, "a") as log:
            log.write(f"{_SAMPLER.test_peak / gib:.2f} {_resident(os.getpid()) / gib:.2f} {item.nodeid}\n")
    if nextitem is None or nextitem.module is not item.module:  # the module's fixtures are gone: give memory back
        release_memory()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SAMPLER.stop()
    if _SAMPLER.peak > BUDGET_BYTES and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    gib = 1024**3
    line = (
        f"memory: peak {_SAMPLER.peak / gib:.2f} GiB resident (tests and what they started), budget "
        f"{BUDGET_BYTES / gib:.0f} GiB; during {_SAMPLER.peak_test}"
    )
    if _SAMPLER.peak > BUDGET_BYTES:
        terminalreporter.write_line(f"FAILED {line}", red=True)
    else:
        terminalreporter.write_line(line)
