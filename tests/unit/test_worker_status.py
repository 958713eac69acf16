"""The server's exit status from its workers' (``service.supervisor.worker_status``)."""

from __future__ import annotations

import signal

from service.supervisor import worker_status


def test_a_worker_sigterm_ended_before_its_handler_was_set_is_a_clean_stop_only_when_told_to_stop() -> None:
    """A SIGTERM in a worker's first half second (interpreter start, before its handler) ended it by the default
    action, exit -15: `serve --workers N` then exited 1, a failed stop for systemd or Kubernetes."""
    assert worker_status(-signal.SIGTERM, stopped=True) == 0
    assert worker_status(-signal.SIGTERM, stopped=False) == 1  # not asked: someone else's signal, a failure
    assert worker_status(0, stopped=False) == 0
    assert worker_status(2, stopped=True) == 2  # its own error status (e.g. models that cannot load)
    assert worker_status(-signal.SIGKILL, stopped=True) == 1
    assert worker_status(None, stopped=True) == 1
