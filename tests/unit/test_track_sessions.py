"""The track sessions' counts as telemetry reads them: from the metrics' thread, while the event loop opens and
closes sessions."""

from __future__ import annotations

import threading
import time

from service.api.sessions import TrackSessions


class _Session:
    tracks = 1


def test_objects_is_read_safely_while_sessions_open_and_close() -> None:
    """The gauge's callback summed over the set of open sessions as it changed size: RuntimeError ("Set changed size
    during iteration") in the metrics' thread, within a second or two of this loop; the observation was lost."""
    sessions = TrackSessions(10**6)
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                assert 0 <= sessions.objects <= 50
            except BaseException as e:  # any failure of the read is the finding
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    opened = [_Session() for _ in range(50)]
    end = time.monotonic() + 3
    try:
        while time.monotonic() < end and not errors:
            for s in opened:
                sessions._open.add(s)  # type: ignore[arg-type]  # what session() does, without an event loop
            for s in opened:
                sessions._open.discard(s)  # type: ignore[arg-type]
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
