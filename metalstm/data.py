"""The task-batch layout every model and the MAML loop consume, and the one collate that builds it.

A task is a support set and a query set, each a list of sequences (ragged lengths allowed). A batch of
``T`` tasks becomes dense tensors with a leading task dimension plus masks (1 = real entry):

- ``x``: ``[T, N, L]`` tokens or ``[T, N, L, F]`` real-valued steps; ``x_mask``: ``[T, N, L]``.
- ``y``: same layout as the targets; ``y_mask``: the shape of ``y``. Padded sequences are all-zero rows
  of ``y_mask``, so tasks with fewer examples than their neighbours are handled too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


@dataclass
class Split:
    """One side (support or query) of a batch of tasks."""

    x: Tensor
    y: Tensor
    x_mask: Tensor
    y_mask: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Split:
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return Split(*(move(getattr(self, f.name)) for f in fields(self)))

    def select(self, index: slice | Tensor) -> Split:
        return Split(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class TaskBatch:
    support: Split
    query: Split

    @property
    def num_tasks(self) -> int:
        return self.support.num_tasks

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        return TaskBatch(self.support.to(device, dtype), self.query.to(device, dtype))

    def select(self, index: slice | Tensor) -> TaskBatch:
        return TaskBatch(self.support.select(index), self.query.select(index))


def _as_arrays(seqs: Any) -> list[np.ndarray]:
    out = []
    for s in seqs:
        a = np.asarray(s)
        if a.dtype == object:  # nested lists from Arrow come back as arrays of arrays
            a = np.stack([np.asarray(v) for v in a]) if len(a) else np.zeros((0,), np.float32)
        out.append(a)
    return out


def _pad(per_task: list[list[np.ndarray]], name: str) -> tuple[Tensor, Tensor]:
    """Pad ``T`` lists of ``N_t`` arrays of shape ``[L_i, *F]`` into ``[T, N, L, *F]`` and a mask."""
    first = next((a for seqs in per_task for a in seqs), None)
    if first is None:
        raise ValueError(f"{name}: every task has an empty set of sequences")
    tail = first.shape[1:]
    integer = np.issubdtype(first.dtype, np.integer)
    n_max = max(len(seqs) for seqs in per_task)
    l_max = max(a.shape[0] for seqs in per_task for a in seqs)
    data = np.zeros((len(per_task), n_max, l_max, *tail), np.int64 if integer else np.float32)
    mask = np.zeros((len(per_task), n_max, l_max), np.float32)
    for t, seqs in enumerate(per_task):
        for n, a in enumerate(seqs):
            if a.shape[1:] != tail:
                raise ValueError(f"{name}: task {t} sequence {n} has feature shape {a.shape[1:]}, expected {tail}")
            data[t, n, : a.shape[0]] = a
            mask[t, n, : a.shape[0]] = 1.0
    return torch.from_numpy(data), torch.from_numpy(mask)


def collate(tasks: Sequence[Mapping[str, Any]]) -> TaskBatch:
    """Turn task records (``support_x``, ``support_y``, ``query_x``, ``query_y``) into a ``TaskBatch``.

    Each field holds a task's list of sequences: token ids (``[L]`` ints), real-valued steps (``[L, F]``)
    or fixed-size targets (``[H]``). This is the only collate: the trainer, evaluation and serving all use it.
    """
    if len(tasks) == 0:
        raise ValueError("tasks: need at least one task to collate")
    splits = []
    for side in ("support", "query"):
        parts = []
        for field in ("x", "y"):
            key = f"{side}_{field}"
            per_task = []
            for i, task in enumerate(tasks):
                if key not in task:
                    raise ValueError(f"{key}: missing from task {i}")
                seqs = _as_arrays(task[key])
                if len(seqs) == 0:
                    raise ValueError(f"{key}: task {i} has no sequences (need at least 1)")
                per_task.append(seqs)
            parts.append(_pad(per_task, key))
        (x, x_mask), (y, y_mask) = parts
        if y_mask.dim() < y.dim():  # [T, N, L, F] targets: mask every feature of a real step
            y_mask = y_mask.unsqueeze(-1).expand_as(y).contiguous()
        splits.append(Split(x=x, y=y, x_mask=x_mask, y_mask=y_mask))
    return TaskBatch(support=splits[0], query=splits[1])


def sentence_pieces(ids: list[int], max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` pieces of one sentence: ``x = [BOS] + ids``, ``y = ids + [EOS]``, cut every ``max_len`` steps.

    The PTB store builder and serving cut text alike through this one function.
    """
    x = np.asarray([BOS, *ids], np.int32)
    y = np.asarray([*ids, EOS], np.int32)
    return [(x[i : i + max_len], y[i : i + max_len]) for i in range(0, len(x), max_len)]
