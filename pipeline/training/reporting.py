"""What a worker tells the world: the job log, ``ray.train.report`` with its checkpoints, and (rank 0) MLflow.

The MLflow run was created by the driver (``pipeline/training/train.py``) before any Ray work; rank 0 attaches
to it, logs metrics as it goes, and at the end the learning and adaptation curves and the kept best and final
checkpoints as models (the best one registered).

Every checkpoint's metrics carry ``checkpoint_score``, the score Ray Train keeps checkpoints by (lower is better,
``train.py``): the validation loss, or ``UNSCORED`` for a checkpoint without a finite one, so that the best
validated checkpoints are kept besides the newest. The snapshot Ray writes turns NaN and inf into null, which it
cannot compare on a resume; hence a finite stand-in.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.training.state import KeptModels, RunState

log = logging.getLogger("metalstm.train")
SCORE = "checkpoint_score"
UNSCORED = sys.float_info.max  # not validated, or not finite: below every validated checkpoint, newest first


def score(val_loss: float | None) -> float:
    """``checkpoint_score`` for a checkpoint with this validation loss."""
    return float(val_loss) if val_loss is not None and math.isfinite(val_loss) else UNSCORED


def setup_logging() -> None:
    """Progress lines to the job log: worker processes start without logging configured."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def report(metrics: dict[str, Any], dir_name: str, save: Callable[[Path], Any] | None = None) -> None:
    """``ray.train.report`` on every worker; the one passing ``save`` (rank 0) attaches a checkpoint: ``save``
    writes it into a fresh directory that Ray Train copies to the run's storage as ``dir_name``."""
    import ray.train

    checkpoint_dir = tempfile.mkdtemp(prefix="metalstm-ckpt-") if save else None
    try:
        if checkpoint_dir:
            save(Path(checkpoint_dir))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None, checkpoint_dir_name=dir_name)
    finally:
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def start_tracker(config: dict[str, Any], run_name: str) -> Any:
    """The MLflow run the driver created for this job (``config["tracking"]``), or ``None`` with tracking off."""
    tracking = config.get("tracking")
    if not tracking:
        return None
    from pipeline.tracking.runs import Tracker

    tracker = Tracker(tracking["uri"], tracking["experiment"], run_name=run_name, run_id=tracking["run_id"])
    tracker.start(config["train"], tracking["tags"])
    return tracker


def finish_tracking(tracker: Any, run: RunState, kept: KeptModels, registered_model: str | None, *,
                    stopped: str | None = None) -> None:
    """Plots and models at the end of the run (rank 0): the final model, and the best one registered as
    ``registered_model`` (the final one when no validation chose a best). A run that ``stopped`` on a divergence
    logs its best model unregistered and ends FAILED; a best one that could not be recovered after a restart is
    never replaced by the final one in the registry."""
    tracker.log_learning_curves(run.history)
    if "before" in run.curves and "after" in run.curves:
        tracker.log_adaptation_curves(run.curves["before"], run.curves["after"])
    register = None if stopped else registered_model
    validated = run.best_dir() is not None
    if kept.final:
        tracker.log_model(kept.final, None if validated else register, tag="final")
    if kept.best:
        version = tracker.log_model(kept.best, register, tag="best")
        if version:
            log.info("registered %s version %s", registered_model, version)
    elif validated and register:
        log.warning("the best model (step %s) was not recovered after a restart: nothing registered as %s; register "
                    "it from the run's checkpoint %s", run.best.get("step"), register, run.best_dir())
    if stopped and registered_model:
        log.warning("the run stopped on a divergence: nothing registered as %s", registered_model)
    kept.discard()
    missing = tracker.finish("FAILED" if stopped else "FINISHED")
    if missing:
        log.warning("not logged to MLflow: %s", "; ".join(missing))
