"""A single-process meta-training loop: what one Ray Train worker does per step, without the distribution.

Used by ``metalstm experiment`` on one machine, where several small runs (seeds, MAML variants) are cheaper
in-process than through Ray Train; ``pipeline/train.py`` is the distributed version of the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from metalstm.data import TaskBatch
from metalstm.maml import MetaLearner


def fit(module: nn.Module, step: Callable[[int], dict], steps: int, *, validate: Callable[[], float] | None = None,
        val_every: int = 0, log: Callable[[dict], None] | None = None, log_every: int = 50) -> dict[str, Any]:
    """Call ``step(i)`` (one optimiser step, returning its log row) for ``i = 1 … steps``.

    With ``validate`` (lower is better) every ``val_every`` steps and after the last, ``module`` ends at its
    best validated state: meta-training and conventional pre-training get the same model selection.
    Returns the history, the best validation value and the compute (wall and CPU seconds).
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    history, best, best_state = [], float("inf"), None
    t0, c0 = time.perf_counter(), time.process_time()
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
