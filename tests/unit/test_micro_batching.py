"""MicroBatcher on its own: concurrent callers share passes, get their own rows, errors reach every caller."""

from __future__ import annotations

import asyncio

import numpy as np

from service.errors import Overloaded
from service.runners.batching import BatchPolicy, MicroBatcher


def make(max_batch: int = 8, max_queue: int = 64, max_wait: float = 0.0):
    seen: list[int] = []

    async def run(x: np.ndarray, context: object) -> tuple[np.ndarray, ...]:
        seen.append(len(x))
        await asyncio.sleep(0.01)  # the forward pass takes a while: callers queue meanwhile
        if np.isnan(x).any():
            raise ValueError("bad input")
        return x * 2, x.sum(axis=(1, 2))

    return MicroBatcher("toy", run, BatchPolicy(max_batch, max_wait, max_queue)), seen


def test_each_caller_gets_its_own_rows_from_shared_passes():
    batcher, seen = make(max_batch=4)
    inputs = [np.full((1 + i % 2, 2, 3), float(i), np.float32) for i in range(7)]  # 1 or 2 rows each

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    outputs = asyncio.run(main())
    for x, (doubled, sums) in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(sums, x.sum(axis=(1, 2)))
    assert sum(seen) == sum(len(x) for x in inputs) == 10
    assert all(n <= 4 for n in seen) and len(seen) < len(inputs)
    assert batcher.items == 7 and batcher.batches == len(seen)


def test_a_lone_call_runs_at_once_and_waiting_gathers_company():
    batcher, seen = make(max_wait=0.05)

    async def main():
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 1), np.float32)))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 1), np.float32)))
        await asyncio.gather(first, second)

    asyncio.run(main())
    assert seen == [2]  # the first waited 50 ms for company and the second joined it


def test_a_failing_pass_fails_its_callers_and_the_batcher_goes_on():
    batcher, _ = make(max_batch=2)

    async def main():
        bad = np.full((1, 1, 1), np.nan, np.float32)
        results = await asyncio.gather(
            batcher.submit(bad), batcher.submit(np.ones((1, 1, 1), np.float32)), return_exceptions=True
        )
        later = await batcher.submit(np.ones((1, 1, 1), np.float32))
        return results, later

    (r1, r2), later = asyncio.run(main())
    assert isinstance(r1, ValueError) and isinstance(r2, ValueError)  # same pass
    assert later[0].item() == 2.0


def test_the_queue_is_bounded():
    batcher, _ = make(max_batch=1, max_queue=2)

    async def main():
        return await asyncio.gather(
            *(batcher.submit(np.ones((1, 1, 1), np.float32)) for _ in range(5)), return_exceptions=True
        )

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 3 and "queue is full" in str(refused[0])


def test_only_calls_with_the_same_key_share_a_pass_and_each_pass_gets_its_context():
    contexts: list[tuple[str, int]] = []

    async def run(x: np.ndarray, context: str) -> tuple[np.ndarray, ...]:
        contexts.append((context, len(x)))
        await asyncio.sleep(0.01)
        return (x + (1.0 if context == "a" else 2.0),)

    batcher = MicroBatcher("keyed", run, BatchPolicy(8, 0.0, 64))
    keys = ["a", "b", "a", "b", "a", "c"]

    async def main():
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 1), np.float32), "a", "a"))
        await asyncio.sleep(0)  # the first pass starts alone; the rest queue behind it
        rest = [batcher.submit(np.zeros((1, 1), np.float32), k, k) for k in keys[1:]]
        return await asyncio.gather(first, *rest)

    outputs = asyncio.run(main())
    assert [float(o[0][0, 0]) for o in outputs] == [1.0 if k == "a" else 2.0 for k in keys]
    assert contexts == [("a", 1), ("b", 2), ("a", 2), ("c", 1)]  # oldest key first; others keep their places


def test_tensors_of_a_device_resident_runner_share_passes_as_arrays_do():
    """A device-resident runner's callers submit tensors (SAM's input pre-processed on its device): stacked with
    torch, each caller gets its own rows back."""
    import torch

    seen: list[int] = []

    async def run(x: torch.Tensor, context: object) -> tuple[torch.Tensor, ...]:
        seen.append(len(x))
        await asyncio.sleep(0.01)
        return (x * 2,)

    batcher = MicroBatcher("toy", run, BatchPolicy(4, 0.0, 64))
    inputs = [torch.full((1, 2, 3), float(i)) for i in range(5)]

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    for x, (doubled,) in zip(inputs, asyncio.run(main()), strict=True):
        assert isinstance(doubled, torch.Tensor) and torch.equal(doubled, x * 2)
    assert sum(seen) == 5 and max(seen) > 1


def test_callers_of_a_shared_pass_hold_only_their_own_rows():
    """Each caller got a view of the whole pass's output: a cached part kept the whole batch alive, so an embedding
    cache held up to max_batch times the bytes it counted."""
    batcher, seen = make(max_batch=4)
    inputs = [np.full((1, 2, 3), float(i), np.float32) for i in range(5)]

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in inputs))

    outputs = asyncio.run(main())
    assert max(seen) > 1  # some pass was shared
    for doubled, sums in outputs:
        for rows in (doubled, sums):
            owner = rows if rows.base is None else rows.base
            assert owner.shape[0] == rows.shape[0]


def test_callers_that_gave_up_leave_the_queue_to_new_ones():
    """Cancelled callers stayed in the queue until the running pass ended: new callers were refused as over
    max_queue while nobody was waiting."""
    batcher, _ = make(max_batch=1, max_queue=2)

    async def main():
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 1), np.float32)))
        await asyncio.sleep(0.001)  # its pass has started
        waiting = [asyncio.ensure_future(batcher.submit(np.ones((1, 1, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0)
        for w in waiting:
            w.cancel()
        await asyncio.sleep(0)
        late = await batcher.submit(np.full((1, 1, 1), 3.0, np.float32))  # room again: answered
        await running
        return late

    doubled, _ = asyncio.run(main())
    assert float(doubled[0, 0, 0]) == 6.0
