"""Prediction and evaluation of a meta-learner on plain task dicts: the maths the registry, training and
serving share (a task is ``{"support_x", "support_y", "query_x"[, "query_y"]}`` of per-example lists)."""

from __future__ import annotations

import torch

from metalstm.data import collate
from metalstm.decoding import predict
from metalstm.maml import MetaLearner


def _dtype(learner: MetaLearner) -> torch.dtype:
    return next(learner.parameters()).dtype


def _device(learner: MetaLearner) -> torch.device:
    return next(learner.parameters()).device


def predict_tasks(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None, output: str = "argmax",
                  max_len: int = 0) -> list[list]:
    """Adapt on each task's support set, then predict its query inputs; one nested list per task.

    mlp / forecaster: values ``[N][O or H]``; char_lm: next-token ids ``[N][L]`` (``output="argmax"``) or
    log-probabilities ``[N][L][V]`` (``"logprobs"``); seq2seq: greedy decodings ``[N][<=max_len]`` without EOS.
    """
    if output not in ("argmax", "logprobs"):
        raise ValueError(f"output: expected argmax or logprobs, got {output!r}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    model = learner.model
    filled = [{**t, "query_y": model.placeholder_targets(t["query_x"])} for t in tasks]
    batch = collate(filled).to(_device(learner), _dtype(learner))
    fast, _ = learner.adapt(batch.support, steps)
    x, x_mask = batch.query.x, batch.query.x_mask
    pred = predict(model, fast, x, x_mask, max_len=max_len)
    return [model.prediction_rows(pred[t, :len(task["query_x"])], x_mask[t, :len(task["query_x"])], output)
            for t, task in enumerate(tasks)]


def evaluate_learner(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None, batch_size: int = 16,
                     seed: int = 0) -> dict[str, float]:
    """Mean per-task query metrics before (``pre_*``) and after (``post_*``) adaptation, in the given order."""
    if not tasks:
        raise ValueError("tasks: need at least one task to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    torch.manual_seed(seed)
    dtype = _dtype(learner)
    sums: dict[str, float] = {}
    for i in range(0, len(tasks), batch_size):
        batch = collate(tasks[i:i + batch_size]).to(_device(learner), dtype)
        out = learner.evaluate(batch, steps)
        curve = out.pop("support_curve")
        out["post_support_loss"] = curve[:, -1]
        for key, values in out.items():
            sums[key] = sums.get(key, 0.0) + float(values.double().sum())
    metrics = {k: v / len(tasks) for k, v in sums.items()}
    metrics["num_tasks"] = float(len(tasks))
    metrics["steps"] = float(learner.cfg.adapt_steps if steps is None else steps)
    return metrics


def adaptation_curve(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None,
                     batch_size: int = 16) -> list[float]:
    """Mean query loss after 0, 1, ..., ``steps`` inner steps (the adaptation-curve plot's data)."""
    steps = learner.cfg.adapt_steps if steps is None else steps
    dtype = _dtype(learner)
    totals = [0.0] * (steps + 1)
    for i in range(0, len(tasks), batch_size):
        batch = collate(tasks[i:i + batch_size]).to(_device(learner), dtype)
        for k in range(steps + 1):
            fast, _ = learner.adapt(batch.support, k)
            with torch.no_grad():
                totals[k] += float(learner.model.task_loss(fast, batch.query).double().sum())
    return [t / max(len(tasks), 1) for t in totals]
