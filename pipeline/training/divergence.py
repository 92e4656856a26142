"""What a run does when training diverges (``divergence.*``, docs/training.md "Divergence").

A step whose loss or gradient is not finite is never applied: ``metalstm.training`` skips it on every worker
together (the check runs on all-reduced tensors, identical everywhere). ``StepGuard`` then decides, on every
worker alike, whether the run goes on (``divergence.on_nonfinite=skip``, at most
``divergence.max_skipped_steps`` skipped steps in a row) or stops; a validation that diverges stops the run
whatever the policy (rank 0's verdict, broadcast). A stop is an expected end, not a crash: the workers report
a last checkpoint marked ``diverged`` and return, Ray Train does not retry, and the driver raises
``TrainingDiverged`` (a ``UserError``: one line on the console, exit 2). The messages name the step, the loss
and the setting to lower, and never blame the inner rate for what θ itself did.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from metalstm.maml import NonFiniteLossError
from pipeline.config import TrainConfig
from pipeline.errors import UserError

log = logging.getLogger("metalstm.train")


class TrainingDiverged(UserError):
    """The run stopped on a divergence; the message names the step, the loss, the setting and the best checkpoint."""


def data_hint(where: str = "task") -> str:
    return f"check the {where} data for NaN/inf"


def meta_hint(cfg: TrainConfig, out: dict[str, float], theta_updated: bool) -> str:
    """The setting to lower for a skipped meta-step: θ's own support loss (before adaptation) not finite means
    the meta-updates diverged (``optim.lr``), or, before any update, bad data; anything else may be either rate."""
    if out.get("nonfinite_at_theta"):
        if not theta_updated:
            return f"the starting θ's support loss is not finite before any update: {data_hint()}"
        return (f"θ's own support loss is not finite, before adaptation: the meta-updates diverged; lower optim.lr "
                f"(now {cfg.optim.lr:g}), or {data_hint()}")
    return f"lower maml.inner_lr (now {cfg.maml.inner_lr:g}) or optim.lr (now {cfg.optim.lr:g}), or {data_hint()}"


def pretrain_hint(cfg: TrainConfig) -> str:
    return f"lower pretrain.lr (now {cfg.pretrain.lr:g}), or {data_hint()}"


def validation_hint(cfg: TrainConfig, error: NonFiniteLossError | None) -> str:
    """The setting to lower for a validation that diverged: at inner step 0 θ itself (``optim.lr``), later the
    inner loop (``maml.inner_lr``, or ``maml.eval_inner_steps`` when validation adapts longer than training)."""
    step = getattr(error, "inner_step", None)
    if step == 0:
        return (f"θ's own support loss on the validation tasks is not finite, before adaptation: the meta-updates "
                f"diverged; lower optim.lr (now {cfg.optim.lr:g}), or {data_hint('validation')}")
    if step is None:
        return (f"lower maml.inner_lr (now {cfg.maml.inner_lr:g}) or optim.lr (now {cfg.optim.lr:g}), or "
                f"{data_hint('validation')}")
    hint = f"the inner loop blew up at inner step {step}: lower maml.inner_lr (now {cfg.maml.inner_lr:g})"
    if step >= cfg.maml.inner_steps:
        hint += (f" or maml.eval_inner_steps (validation adapts {cfg.maml.adapt_steps} steps, training "
                 f"{cfg.maml.inner_steps})")
    return hint


def explosion_warning(cfg: TrainConfig, step: int, val_loss: float, reference: float | None) -> str | None:
    """The warning for a validation loss that is finite but exploding: over ``divergence.val_explode_factor`` ×
    the reference (the validation loss before meta-training, or the first one measured)."""
    factor = cfg.divergence.val_explode_factor
    if not factor or reference is None or not math.isfinite(reference) or reference <= 0:
        return None
    if val_loss <= factor * reference:
        return None
    return (f"step {step} validation: val_loss {val_loss:.4g} is over {factor:g} x the reference {reference:.4g} "
            f"(the validation loss before meta-training, or the first one): meta-training is diverging; lower optim.lr "
            f"(now {cfg.optim.lr:g}) (divergence.val_explode_factor sets this threshold)")


@dataclass
class StepGuard:
    """Counts one stage's skipped steps (``state``: the run's record of them, checkpointed) and says when to stop.

    Every worker holds one and feeds it the same all-reduced step output, so every worker decides alike.
    """

    cfg: TrainConfig
    label: str  # "meta-step" or "pretrain step"
    loss_name: str  # "query loss" or "loss"
    state: dict[str, Any] = field(default_factory=dict)  # skipped: [steps], consecutive: n

    def after(self, out: dict[str, float], step: int, hint: str, *, rank: int, world: int) -> str | None:
        """None to go on (the step taken, or skipped within the limit; rank 0 logs the skip); else the message
        the run stops with (logged by rank 0)."""
        if not out.get("skipped"):
            self.state["consecutive"] = 0
            return None
        self.state.setdefault("skipped", []).append(step)
        self.state["consecutive"] = run = int(self.state.get("consecutive", 0)) + 1
        bad = int(out.get("nonfinite_workers", 0))
        what = (f"{self.loss_name} {out.get('query_loss', out.get('loss', math.nan)):.4g} "
                + (f"(not finite on {bad} of {world} workers)" if bad else "(the all-reduced gradient is not finite)"))
        d = self.cfg.divergence
        if d.on_nonfinite == "stop" or run >= d.max_skipped_steps:
            why = ("divergence.on_nonfinite=stop" if d.on_nonfinite == "stop" else
                   f"{run} skipped steps in a row, divergence.max_skipped_steps={d.max_skipped_steps}")
            message = f"{self.label} {step} diverged: {what}; stopped ({why}), no update made with it; {hint}"
            if rank == 0:
                log.error("%s", message)
            return message
        if rank == 0:
            log.warning("%s %d: %s; step skipped on every worker (%d in a row; the run stops at "
                        "divergence.max_skipped_steps=%d); %s", self.label, step, what, run, d.max_skipped_steps, hint)
        return None
