"""One batch on the model at a time, each taking every request that queued while the previous one ran.

``serve.batch`` closes a batch once its first request has waited ``batch_wait_timeout_s``, even while the
previous batch is still computing; with ``max_concurrent_batches=1`` the closed batches then queue and run
one after another. Under load the requests that come back together are cut into many small batches:
measured on the adaptation service at concurrency 32, 2.6 requests per batch. The replica therefore lets
``serve.batch`` hand its (micro-)batches over at once and merges here whatever waits for the model, so a
batch grows with the load instead of with the wait window, and ``serve.batch`` needs no wait at all (a lone
request starts at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class Coalescer:
    """Runs ``work(items) -> results`` (one result per item, in order) in a worker thread, one call at a time.

    Items submitted while a call runs are merged into the next call, up to ``max_cost`` (``cost(items)``
    summed; a single submission larger than that still runs, alone). A submitter that is cancelled (its
    client went away) is skipped; an exception raised by ``work`` goes to every submitter of that call.
    """

    def __init__(self, work: Callable[[list[Any]], Sequence[Any]], cost: Callable[[list[Any]], int],
                 max_cost: int) -> None:
        self.work, self.cost, self.max_cost = work, cost, max_cost
        self._pending: deque[tuple[list[Any], asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None

    async def submit(self, items: list[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(items), future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[Any], asyncio.Future]]:
        taken, total = [], 0
        while self._pending:
            items, future = self._pending[0]
            if future.done():  # cancelled while waiting
                self._pending.popleft()
                continue
            size = self.cost(items)
            if taken and total + size > self.max_cost:
                break
            taken.append(self._pending.popleft())
            total += size
        return taken

    async def _drain(self) -> None:
        while taken := self._take():
            flat = [item for items, _ in taken for item in items]
            try:
                results = await asyncio.to_thread(self.work, flat)
                if len(results) != len(flat):
                    raise RuntimeError(f"batch work returned {len(results)} results for {len(flat)} items")
            except asyncio.CancelledError:  # the replica is shutting down: nobody may wait forever
                for _, future in [*taken, *self._pending]:
                    future.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to the submitters, whose requests fail alone
                log.exception("batch of %d items failed", len(flat))
                for _, future in taken:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for items, future in taken:
                if not future.done():
                    future.set_result(list(results[start:start + len(items)]))
                start += len(items)
