"""The training steps, each written once for one process and for many.

:func:`meta_step` is MAML's outer update: ``meta_train`` (the single-process loop of ``metalstm experiment``,
where several small runs are cheaper in-process than through Ray Train) and every Ray Train worker of
``metalstm train`` (``pipeline/training/worker.py``) call it, the workers passing an all-reduce.
:func:`pretrain_step` is one step of conventional pre-training (``metalstm.baselines.pretrain``, and the stage
``metalstm train`` can run before meta-training), data-parallel the same way. :func:`fit` is the loop with
model selection on validation that both single-process trainings share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from metalstm.data import Split, TaskBatch
from metalstm.maml import MetaLearner, NonFiniteLossError
from metalstm.models import batched


def fit(module: nn.Module, step: Callable[[int], dict], steps: int, *, validate: Callable[[], float] | None = None,
        val_every: int = 0, log: Callable[[dict], None] | None = None, log_every: int = 50,
        validate_start: bool = False) -> dict[str, Any]:
    """Call ``step(i)`` (one optimiser step, returning its log row) for ``i = 1 … steps``.

    With ``validate`` (lower is better) every ``val_every`` steps and after the last, ``module`` ends at its
    best validated state: meta-training and conventional pre-training get the same model selection.
    ``validate_start`` also validates the starting state (step 0): a warm-started run then never ends worse on
    val than where it started. Returns the history, the best validation value and the compute (wall, CPU s).
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    history, best, best_state = [], float("inf"), None
    t0, c0 = time.perf_counter(), time.process_time()
    if validate is not None and validate_start:
        best = validate()
        best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        history.append({"step": 0, "val": best})
    for i in range(1, steps + 1):
        row = {"step": i, **step(i)}
        if validate is not None and val_every > 0 and (i % val_every == 0 or i == steps):
            row["val"] = validate()
            if row["val"] < best:
                best, best_state = row["val"], {k: v.detach().clone() for k, v in module.state_dict().items()}
        history.append(row)
        if log is not None and (i % log_every == 0 or i == steps):
            log(row)
    if best_state is not None:
        module.load_state_dict(best_state)
    return {"history": history, "best_val": best, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "steps": steps}


def meta_step(learner: MetaLearner, batch: TaskBatch | None, optimizer: torch.optim.Optimizer, *, step: int,
              grad_clip: float = 10.0, all_reduce: Callable[[list[Tensor]], None] | None = None) -> dict[str, float]:
    """One meta-step of everything ``learner`` trains (θ and any learned inner rates) on ``batch``.

    On one process (``all_reduce=None``) this follows the gradient of the batch's mean query loss. Data-parallel,
    every process passes its own slice of the global meta-batch (``None`` when it has no task this step: it then
    contributes zero gradients) and ``all_reduce``, which sums a list of tensors in place across the processes.
    Each process backpropagates its *summed* query loss; the statistics and then the gradients are all-reduced,
    and one division by the global task count gives every process the gradient of the global mean, the same as
    one process on the whole batch, so identical optimisers keep θ identical everywhere.

    A non-finite loss or meta-gradient never reaches the optimiser. A process whose loss is NaN or inf (or whose
    inner loop blew up) contributes no gradient but a flag; the check runs on the all-reduced flags and gradients,
    which are the same on every process, so all of them skip the step together (``skipped`` 1; θ and the
    optimiser's state untouched). ``nonfinite_workers`` counts the processes with a non-finite loss and
    ``nonfinite_at_theta`` those whose support loss was already non-finite before adaptation (θ itself diverged,
    or bad data, rather than the inner rate): what the caller needs to name the setting to lower.

    ``step`` numbers this step from 1 (the clock of the MAML++ multi-step weights' anneal). Returns global sums,
    ``query_loss`` (after adaptation; NaN when skipped) and ``support_loss`` (before it; 0 without inner steps)
    over ``tasks`` tasks, and the seconds of the two all-reduces: ``wait_s`` (the statistics, alone: so tiny that
    its time is the wait for the slowest process) and ``allreduce_s`` (the gradients).
    """
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=False)
    for p in params:  # every process must contribute a gradient for every tensor, even with no task this step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # query-loss sum, support-loss sum, tasks, processes with a non-finite loss, of which non-finite at θ
    stats = torch.zeros(5, dtype=torch.float64, device=params[0].device)
    if batch is not None and batch.num_tasks > 0:
        _backward_meta_loss(learner, batch, step, stats)
    wait = reduce = 0.0
    if all_reduce is not None:
        t0 = time.perf_counter()
        all_reduce([stats])
        t1 = time.perf_counter()
        all_reduce([p.grad for p in params])
        wait, reduce = t1 - t0, time.perf_counter() - t1
    query, support, tasks, nonfinite, at_theta = stats.tolist()  # one device-to-host copy, not five
    for p in params:
        p.grad.div_(max(tasks, 1.0))
    out = {"query_loss": query, "support_loss": support, "tasks": tasks, "wait_s": wait, "allreduce_s": reduce,
           "skipped": 0.0, "nonfinite_workers": nonfinite, "nonfinite_at_theta": at_theta}
    if nonfinite > 0 or not (math.isfinite(query) and math.isfinite(support)) or not all_finite(
            [p.grad for p in params]):
        optimizer.zero_grad(set_to_none=False)
        return {**out, "skipped": 1.0}
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return out


def _backward_meta_loss(learner: MetaLearner, batch: TaskBatch, step: int, stats: Tensor) -> None:
    """Backpropagate this process's summed query loss and write its statistics into ``stats``; a non-finite loss
    is flagged there instead (``stats[3]``, and ``stats[4]`` when θ's own support loss was) and adds no gradient."""
    stats[2] = batch.num_tasks
    try:
        result = learner.meta_loss(batch, progress=(step - 1) / max(1, learner.cfg.multi_step_anneal))
    except NonFiniteLossError as e:  # the inner loop blew up, or θ's support loss was not finite
        stats[0], stats[3], stats[4] = float("nan"), 1.0, float(e.inner_step == 0)
        return
    stats[0] = result.query_final.sum()
    stats[1] = result.support_curve[0].sum() if result.support_curve else 0.0
    if not bool(torch.isfinite(result.query).all()):
        stats[3] = 1.0
        stats[4] = float(learner.cfg.inner_steps == 0)  # no inner loop: the query loss is θ's own
        return
    result.query.sum().backward()


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device sync, not one per tensor)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def meta_train(learner: MetaLearner, batches: Iterator[TaskBatch], steps: int, optimizer: torch.optim.Optimizer, *,
               grad_clip: float = 10.0, **selection: Any) -> dict[str, Any]:
    """Meta-train ``learner`` for ``steps`` meta-steps (:func:`meta_step`) on ``batches``, on this process.

    ``selection``: ``validate``, ``val_every``, ``log``, ``log_every``, ``validate_start`` as for ``fit``. Each
    history row holds the batch's mean ``query_loss`` and ``support_loss`` (NaN without inner steps). Raises
    :class:`~metalstm.maml.NonFiniteLossError` at a step whose loss or meta-gradient is not finite, before any update.
    """
    tasks_seen = 0

    def step(i: int) -> dict:
        nonlocal tasks_seen
        out = meta_step(learner, next(batches), optimizer, step=i, grad_clip=grad_clip)
        if out["skipped"]:  # one process: nothing to wait for, stop with the step named
            raise NonFiniteLossError(f"meta-step {i}: the query loss ({out['query_loss']:.4g}) or the meta-gradient "
                                     "is not finite; lower optim.lr or maml.inner_lr, or check the tasks for "
                                     "NaN/inf", inner_step=0 if out["nonfinite_at_theta"] else None)
        tasks_seen += int(out["tasks"])
        support = out["support_loss"] / out["tasks"] if learner.cfg.inner_steps > 0 else float("nan")
        return {"query_loss": out["query_loss"] / out["tasks"], "support_loss": support}

    out = fit(learner, step, steps, **selection)
    return {**out, "tasks_seen": tasks_seen}


def pretrain_loss(model: nn.Module, split: Split) -> Tensor:
    """The conventional training loss of θ on ``split``: the sequences as ONE task (``metalstm.baselines.as_split``),
    so the masked mean over every target of every sequence. Exactly what ``metalstm.baselines.pretrain`` minimises.
    """
    return model.task_loss(batched(model, 1), split).sum()


def pretrain_step(model: nn.Module, split: Split | None, optimizer: torch.optim.Optimizer, *, grad_clip: float = 10.0,
                  all_reduce: Callable[[list[Tensor]], None] | None = None, step: int | None = None,
                  rate_key: str = "pretrain.lr", skip_nonfinite: bool = False) -> dict[str, float]:
    """One optimiser step of conventional pre-training of θ (all of ``model``'s parameters) on ``split``.

    On one process (``all_reduce=None``) this is ``metalstm.baselines.pretrain``'s step. Data-parallel, every
    process passes its own part of the global minibatch (``None`` when it has none this step) and ``all_reduce``,
    which sums a list of tensors in place across the processes: each process's loss is weighted by its number of
    targets, so after the sum and one division every process holds the gradient of the *global* masked mean,
    the same as one process on the whole minibatch, and identical optimisers keep θ identical everywhere.

    A non-finite loss or gradient never reaches the optimiser. By default this process raises
    :class:`~metalstm.maml.NonFiniteLossError`, naming the config key of the rate to lower (``rate_key``).
    With ``skip_nonfinite`` (data-parallel: a raise on one process would leave the others waiting in the
    all-reduce) the process flags it instead, every process sees the flag after the all-reduce, and all skip the
    step together (``skipped`` 1, no update). Returns the global ``loss`` (NaN, and no update, when no process
    had a target) and the global target count ``targets``.
    """
    where = f"pretrain step {step}" if step is not None else "pretrain step"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=False)
    for p in params:  # every process must contribute a gradient for every tensor, even with no data this step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    stats = torch.zeros(3, dtype=params[0].dtype, device=params[0].device)  # loss x targets, targets, non-finite
    if split is not None and split.x.shape[1] > 0:
        loss = pretrain_loss(model, split)
        targets = split.y_mask.sum().to(stats.dtype)
        if bool(torch.isfinite(loss)):
            (loss * targets).backward()
            stats[0], stats[1] = loss.detach() * targets, targets
        elif skip_nonfinite:
            stats[0], stats[1], stats[2] = float("nan"), targets, 1.0
        else:
            raise NonFiniteLossError(f"{where}: loss is not finite; lower {rate_key}", inner_step=0)
    if all_reduce is not None:
        all_reduce([stats, *(p.grad for p in params)])
    total = float(stats[1])
    if total <= 0:
        return {"loss": float("nan"), "targets": 0.0, "skipped": 0.0}
    for p in params:
        p.grad.div_(total)
    if stats[2] > 0 or not all_finite([stats[:1], *(p.grad for p in params)]):
        optimizer.zero_grad(set_to_none=False)
        if not skip_nonfinite:
            raise NonFiniteLossError(f"{where}: the gradient is not finite; lower {rate_key}", inner_step=0)
        return {"loss": float(stats[0]) / total, "targets": total, "skipped": 1.0}
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {"loss": float(stats[0]) / total, "targets": total, "skipped": 0.0}
