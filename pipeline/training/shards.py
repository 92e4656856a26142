"""What a worker trains and validates on: its Ray Data shard of the task store, as task batches or sequences.

Every draw is seeded by (seed, rank, epoch or step) alone, so a resumed run draws exactly what the interrupted
one would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from metalstm.baselines import pooled_sequences
from pipeline.tasks.store import shard_table, task_batches


def read_shard(shard: Any) -> Any:
    """This worker's training tasks as one Arrow table, read once for both stages: re-executing the Ray Data
    pipeline every epoch costs seconds on small stores."""
    table = shard_table(shard)
    if table is None:
        raise RuntimeError("this worker's training shard is empty: more workers than training tasks?")
    return table


def task_stream(table: Any, batch_size: int, seed: int, start: int = 0) -> Iterator[list[dict]]:
    """This worker's tasks (``read_shard``), ``batch_size`` at a time, epoch after epoch (a fresh seeded shuffle
    each), from its ``start``-th batch: a run resumed at meta-step ``start`` (one batch a step) draws exactly the
    batches an uninterrupted run draws next, mid-epoch included."""
    per_epoch = -(-table.num_rows // batch_size)  # task_batches' count, the last batch of an epoch maybe short
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from islice(task_batches(table, batch_size, seed=seed, epoch=epoch), skip, None)
        epoch, skip = epoch + 1, 0


def first_tasks(shard: Any, n: int) -> list[dict]:
    """The validation tasks: the first ``n`` of ``shard``, in task-id order (the same ones every validation)."""
    out: list[dict] = []
    for tasks in task_batches(shard, n, seed=0, epoch=0):
        out.extend(tasks)
        if len(out) >= n:
            break
    return sorted(out[:n], key=lambda t: str(t.get("task_id", "")))


def sequence_pool(table: Any) -> list[tuple[Any, Any]]:
    """Every (x, y) sequence of this worker's training tasks, support and query: its pre-training data."""
    return [pair for tasks in task_batches(table, 1024, seed=0, epoch=0) for pair in pooled_sequences(tasks)]


def pretrain_batch(pool: list[tuple[Any, Any]], size: int, seed: int, rank: int, step: int) -> list[tuple[Any, Any]]:
    """This worker's ``size`` sequences for pre-training step ``step``, drawn without replacement from its pool."""
    if size < 1 or not pool:
        return []
    idx = np.random.default_rng([seed, rank, step]).choice(len(pool), size=min(size, len(pool)), replace=False)
    return [pool[j] for j in idx]
