"""Micro-batching for in-process models: concurrent callers share one forward pass.

Callers ``submit`` arrays (numpy, or tensors on a device-resident runner's device) with a leading batch axis; a
single drain task stacks what is queued (up to ``max_batch`` rows), runs the model once, and hands each caller its
own rows back. Batches form from whatever arrived while the previous one ran, plus up to ``max_wait`` seconds of
waiting for company (0 = never wait: a lone request runs at once, so batching adds no latency when the server is
idle).
The queue is bounded: beyond ``max_queue`` waiting callers, ``submit`` raises Overloaded at once.
Each pass records how many requests it served (metric ``detseg.batch.requests``, attribute ``model``: the batch
sizes reached under load), and ``batches`` / ``items`` count passes and requests.

A call may carry a context (an open-vocabulary detector's class prompts): only calls whose ``key`` is equal
share a pass, and the pass gets their context. The oldest waiting call decides which key runs next.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np
from opentelemetry import context, metrics, trace

from service.config import Settings
from service.errors import Overloaded

Outputs = tuple[np.ndarray, ...]
_tracer = trace.get_tracer("detseg.runners")
# Requests per forward pass, per batcher: explicit buckets at the batch sizes (1, 2, 3, 4, 6, 8, 12, 16, 32).
_requests_per_pass = metrics.get_meter("detseg").create_histogram(
    "detseg.batch.requests",
    unit="{request}",
    description="requests served by one micro-batched forward pass (attribute model: detector, encoder)",
    explicit_bucket_boundaries_advisory=[1, 2, 3, 4, 6, 8, 12, 16, 32],
)


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """max_batch: rows per forward pass; max_wait: seconds to wait for company; max_queue: callers waiting."""

    max_batch: int
    max_wait: float
    max_queue: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchPolicy:
        return cls(settings.batch_max_size, settings.batch_max_wait_ms / 1000, settings.batch_max_queue)


@dataclasses.dataclass
class _Item:
    array: Any  # numpy, or a tensor on a device-resident runner's device
    future: asyncio.Future[Outputs]
    context: Any
    key: Hashable
    caller: trace.SpanContext  # the request's span: the pass links to every caller it serves


class MicroBatcher:
    """Batches calls of ``run(stacked, context) -> outputs`` (every output has the stacked batch axis first)."""

    def __init__(self, name: str, run: Callable[[np.ndarray, Any], Awaitable[Outputs]], policy: BatchPolicy) -> None:
        self.name = name
        self._run = run
        self.max_batch = max(1, policy.max_batch)
        self.max_wait = policy.max_wait
        self.max_queue = policy.max_queue
        self._queue: collections.deque[_Item] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0  # forward passes run
        self.items = 0  # caller requests served

    async def submit(self, array: Any, context: Any = None, key: Hashable = None) -> Outputs:
        """``array`` (n, ...) → this caller's rows of every output. Calls share a pass only with equal ``key``;
        ``context`` goes to ``run`` with the pass."""
        if len(self._queue) >= self.max_queue:  # callers that gave up (a deadline) leave, then it is counted again
            self._queue = collections.deque(i for i in self._queue if not i.future.done())
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"the {self.name} queue is full ({self.max_queue} waiting); retry with backoff")
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(array, future, context, key, trace.get_current_span().get_span_context()))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            if self.max_wait > 0 and self._rows() < self.max_batch:
                await asyncio.sleep(self.max_wait)
            batch = self._take()
            if not batch:
                continue
            try:
                stacked = batch[0].array if len(batch) == 1 else _concatenate([i.array for i in batch])
                links = [trace.Link(i.caller) for i in batch if i.caller.is_valid]
                with _tracer.start_as_current_span(
                    f"detseg.batch.{self.name}",
                    context=context.Context(),
                    links=links,
                    attributes={"batch.requests": len(batch), "batch.rows": len(stacked)},
                ):  # a pass of several requests: its own trace, linked to each of them
                    outputs = await self._run(stacked, batch[0].context)
            except BaseException as e:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            self.batches += 1
            self.items += len(batch)
            _requests_per_pass.record(len(batch), {"model": self.name})
            start = 0
            for item in batch:
                stop = start + len(item.array)
                if not item.future.done():  # a caller that gave up (deadline) is skipped
                    rows = (o[start:stop] for o in outputs)
                    # Each caller owns its rows: a view would keep the whole pass's arrays alive as long as any
                    # caller caches its part (cache_max_bytes counts the part).
                    item.future.set_result(tuple(rows) if len(batch) == 1 else tuple(_own(r) for r in rows))
                start = stop

    def _rows(self) -> int:
        return sum(len(i.array) for i in self._queue)

    def _take(self) -> list[_Item]:
        """Queued items with the oldest's key, oldest first, up to max_batch rows (at least one item); callers
        gone are dropped; items of other keys keep their places."""
        batch: list[_Item] = []
        rest: collections.deque[_Item] = collections.deque()
        rows = 0
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if batch and (item.key != batch[0].key or rows + len(item.array) > self.max_batch):
                rest.append(item)
                continue
            batch.append(item)
            rows += len(item.array)
        self._queue = rest
        return batch


def _concatenate(arrays: list[Any]) -> Any:
    """Callers' inputs stacked along the first axis: numpy, or tensors on a device-resident runner's device."""
    if isinstance(arrays[0], np.ndarray):
        return np.concatenate(arrays)
    import torch  # only a device-resident torch runner submits tensors

    return torch.cat(arrays)


def _own(rows: Any) -> Any:
    """A copy of a slice of a pass's output (numpy array or torch tensor) that holds no reference to the rest."""
    return rows.clone() if hasattr(rows, "clone") else np.array(rows, copy=True)
