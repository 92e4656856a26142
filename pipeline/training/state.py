"""Where a run stands, and how it comes back: the checkpoint's ``extra`` and the resume from it.

A checkpoint is ``metalstm.save_checkpoint``'s file (θ, the model config) with ``extra``: ``stage`` (``pretrain``
or ``meta``), ``pretrain`` (the pre-training stage's record), ``step``, ``history``, ``best`` (val_loss, step and
checkpoint directory of the best validation), ``curves``, ``batch_task_ids`` (the last meta-batch, every
worker's), ``val_loss``, ``divergence`` (skipped steps), ``warnings``, ``resumed_at``, ``optimizer`` (the meta
optimiser, meta stage only), ``rng`` (torch, CUDA, numpy and Python), and the run's ``config`` and ``store``;
a run that stopped on a divergence also ``diverged``. Ray Train hands the latest one back to a restarted worker
group (``scaling.max_failures``) or to a driver run again with the same ``name``.

A checkpoint is always read to the CPU: θ and the optimiser state are then copied onto the worker's device by
``load_state_dict``, and the RNG states must stay CPU ByteTensors (``torch.set_rng_state`` takes nothing else).
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalstm import MetaLearner, ModelConfig, learner_from_checkpoint, load_checkpoint, save_checkpoint
from pipeline.config import TrainConfig

log = logging.getLogger("metalstm.train")
CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states for the checkpoint, as CPU tensors and plain values (``weights_only`` loads them):
    torch's, the current CUDA device's, numpy's global ``RandomState`` (all of it, not just its key) and Python's."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``'s states. torch takes RNG states only as CPU ByteTensors, so they are made so here
    whatever device the checkpoint was loaded to; numpy's old key-only record (before the full state was saved)
    is left alone."""
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_cpu_bytes(state["cuda"]))
    numpy = state.get("numpy")
    if isinstance(numpy, dict):
        key = numpy["key"].cpu().numpy().astype(np.uint32)
        np.random.set_state(("MT19937", key, int(numpy["pos"]), int(numpy["has_gauss"]),
                             float(numpy["cached_gaussian"])))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


@dataclass
class RunState:
    """A run's progress besides θ and the optimisers: what a checkpoint's ``extra`` carries."""

    step: int = 0  # meta-steps taken (skipped ones included: each consumed its batch)
    history: list[dict] = field(default_factory=list)  # one row per log window (rank 0)
    best: dict[str, Any] = field(default_factory=lambda: {"val_loss": math.inf, "step": -1})  # + checkpoint dir
    curves: dict[str, list[float]] = field(default_factory=dict)  # query loss by inner step, before and after
    pretrain: dict[str, Any] = field(default_factory=dict)  # the stage's record: step, history, wall_s, ...
    stage: str = "pretrain"  # the stage to run from: pretrain (skipped when pretrain.steps = 0) or meta
    divergence: dict[str, Any] = field(default_factory=dict)  # meta-training's skipped steps (divergence.StepGuard)
    warnings: list[str] = field(default_factory=list)  # rank 0's warnings (an exploding validation loss)
    resumed_at: list[int] = field(default_factory=list)  # the meta-steps this run resumed from
    best_source: Any = None  # not saved: after a resume, the best checkpoint in the run's storage (ray Checkpoint)

    def meta_extra(self, optimizer: torch.optim.Optimizer, config: dict[str, Any], batch_task_ids: list[str],
                   val_loss: float) -> dict[str, Any]:
        """``extra`` of a meta-training checkpoint."""
        return {"optimizer": optimizer.state_dict(), "step": self.step, "history": self.history, "best": self.best,
                "rng": rng_state(), "config": config["train"], "store": config["store"], "curves": self.curves,
                "batch_task_ids": batch_task_ids, "val_loss": val_loss, "stage": "meta", "pretrain": self.pretrain,
                "divergence": self.divergence, "warnings": self.warnings, "resumed_at": self.resumed_at}

    def pretrain_extra(self, config: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """``extra`` of a pre-training checkpoint: ``record`` (with the stage's optimiser), meta-training unstarted."""
        return {"step": 0, "history": [], "best": self.best, "config": config["train"], "store": config["store"],
                "curves": {}, "batch_task_ids": [], "val_loss": float("nan"), "stage": "pretrain",
                "pretrain": record, "rng": rng_state(), "divergence": {}, "warnings": self.warnings}

    def best_dir(self) -> str | None:
        """The best validated checkpoint's directory name in the run's storage (None before any validation)."""
        step = int(self.best.get("step", -1))
        return self.best.get("checkpoint") or (f"step-{step:07d}" if step >= 1 else None)


def saver(learner: MetaLearner, model_cfg: ModelConfig, extra: dict[str, Any],
          then: Callable[[Path], Any] | None = None) -> Callable[[Path], None]:
    """What ``reporting.report`` calls to write the checkpoint (θ now, ``extra``) into its directory; ``then``
    gets the file's path."""
    def save(directory: Path) -> None:
        path = save_checkpoint(directory / CHECKPOINT_FILE, learner, model_cfg, extra)
        if then is not None:
            then(path)
    return save


def restore(learner: MetaLearner, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
            rank: int) -> RunState:
    """The run's state from Ray Train's latest checkpoint, loading θ (and the meta optimiser) from it; without
    one a fresh state, θ from ``checkpoint.warm_start`` when that is set. ``best_source`` then points at the
    best checkpoint in the run's storage (Ray keeps it: ``train.py``'s ``CheckpointConfig``)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if cfg.checkpoint.warm_start:
            warm, _ = learner_from_checkpoint(load_checkpoint(cfg.checkpoint.warm_start))
            learner.model.load_state_dict(warm.model.state_dict())
            log.info("rank %d: warm-started θ from %s", rank, cfg.checkpoint.warm_start)
        return RunState()
    with checkpoint.as_directory() as d:
        run = load_run(Path(d) / CHECKPOINT_FILE, learner, optimizer, cfg, device, rank)
    best = run.best_dir()
    if best:
        run.best_source = ray.train.Checkpoint(posixpath.join(posixpath.dirname(checkpoint.path.rstrip("/")), best),
                                               filesystem=checkpoint.filesystem)
    return run


def load_run(path: Path, learner: MetaLearner, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
             device: torch.device, rank: int) -> RunState:
    """Load the checkpoint at ``path`` into ``learner``, ``optimizer`` (both already on ``device``) and the RNGs.

    Read to the CPU, whatever ``device`` is: ``load_state_dict`` copies θ and the optimiser state onto the
    parameters' device, and the RNG states stay CPU ByteTensors. The config's ``optim.lr`` and
    ``optim.weight_decay`` replace the checkpoint's, so a run resumed after a divergence takes the lowered rate.
    """
    state = load_checkpoint(path, map_location="cpu")
    extra = state["extra"]
    learner.load_state_dict(state["state_dict"])
    set_rng_state(extra["rng"])
    run = RunState(pretrain=extra.get("pretrain", {}), warnings=list(extra.get("warnings", [])))
    if extra.get("diverged"):
        log.warning("rank %d: resuming a run that stopped on a divergence (%s)", rank, extra["diverged"])
    if extra.get("stage") == "pretrain":  # stopped mid pre-training: continue it, meta-train fresh
        run.pretrain["resumed_at"] = [*run.pretrain.get("resumed_at", []), run.pretrain["step"]]
        log.info("rank %d: resumed pre-training from step %d on %s", rank, run.pretrain["step"], device)
        return run
    # meta-training had started: pre-training (if any) is done and never repeated
    optimizer.load_state_dict(extra["optimizer"])
    _config_rates(optimizer, cfg, rank)
    run.stage, run.step, run.history, run.best = "meta", extra["step"], extra["history"], extra["best"]
    run.curves, run.divergence = extra.get("curves", {}), extra.get("divergence", {})
    run.resumed_at = [*extra.get("resumed_at", []), run.step]
    log.info("rank %d: resumed from step %d on %s", rank, run.step, device)
    return run


def _config_rates(optimizer: torch.optim.Optimizer, cfg: TrainConfig, rank: int) -> None:
    """The config's meta rate and weight decay over the checkpoint's (``load_state_dict`` restores the old ones)."""
    for group in optimizer.param_groups:
        for key, value in (("lr", cfg.optim.lr), ("weight_decay", cfg.optim.weight_decay)):
            if group.get(key) != value:
                if rank == 0:
                    log.info("optim.%s %g from the config replaces the checkpoint's %g", key, value, group[key])
                group[key] = value


@dataclass
class KeptModels:
    """Rank 0's own copies of the best and the final checkpoint, logged to MLflow when the run ends: Ray Train
    prunes and moves its checkpoints (``checkpoint.num_to_keep``). After a restart the best one recorded before
    it is copied back from the run's storage (``recover_best``): the process's copies went with the process."""

    best: str | None = None
    final: str | None = None

    def keep(self, path: Path, *, best: bool, final: bool) -> None:
        if best:
            self.best = _copy(path, "best")
        if final:
            self.final = _copy(path, "final")

    def recover_best(self, run: RunState) -> None:
        """Copy the resumed run's best checkpoint (``run.best_source``) back; a warning if it is gone."""
        if run.best_source is None or self.best:
            return
        try:
            with run.best_source.as_directory() as d:
                self.best = _copy(Path(d) / CHECKPOINT_FILE, "best")
            log.info("recovered the best checkpoint (step %s) from %s", run.best.get("step"), run.best_source.path)
        except Exception as e:  # noqa: BLE001 - any storage error: the run goes on, the loss is said
            log.warning("cannot recover the best checkpoint (step %s) from %s: %s", run.best.get("step"),
                        run.best_source.path, e)

    def discard(self) -> None:
        for path in (self.best, self.final):
            if path:
                Path(path).unlink(missing_ok=True)


def _copy(path: Path, tag: str) -> str:
    keep = Path(tempfile.gettempdir()) / f"metalstm-{tag}-{os.getpid()}.pt"
    shutil.copyfile(path, keep)
    return str(keep)
