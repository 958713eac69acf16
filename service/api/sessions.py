"""Track sessions as a server resource: at most ``max_sessions`` open at once in this process (beyond:
Overloaded → RESOURCE_EXHAUSTED, before anything is allocated), and the counts telemetry reads (sessions open,
objects they follow, frames answered). A session lives inside its call: its state is released when the call ends,
however it ends (``service.pipeline.tracking``). With worker processes each worker holds its own sessions (the limit
is per worker) and a stream stays on the worker that accepted its call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from service.errors import Overloaded
from service.pipeline.tracking import TrackSession


class TrackSessions:
    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_track_sessions must be >= 1")
        self.max_sessions = max_sessions
        self._open: set[TrackSession] = set()
        self.frames = 0  # frames answered, all sessions

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def objects(self) -> int:
        """Tracks live in the open sessions. Read by the metrics' thread while the event loop opens and closes
        sessions: the set is copied first (one C call under the GIL), never iterated while it may change size."""
        return sum(s.tracks for s in list(self._open))

    @contextlib.asynccontextmanager
    async def session(self, session: TrackSession) -> AsyncIterator[None]:
        if len(self._open) >= self.max_sessions:
            raise Overloaded(
                f"{len(self._open)} track sessions are open, this server's limit (max_track_sessions); retry later"
            )
        self._open.add(session)
        try:
            yield
        finally:
            self._open.discard(session)

    def answered(self) -> None:
        """One more frame answered."""
        self.frames += 1
