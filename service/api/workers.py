"""What one worker process of ``detseg serve --workers N`` shares with its siblings (``service.supervisor``
starts them): its index, the server-wide admission count, and the readiness that makes one health status.

Every object here lives in shared memory made by the supervisor (``multiprocessing`` with the spawn start method)
and handed to each worker when it starts; a single-process server has no ``WorkerLink`` at all.

- **Admission across workers**: ``max_in_flight + max_queue`` bounds the calls admitted by all workers together:
  each worker checks the sum of ``admitted`` and adds its call under the array's lock (microseconds) before it
  queues it, and gives the slot back when the call ends; a worker that dies has its count zeroed by the
  supervisor. The calls running at once in one worker are ``ceil(max_in_flight / N)``.
- **One metrics endpoint**: each worker serves its Prometheus endpoint on a free loopback port it records in
  ``scrape_ports``; the supervisor's endpoint on ``metrics_port`` reads them all and labels each sample
  ``worker="<index>"``.
- **One health status**: a worker reports SERVING only once every worker has loaded its models (``started``, set
  by the supervisor); until then all say NOT_SERVING. A worker started later to replace one that died loads its
  models before it binds the port, so no connection ever reaches a worker that cannot answer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class WorkerLink:
    """index: this worker's position, from 0; workers: N. admitted: a ``multiprocessing.Array("q", N)`` (calls
    each worker has admitted); ready: a ``multiprocessing.Array("b", N)`` (1 = that worker serves); started: a
    ``multiprocessing.Event`` (every worker has served at least once); scrape_ports: a ``multiprocessing.Array("i",
    N)`` (each worker's loopback Prometheus port, 0 = none). replacement: this worker replaces one that
    died, so it binds the port only once its models are loaded."""

    index: int
    workers: int
    admitted: Any
    ready: Any
    started: Any
    scrape_ports: Any
    replacement: bool = False

    def running_slots(self, max_in_flight: int) -> int:
        """Calls this worker runs at once: its share of the server-wide ``max_in_flight``."""
        return max(1, math.ceil(max_in_flight / self.workers))

    def admit(self, limit: int) -> bool:
        """Takes one server-wide admission slot when fewer than ``limit`` are taken; False when none is free."""
        with self.admitted.get_lock():
            if sum(self.admitted) >= limit:
                return False
            self.admitted[self.index] += 1
            return True

    def release(self) -> None:
        with self.admitted.get_lock():
            self.admitted[self.index] -= 1

    def set_ready(self, ready: bool) -> None:
        self.ready[self.index] = 1 if ready else 0

    def set_scrape_port(self, port: int) -> None:
        self.scrape_ports[self.index] = port

    def all_started(self) -> bool:
        return bool(self.started.is_set())
