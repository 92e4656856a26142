"""The replica's batch coalescer: one call at a time, merging whatever queued meanwhile (real threads)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.serving.coalesce import Coalescer


class Work:
    """Doubles its items; the first call blocks until released, so that submissions queue behind it."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [2 * i for i in items]


async def _started(work: Work) -> None:
    assert await asyncio.to_thread(work.started.wait, 10)


def test_submissions_during_a_call_merge_into_the_next_and_results_go_back_to_their_submitters():
    async def main() -> None:
        work = Work()
        runner = Coalescer(work, len, max_cost=100)
        first = asyncio.create_task(runner.submit([1]))
        await _started(work)
        later = [asyncio.create_task(runner.submit(items)) for items in ([2, 3], [4], [5, 6, 7])]
        await asyncio.sleep(0.01)
        work.release.set()
        assert await first == [2]
        assert [await t for t in later] == [[4, 6], [8], [10, 12, 14]]
        assert work.calls == [[1], [2, 3, 4, 5, 6, 7]]  # one call for all that waited, not three

    asyncio.run(main())


def test_a_call_stops_at_max_cost_but_an_oversized_submission_still_runs_alone():
    async def main() -> None:
        work = Work()
        runner = Coalescer(work, len, max_cost=3)
        first = asyncio.create_task(runner.submit([0]))
        await _started(work)
        later = [asyncio.create_task(runner.submit(items)) for items in ([1, 2], [3], [4, 5, 6, 7], [8])]
        await asyncio.sleep(0.01)
        work.release.set()
        await asyncio.gather(first, *later)
        assert work.calls == [[0], [1, 2, 3], [4, 5, 6, 7], [8]]

    asyncio.run(main())


def test_a_failing_call_fails_only_its_submitters_and_the_next_call_runs():
    async def main() -> None:
        work = Work()
        runner = Coalescer(work, len, max_cost=2)
        first = asyncio.create_task(runner.submit([1]))
        await _started(work)
        bad = asyncio.create_task(runner.submit([-1, 2]))
        good = asyncio.create_task(runner.submit([3]))
        await asyncio.sleep(0.01)
        work.release.set()
        assert await first == [2]
        with pytest.raises(ValueError, match="negative"):
            await bad
        assert await good == [6]

    asyncio.run(main())


def test_a_cancelled_submitter_is_skipped():
    async def main() -> None:
        work = Work()
        runner = Coalescer(work, len, max_cost=100)
        first = asyncio.create_task(runner.submit([1]))
        await _started(work)
        gone = asyncio.create_task(runner.submit([2]))
        kept = asyncio.create_task(runner.submit([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        work.release.set()
        assert await first == [2] and await kept == [6]
        assert gone.cancelled()
        assert work.calls == [[1], [3]]

    asyncio.run(main())


def test_stopping_the_runner_cancels_every_waiting_submitter():
    async def main() -> None:
        work = Work()
        runner = Coalescer(work, len, max_cost=1)
        running = asyncio.create_task(runner.submit([1]))
        await _started(work)
        queued = asyncio.create_task(runner.submit([2]))
        await asyncio.sleep(0.01)
        runner._runner.cancel()  # what the event loop's shutdown does to it
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        work.release.set()  # let the worker thread finish

    asyncio.run(main())
