"""Admission control: at most ``max_in_flight`` pipeline calls run at once and ``max_queue`` more wait in
arrival order; anything beyond is refused at once (Overloaded → RESOURCE_EXHAUSTED) instead of piling up
latency. A call whose deadline has passed is not started (DeadlineExceeded), nor kept waiting past it.

Every Segment, EncodeImage, BatchSegment item and StreamSegment item takes one slot. ``in_flight`` and
``queued`` are the live counts (telemetry reads them); cancellation (a client gone, a deadline hit) releases
a slot as the handler unwinds. With worker processes (``WorkerLink``), the bound holds server-wide: see
``service.api.workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from service.api.workers import WorkerLink
from service.errors import DeadlineExceeded, Overloaded


class Admission:
    """``link``: this worker's link to its siblings (None: a single-process server)."""

    def __init__(self, max_in_flight: int, max_queue: int, link: WorkerLink | None = None) -> None:
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.in_flight = 0
        self.queued = 0
        self._link = link
        self._slots = asyncio.Semaphore(link.running_slots(max_in_flight) if link else max_in_flight)

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        """Holds a slot for the body. ``deadline``: time.monotonic() seconds, or None."""
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the request could start")
        limit = self.max_in_flight + self.max_queue
        if self._link is not None:
            if not self._link.admit(limit):
                raise Overloaded(
                    f"server busy: {limit} requests running or queued in its {self._link.workers} workers (limits "
                    f"{self.max_in_flight} + {self.max_queue}); retry with backoff"
                )
        elif self.in_flight + self.queued >= limit:
            raise Overloaded(
                f"server busy: {self.in_flight} requests running and {self.queued} queued (limits "
                f"{self.max_in_flight} + {self.max_queue}); retry with backoff"
            )
        try:
            async with self._admitted(deadline):
                yield
        finally:
            if self._link is not None:
                self._link.release()

    @contextlib.asynccontextmanager
    async def _admitted(self, deadline: float | None) -> AsyncIterator[None]:
        """An admitted call: waits for a running slot (at most until ``deadline``), then holds it for the body."""
        self.queued += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns an acquire that completed as the caller
            # was cancelled, swallowing the cancellation (a cancelled stream's queued item then ran for no one)
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed while the request waited for a free slot") from None
        finally:
            self.queued -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
