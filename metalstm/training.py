"""A single-process meta-training loop: what one Ray Train worker does per step, without the distribution.

Used by ``metalstm experiment`` on one machine, where several small runs (seeds, MAML variants) are cheaper
in-process than through Ray Train; ``pipeline/train.py`` is the distributed version of the same step.
:func:`pretrain_step` is one step of conventional pre-training (the stage ``metalstm train`` can run before
meta-training), data-parallel when given an all-reduce.
"""

from __future__ import annotations

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


def meta_train(learner: MetaLearner, batches: Iterator[TaskBatch], steps: int, optimizer: torch.optim.Optimizer, *,
               grad_clip: float = 10.0, **selection: Any) -> dict[str, Any]:
    """Meta-train ``learner`` for ``steps`` meta-steps on ``batches`` (mean query loss over each batch's tasks).

    ``selection``: ``validate``, ``val_every``, ``log``, ``log_every`` as for ``fit``.
    """
    params = [p for p in learner.parameters() if p.requires_grad]
    anneal = max(1, learner.cfg.multi_step_anneal)
    tasks_seen = 0

    def step(i: int) -> dict:
        nonlocal tasks_seen
        batch = next(batches)
        optimizer.zero_grad(set_to_none=False)
        result = learner.meta_loss(batch, progress=(i - 1) / anneal)
        (result.query.sum() / batch.num_tasks).backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        tasks_seen += batch.num_tasks
        return {"query_loss": float(result.query_final.mean()),
                "support_loss": float(result.support_curve[0].mean()) if result.support_curve else float("nan")}

    out = fit(learner, step, steps, **selection)
    return {**out, "tasks_seen": tasks_seen}


def pretrain_loss(model: nn.Module, split: Split) -> Tensor:
    """The conventional training loss of θ on ``split``: the sequences as ONE task (``metalstm.baselines.as_split``),
    so the masked mean over every target of every sequence. Exactly what ``metalstm.baselines.pretrain`` minimises.
    """
    return model.task_loss(batched(model, 1), split).sum()


def pretrain_step(model: nn.Module, split: Split | None, optimizer: torch.optim.Optimizer, *, grad_clip: float = 10.0,
                  all_reduce: Callable[[list[Tensor]], None] | None = None, step: int | None = None,
                  rate_key: str = "pretrain.lr") -> dict[str, float]:
    """One optimiser step of conventional pre-training of θ (all of ``model``'s parameters) on ``split``.

    On one process (``all_reduce=None``) this is ``metalstm.baselines.pretrain``'s step. Data-parallel, every
    process passes its own part of the global minibatch (``None`` when it has none this step) and ``all_reduce``,
    which sums a list of tensors in place across the processes: each process's loss is weighted by its number of
    targets, so after the sum and one division every process holds the gradient of the *global* masked mean,
    the same as one process on the whole minibatch, and identical optimisers keep θ identical everywhere.

    Raises :class:`~metalstm.maml.NonFiniteLossError` when this process's loss is NaN or inf, naming the config
    key of the rate to lower (``rate_key``). Returns the global
    ``loss`` (NaN, and no update, when no process had a target) and the global target count ``targets``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=False)
    for p in params:  # every process must contribute a gradient for every tensor, even with no data this step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    stats = torch.zeros(2, dtype=params[0].dtype, device=params[0].device)  # loss x targets, targets
    if split is not None and split.x.shape[1] > 0:
        loss = pretrain_loss(model, split)
        if not torch.isfinite(loss):
            where = f"pretrain step {step}" if step is not None else "pretrain step"
            raise NonFiniteLossError(f"{where}: loss is not finite; lower {rate_key}")
        targets = split.y_mask.sum().to(stats.dtype)
        (loss * targets).backward()
        stats[0], stats[1] = loss.detach() * targets, targets
    if all_reduce is not None:
        all_reduce([stats, *(p.grad for p in params)])
    total = float(stats[1])
    if total <= 0:
        return {"loss": float("nan"), "targets": 0.0}
    for p in params:
        p.grad.div_(total)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {"loss": float(stats[0]) / total, "targets": total}
