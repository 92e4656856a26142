"""The optional first stage (``pretrain.steps > 0``): conventional pre-training of θ, data-parallel.

The same network is trained with its own Adam on the pooled support + query sequences of each worker's training
tasks (``shards.sequence_pool``); every step each worker takes its share of the global ``pretrain.batch_size``
sequences and ``metalstm.training.pretrain_step`` sums the gradients over the workers, so the identical Adam step
on every worker is the step on the global minibatch. Meta-training then starts from the pre-trained θ with a
fresh optimiser. Checkpoints are marked ``stage: pretrain`` and a resume continues the stage (docs/training.md).
A step whose loss or gradient is not finite is skipped on every worker, or stops the run (``divergence``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from metalstm import MetaLearner
from metalstm.baselines import as_split
from metalstm.data import Split
from metalstm.training import pretrain_loss, pretrain_step
from pipeline.config import TrainConfig
from pipeline.training.collective import all_reduce_for, split_sizes
from pipeline.training.divergence import StepGuard, pretrain_hint
from pipeline.training.reporting import SCORE, UNSCORED, report
from pipeline.training.shards import pretrain_batch
from pipeline.training.state import RunState, saver

log = logging.getLogger("metalstm.train")


@dataclass
class PretrainWindow:
    """Sums over the pre-training steps since the last log line; ``row`` averages them into a history row."""

    loss: float = 0.0
    steps: int = 0
    targets: float = 0.0
    seconds: float = 0.0

    def add(self, out: dict[str, float], seconds: float) -> None:
        self.loss, self.steps = self.loss + out["loss"], self.steps + 1
        self.targets, self.seconds = self.targets + out["targets"], self.seconds + seconds

    def row(self, step: int) -> dict[str, float]:
        return {"step": step, "loss": self.loss / self.steps, "targets_per_s": self.targets / max(self.seconds, 1e-9)}


def pretrain_stage(cfg: TrainConfig, learner: MetaLearner, pool: list[tuple[Any, Any]], run: RunState,
                   config: dict[str, Any], *, val_split: Split | None, tracker: Any) -> str | None:
    """Pre-train θ from ``run.pretrain`` (a resumed stage's step, history, wall_s, optimizer, resumed_at, or
    empty) to ``pretrain.steps``; ``run.pretrain`` ends as the stage's record, without its optimiser.

    A checkpoint is reported every ``pretrain.val_every`` steps (default ``schedule.val_every``) and after the last.
    Returns the message the run stopped with on a divergence (after a last checkpoint marked ``diverged``), or None.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p, model = cfg.pretrain, learner.model
    device, dtype = next(model.parameters()).device, getattr(torch, cfg.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    record = run.pretrain
    if record.get("optimizer"):
        optimizer.load_state_dict(record["optimizer"])
    step, history, wall = int(record.get("step", 0)), list(record.get("history", [])), float(record.get("wall_s", 0.0))
    local, all_reduce = split_sizes(p.batch_size, world)[rank], all_reduce_for(world, cfg.scaling.bucket_mb)
    val_every = p.val_every or cfg.schedule.val_every
    guard = StepGuard(cfg, "pretrain step", "loss", record.setdefault("divergence", {}))
    log.info("rank %d: pre-training from step %d to %d, %d of %d sequences a step from a pool of %d", rank, step,
             p.steps, local, p.batch_size, len(pool))
    window, stopped = PretrainWindow(), None
    while step < p.steps and stopped is None:
        t0 = time.perf_counter()
        pairs = pretrain_batch(pool, local, cfg.schedule.seed, rank, step)
        split = as_split(pairs).to(device, dtype) if pairs else None
        out = pretrain_step(model, split, optimizer, grad_clip=cfg.optim.grad_clip, step=step + 1,
                            all_reduce=all_reduce, skip_nonfinite=True)
        step += 1
        elapsed = time.perf_counter() - t0
        wall += elapsed
        stopped = guard.after(out, step, pretrain_hint(cfg), rank=rank, world=world)
        if not out["skipped"]:
            window.add(out, elapsed)
        last = step == p.steps
        if rank == 0 and window.steps and (step % cfg.schedule.log_every == 0 or last):
            row, window = window.row(step), PretrainWindow()
            history.append(row)
            log.info("pretrain step %d/%d  loss %.4f  %.0f targets/s", step, p.steps, row["loss"], row["targets_per_s"])
            if tracker:
                tracker.log_metrics({f"pretrain/{k}": v for k, v in row.items() if k != "step"}, step)
        if (val_every and step % val_every == 0) or last or stopped:
            metrics: dict[str, Any] = {"pretrain/step": step, SCORE: UNSCORED}
            save = None
            if rank == 0:
                if not stopped:
                    metrics.update(_validate(model, val_split, history, step, tracker))
                stage = {**record, "step": step, "history": history, "wall_s": wall,
                         "optimizer": optimizer.state_dict()}
                save = saver(learner, cfg.model, {**run.pretrain_extra(config, stage),
                                                  **({"diverged": stopped} if stopped else {})})
            if stopped:
                metrics["diverged"] = stopped
            report(metrics, f"{'stopped' if stopped else 'pretrain'}-{step:07d}", save)
    if rank == 0 and p.steps and not stopped:
        log.info("pre-training done: %d steps, %.1f s; meta-training starts from the pre-trained θ", step, wall)
    run.pretrain = {**{k: v for k, v in record.items() if k != "optimizer"}, "step": step, "history": history,
                    "wall_s": wall}
    return stopped


def _validate(model: torch.nn.Module, val_split: Split | None, history: list[dict], step: int,
              tracker: Any) -> dict[str, float]:
    """Rank 0's ``pretrain/`` metrics for this step's report: the window's loss if it ended at this step, and the
    pre-training loss on the validation tasks' pooled sequences (also noted in that history row)."""
    row = history[-1] if history and history[-1]["step"] == step else {}
    metrics = {"pretrain/loss": row["loss"]} if row else {}
    if val_split is not None:
        with torch.no_grad():
            metrics["pretrain/val_loss"] = row["val_loss"] = float(pretrain_loss(model, val_split))
        log.info("pretrain step %d validation: loss %.4f", step, metrics["pretrain/val_loss"])
        if tracker:
            tracker.log_metrics({"pretrain/val_loss": metrics["pretrain/val_loss"]}, step)
    return metrics
