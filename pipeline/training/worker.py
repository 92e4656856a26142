"""One Ray Train worker of ``metalstm train``: ``train_func`` is the single-process loop plus a few Ray calls.

Each meta-step the global meta-batch of B tasks is split across the N workers; every worker adapts its own slice
(the core's task-batched inner loop, on its own GPU when there is one) and ``metalstm.training.meta_step``, given
the flat bucketed all-reduce (``collective``), sums the meta-gradients, divides by the global task count and
takes the same optimiser step everywhere, so θ stays identical on every worker. With ``pretrain.steps > 0`` the
pre-training stage (``pretrain``) runs first. Every ``schedule.val_every`` steps rank 0 validates and every
worker reports, rank 0 with a checkpoint (``state``) that a restarted run resumes from. A step whose loss or
gradient is not finite is skipped by every worker together, or stops the run cleanly (``divergence``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from metalstm import MetaLearner, TaskBatch, build_model, collate, kernels
from metalstm.baselines import as_split, pooled_sequences
from metalstm.evaluation import adaptation_curve, evaluate_learner
from metalstm.maml import NonFiniteLossError
from metalstm.runtime import retain_freed_memory
from metalstm.training import meta_step
from pipeline.config import TrainConfig, from_dict
from pipeline.training.collective import (
    all_reduce_for,
    broadcast_object,
    broadcast_parameters,
    check_same_parameters,
    gather_lists,
    split_sizes,
)
from pipeline.training.divergence import StepGuard, explosion_warning, meta_hint, validation_hint
from pipeline.training.pretrain import pretrain_stage
from pipeline.training.reporting import SCORE, UNSCORED, finish_tracking, report, score, setup_logging, start_tracker
from pipeline.training.shards import first_tasks, read_shard, sequence_pool, task_stream
from pipeline.training.state import KeptModels, RunState, restore, saver

log = logging.getLogger("metalstm.train")
FAULT_ENV = "METALSTM_FAULT_NAN"  # test-only fault injection, see ``poison``


@dataclass
class Worker:
    """What this worker knows for the whole run."""

    cfg: TrainConfig
    config: dict[str, Any]  # Ray's train_loop_config: the config as a dict, the store, the MLflow run
    rank: int
    world: int
    tracker: Any = None  # rank 0's MLflow run, when tracking is on
    val_tasks: list[dict] = field(default_factory=list)  # rank 0's validation tasks


@dataclass
class MetaWindow:
    """Global sums over the meta-steps since the last log line; ``row`` averages them into one history row.
    A skipped step (divergence) counts its tasks and time, not its loss."""

    tasks: float = 0.0
    seconds: float = 0.0
    allreduce: float = 0.0
    wait: float = 0.0
    loss: float = 0.0
    support: float = 0.0
    loss_tasks: float = 0.0
    skipped: int = 0

    def add(self, out: dict[str, float], seconds: float) -> None:
        self.tasks, self.seconds = self.tasks + out["tasks"], self.seconds + seconds
        self.allreduce, self.wait = self.allreduce + out["allreduce_s"], self.wait + out["wait_s"]
        if out.get("skipped"):
            self.skipped += 1
            return
        self.loss, self.support = self.loss + out["query_loss"], self.support + out["support_loss"]
        self.loss_tasks += out["tasks"]

    def row(self, step: int) -> dict[str, float]:
        tasks, seconds = self.loss_tasks or math.nan, max(self.seconds, 1e-9)
        return {"step": step, "train_loss": self.loss / tasks, "train_support_loss": self.support / tasks,
                "tasks_per_s": self.tasks / seconds, "allreduce_share": self.allreduce / seconds,
                "straggler_wait_share": self.wait / seconds, "skipped_steps": self.skipped}


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: (pre-train, then) meta-train θ on this worker's slice of every meta-batch.

    A divergence that stops the run (``divergence``) ends it here on every worker alike, after a last checkpoint
    marked ``diverged``: a normal return, so Ray Train does not retry it as a failure."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = from_dict(config["train"])
    setup_logging()
    retain_freed_memory()
    kernels.warm_up()  # load (on a node's first run: build) the fused LSTM kernels before the first step
    ctx = ray.train.get_context()
    w = Worker(cfg, config, ctx.get_world_rank(), ctx.get_world_size())
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)

    torch.manual_seed(cfg.schedule.seed)
    learner = MetaLearner(build_model(cfg.model), cfg.maml).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    run = restore(learner, optimizer, cfg, device, w.rank)
    broadcast_parameters(learner, w.world)
    table = read_shard(ray.train.get_dataset_shard("train"))
    kept = KeptModels()
    if w.rank == 0:
        w.tracker = start_tracker(config, cfg.name)
        if w.tracker:
            kept.recover_best(run)
        if cfg.schedule.val_tasks > 0:
            w.val_tasks = first_tasks(ray.train.get_dataset_shard("val"), cfg.schedule.val_tasks)

    stopped = None
    if run.stage == "pretrain" and cfg.pretrain.steps > int(run.pretrain.get("step", 0)):
        val_split = as_split(pooled_sequences(w.val_tasks)).to(device, dtype) if w.val_tasks else None
        stopped = pretrain_stage(cfg, learner, sequence_pool(table), run, config, val_split=val_split,
                                 tracker=w.tracker)
    if stopped is None:
        run.pretrain.pop("optimizer", None)  # meta-training has its own optimiser, fresh
        stopped = meta_train_loop(w, learner, optimizer, run, kept, table)
    if w.tracker:
        finish_tracking(w.tracker, run, kept, config["tracking"].get("registered_model") or None, stopped=stopped)


def meta_train_loop(w: Worker, learner: MetaLearner, optimizer: torch.optim.Optimizer, run: RunState,
                    kept: KeptModels, table: Any) -> str | None:
    """Meta-train from ``run.step`` to ``schedule.meta_steps``; returns the message the run stopped with, if any."""
    cfg = w.cfg
    device, dtype = next(learner.parameters()).device, getattr(torch, cfg.dtype)
    if run.step == 0 and cfg.schedule.val_tasks > 0:  # before meta-training, after pre-training
        stopped = _start_curve(w, learner, run)
        if stopped:
            return _stop(w, learner, optimizer, run, stopped, [])
    local_batch = split_sizes(cfg.schedule.meta_batch_size, w.world)[w.rank]
    stream = task_stream(table, max(local_batch, 1), cfg.schedule.seed + w.rank, start=run.step)
    all_reduce = all_reduce_for(w.world, cfg.scaling.bucket_mb)
    guard = StepGuard(cfg, "meta-step", "query loss", run.divergence)
    window, task_ids = MetaWindow(), []
    while run.step < cfg.schedule.meta_steps:
        t0 = time.perf_counter()
        tasks = next(stream)[:local_batch] if local_batch > 0 else []
        task_ids = [str(t.get("task_id", "")) for t in tasks]
        batch = poison(collate(tasks).to(device, dtype), w, run.step + 1) if tasks else None
        updated = bool(optimizer.state)  # θ moved from its start (in this run or before a resume)
        out = meta_step(learner, batch, optimizer, step=run.step + 1, grad_clip=cfg.optim.grad_clip,
                        all_reduce=all_reduce)
        run.step += 1
        window.add(out, time.perf_counter() - t0)
        stopped = guard.after(out, run.step, meta_hint(cfg, out, updated), rank=w.rank, world=w.world)
        if stopped:
            return _stop(w, learner, optimizer, run, stopped, task_ids)
        last = run.step == cfg.schedule.meta_steps
        if run.step % cfg.schedule.log_every == 0 or last:
            row, window = window.row(run.step), MetaWindow()
            if w.rank == 0:
                log_row(w, run, row)
        if (cfg.schedule.val_every and run.step % cfg.schedule.val_every == 0) or last:
            stopped = validate_and_report(w, learner, optimizer, run, kept, task_ids, last=last)
            if stopped:
                return stopped
    return None


def poison(batch: TaskBatch, w: Worker, step: int) -> TaskBatch:
    """Test-only fault injection: with ``METALSTM_FAULT_NAN`` holding ``<run name>:<rank>:<meta-step>`` (a
    comma-separated list of them), that rank's query targets are NaN at that step, so its loss and gradient are.
    Float targets only (forecaster, mlp). The variable must be in the workers' environment (the Ray cluster's)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and f"{w.cfg.name}:{w.rank}:{step}" in spec.split(",") and batch.query.y.is_floating_point():
        log.warning("rank %d: %s poisons meta-step %d's query targets with NaN (test fault injection)", w.rank,
                    FAULT_ENV, step)
        batch.query.y.fill_(math.nan)
    return batch


def _start_curve(w: Worker, learner: MetaLearner, run: RunState) -> str | None:
    """Rank 0's "before" adaptation curve; a divergence there stops every worker (the verdict is broadcast)."""
    stopped = None
    if w.rank == 0 and w.val_tasks:
        try:
            run.curves["before"] = adaptation_curve(learner, w.val_tasks)
        except NonFiniteLossError as e:
            stopped = f"validation before meta-training diverged: {e}; {validation_hint(w.cfg, e)}"
            log.error("%s", stopped)
    return broadcast_object(stopped, w.world)


def _stop(w: Worker, learner: MetaLearner, optimizer: torch.optim.Optimizer, run: RunState, message: str,
          task_ids: list[str]) -> str:
    """Every worker reports the stop; rank 0 attaches a last checkpoint (θ as it stands: never updated with a
    non-finite gradient) marked ``diverged``, which is what the driver and a later resume see."""
    ids = gather_lists(task_ids, w.world)
    save = None
    if w.rank == 0:
        extra = {**run.meta_extra(optimizer, w.config, ids, math.nan), "diverged": message}
        save = saver(learner, w.cfg.model, extra)
    report({"step": run.step, "diverged": message, SCORE: UNSCORED}, f"stopped-{run.step:07d}", save)
    return message


def log_row(w: Worker, run: RunState, row: dict[str, float]) -> None:
    """Rank 0: a log window's row into the job log, the history and MLflow."""
    log.info("step %d/%d  meta-train loss %.4f  support loss %.4f  %.1f tasks/s  all-reduce %.1f%%  "
             "waiting for stragglers %.1f%%%s", row["step"], w.cfg.schedule.meta_steps, row["train_loss"],
             row["train_support_loss"], row["tasks_per_s"], 100 * row["allreduce_share"],
             100 * row["straggler_wait_share"], f"  {row['skipped_steps']} skipped" if row["skipped_steps"] else "")
    run.history.append(row)
    if w.tracker:
        w.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and math.isfinite(v)}, row["step"])


def validate_and_report(w: Worker, learner: MetaLearner, optimizer: torch.optim.Optimizer, run: RunState,
                        kept: KeptModels, task_ids: list[str], *, last: bool) -> str | None:
    """Every worker reports this step; rank 0 first checks θ is the same everywhere, validates, updates the best,
    and attaches the checkpoint (copies of the best and the final one kept for MLflow). The checkpoint names
    every worker's last tasks. A validation that diverges stops the run instead (returns the message)."""
    metrics: dict[str, Any] = {"step": run.step, "skipped_steps": len(run.divergence.get("skipped", []))}
    check_same_parameters(learner, w.world)
    stopped = None
    if w.rank == 0 and w.val_tasks:
        val, stopped = checked_validation(w, learner, run, last=last)
        metrics.update(val)
    stopped = broadcast_object(stopped, w.world)
    if stopped:
        return _stop(w, learner, optimizer, run, stopped, task_ids)
    ids = gather_lists(task_ids, w.world)
    save = None
    if w.rank == 0:
        is_best = metrics.get("val_loss", math.inf) < run.best["val_loss"]
        if is_best:
            run.best.update(val_loss=metrics["val_loss"], step=run.step, checkpoint=f"step-{run.step:07d}")
        if last and run.warnings:
            metrics["warnings"] = list(run.warnings)
        extra = run.meta_extra(optimizer, w.config, ids, metrics.get("val_loss", math.nan))
        save = saver(learner, w.cfg.model, extra, then=partial(kept.keep, best=is_best, final=last)
                     if w.tracker else None)
    metrics[SCORE] = score(metrics.get("val_loss"))
    report(metrics, f"step-{run.step:07d}", save)
    return None


def checked_validation(w: Worker, learner: MetaLearner, run: RunState, *, last: bool) -> tuple[dict, str | None]:
    """Rank 0: ``validate``, and the message to stop with when it diverged (an inner loop that blew up, or a
    non-finite loss); a finite loss that explodes (``divergence.val_explode_factor``) is only warned about."""
    try:
        val = validate(w, learner, run, last=last)
    except NonFiniteLossError as e:
        message = f"validation at meta-step {run.step} diverged: {e}; {validation_hint(w.cfg, e)}"
        log.error("%s", message)
        return {}, message
    if not math.isfinite(val["val_loss"]):
        message = (f"validation at meta-step {run.step} diverged: val_loss {val['val_loss']}; "
                   f"{validation_hint(w.cfg, None)}")
        log.error("%s", message)
        return {}, message
    before = run.curves.get("before")
    reference = run.divergence.setdefault("val_reference", before[-1] if before else val["val_loss"])
    warning = explosion_warning(w.cfg, run.step, val["val_loss"], reference)
    if warning:
        log.warning("%s", warning)
        run.warnings.append(warning)
    return val, None


def validate(w: Worker, learner: MetaLearner, run: RunState, *, last: bool) -> dict[str, float]:
    """Rank 0: the ``val_pre_*``/``val_post_*`` metrics on the validation tasks and ``val_loss``, the model's
    loss (its first metric) after adaptation; after the last step also the "after" adaptation curve."""
    val = {f"val_{k}": v for k, v in evaluate_learner(learner, w.val_tasks).items() if k.startswith(("pre_", "post_"))}
    loss_key = next(k for k in val if k.startswith("val_post_"))
    log.info("step %d validation: %s", run.step, "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
    if w.tracker:
        w.tracker.log_metrics({k: v for k, v in val.items() if math.isfinite(v)}, run.step)
    if last:
        run.curves["after"] = adaptation_curve(learner, w.val_tasks)
    if run.history:
        run.history[-1].update({"val_pre_loss": val[loss_key.replace("post", "pre")], "val_post_loss": val[loss_key]})
    return {**val, "val_loss": val[loss_key]}
