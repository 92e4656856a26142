"""How the Ray Train workers cooperate: who takes how many of a global batch, and the collectives they call.

There is no DDP: its hooks never see a functional inner loop's gradients. The steps in ``metalstm.training``
take an all-reduce instead, and ``all_reduce_for`` gives them this one: the tensors flattened into one buffer
and summed bucket by bucket (``scaling.bucket_mb``), which keeps the collective count per step fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def split_sizes(total: int, parts: int) -> list[int]:
    """Uneven split of ``total`` tasks over ``parts`` workers: the first ``total % parts`` get one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def allreduce_sum(tensors: list[Tensor], bucket_bytes: int) -> None:
    """Sum ``tensors`` in place across workers: flattened into one buffer, reduced bucket by bucket."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    per_bucket = max(1, bucket_bytes // flat.element_size())
    for bucket in flat.split(per_bucket):
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_for(world: int, bucket_mb: float) -> Callable[[list[Tensor]], None] | None:
    """The ``all_reduce`` a training step takes: ``None`` on one worker (nothing to sum)."""
    if world <= 1:
        return None
    bucket_bytes = int(bucket_mb * 2**20)
    return lambda tensors: allreduce_sum(tensors, bucket_bytes)


def broadcast_parameters(module: nn.Module, world: int) -> None:
    """Rank 0's parameters on every worker: identical θ everywhere, whatever each process's RNG did."""
    if world > 1:
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


def gather_lists(local: list[Any], world: int) -> list[Any]:
    """Every worker's ``local`` items, concatenated in rank order (on every worker)."""
    if world <= 1:
        return list(local)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def broadcast_object(obj: Any, world: int, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every worker (a verdict only one worker reached, such as rank 0's validation)."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_parameters(module: nn.Module, world: int) -> None:
    """Raise if θ differs across the workers: every step (or skipped step) must have been the same everywhere, and
    a drift would otherwise go unseen until the results are wrong."""
    if world <= 1:  # one worker cannot differ from itself
        return
    with torch.no_grad():
        local = [float(sum(p.detach().double().sum() for p in module.parameters()))]
    sums = gather_lists(local, world)
    if len({repr(s) for s in sums}) > 1:
        raise RuntimeError(f"θ differs across the {world} workers (parameter sums {sums}): the workers no longer "
                           "take the same steps; this is a bug, please report it")
