"""MAML (Finn et al. 2017) over task-batched fast weights, with the MAML++ options.

The inner loop is a plain function of parameters and data: each task's fast weights start at θ and take
K gradient steps on that task's support loss. Because a batch's loss is the *sum* of per-task losses and
task ``t`` only touches slice ``t`` of the fast weights, one ``autograd.grad`` gives every task its own
gradient. Second-order MAML keeps that graph (``create_graph=True``); first-order detaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalstm.config import MAMLConfig
from metalstm.data import Split, TaskBatch
from metalstm.models import MetaModel, batched


class NonFiniteLossError(FloatingPointError):
    """The support loss became NaN or inf during adaptation (rates too high, or bad data).

    ``inner_step`` is the step whose loss it was (None when unknown): at step 0 θ itself gives a non-finite loss
    (θ diverged, or the data is bad), later the inner loop blew up (the inner rate); callers name the setting.
    """

    def __init__(self, message: str, inner_step: int | None = None) -> None:
        super().__init__(message)
        self.inner_step = inner_step


class InnerRates(nn.Module):
    """Learned inner rates: one per parameter tensor and inner step (MAML++ LSLR; Meta-SGD per tensor)."""

    def __init__(self, names: list[str], steps: int, init: float) -> None:
        super().__init__()
        self.steps = max(steps, 1)
        self.rates = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.full((self.steps,), init))
                                       for n in names})

    def rate(self, name: str, step: int) -> Tensor:
        """Step ``step``'s rate; evaluation beyond the trained steps reuses the last one."""
        return self.rates[name.replace(".", "__")][min(step, self.steps - 1)]


def inner_loop(
    model: MetaModel,
    params: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    lr: float | InnerRates,
    first_order: bool = False,
    create_graph: bool = True,
    first_step: int = 0,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Adapt fast weights ``params`` (each ``[T, ...]``) on ``support``.

    ``first_step`` numbers the steps (learned rates are per step) when the loop is run piecewise.

    Returns the adapted weights and the support loss per task before each step (``steps`` tensors ``[T]``).
    ``create_graph=False`` (evaluation, serving) keeps no graph at all.
    """
    params = dict(params)
    curve = []
    for k in range(first_step, first_step + steps):
        loss = model.task_loss(params, support)
        if not bool(torch.isfinite(loss).all()):
            bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
            hint = ("lower maml.inner_lr or check the support data for NaN/inf" if k else "at θ, before any "
                    "adaptation step (not the inner rate): check the support data for NaN/inf, or θ has diverged")
            raise NonFiniteLossError(
                f"inner step {k}: support loss is not finite for task(s) {bad[:10]}; {hint}", inner_step=k)
        curve.append(loss.detach())
        second_order = create_graph and not first_order
        grads = torch.autograd.grad(loss.sum(), list(params.values()), create_graph=second_order, allow_unused=True)
        new = {}
        for (name, p), g in zip(params.items(), grads):
            if g is None:
                new[name] = p
                continue
            if not second_order:
                g = g.detach()
            if isinstance(lr, InnerRates):
                new[name] = p - lr.rate(name, k) * g
            else:  # the rate inside the subtraction: one pass over each weight tensor, not two
                new[name] = torch.add(p, g, alpha=-lr)
        params = new
    return params, curve


def multi_step_weights(steps: int, progress: float) -> list[float]:
    """MAML++ multi-step loss weights: uniform over steps at the start, all on the last step by the end."""
    p = min(max(progress, 0.0), 1.0)
    weights = [(1.0 - p) / steps] * steps
    weights[-1] += p
    return weights


@dataclass
class MetaLoss:
    """Per-task query losses after adaptation (sum them to get the summed meta-gradient) and diagnostics."""

    query: Tensor  # [T], differentiable w.r.t. θ (weighted over steps when multi-step)
    query_final: Tensor  # [T], detached query loss after the last inner step
    support_curve: list[Tensor]  # support loss per inner step, detached


class MetaLearner(nn.Module):
    """θ (the model's parameters) plus, optionally, learned inner rates: everything meta-training updates."""

    def __init__(self, model: MetaModel, cfg: MAMLConfig) -> None:
        super().__init__()
        cfg.validate()
        self.model, self.cfg = model, cfg
        names = [n for n, _ in model.named_parameters()]
        self.rates = InnerRates(names, cfg.inner_steps, cfg.inner_lr) if cfg.learn_inner_lr else None

    def _lr(self) -> float | InnerRates:
        return self.rates if self.rates is not None else self.cfg.inner_lr

    def meta_loss(self, batch: TaskBatch, progress: float = 1.0) -> MetaLoss:
        """Adapt on each task's support set and return the query losses (graph kept for the meta-gradient)."""
        self.model.check(batch.support, "support")
        self.model.check(batch.query, "query")
        steps = self.cfg.inner_steps
        params = batched(self.model, batch.num_tasks)
        weights = multi_step_weights(steps, progress) if self.cfg.multi_step_loss and steps > 0 else None
        if weights is None:
            fast, curve = inner_loop(self.model, params, batch.support, steps=steps, lr=self._lr(),
                                     first_order=self.cfg.first_order)
            query = final = self.model.task_loss(fast, batch.query)
        else:  # one step at a time so that each step's query loss joins the objective
            query, curve, fast = 0.0, [], params
            for k in range(steps):
                fast, c = inner_loop(self.model, fast, batch.support, steps=1, lr=self._lr(),
                                     first_order=self.cfg.first_order, first_step=k)
                curve += c
                final = self.model.task_loss(fast, batch.query)
                query = query + weights[k] * final
        return MetaLoss(query=query, query_final=final.detach(), support_curve=curve)

    def adapt(self, support: Split, steps: int | None = None) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Fast weights for a support set, without meta-gradient (evaluation and serving).

        Returns detached fast weights ``[T, ...]`` and the support loss per step (``steps + 1`` entries).
        """
        self.model.check(support, "support")
        steps = self.cfg.adapt_steps if steps is None else steps
        with torch.enable_grad():
            theta = {n: p.detach().requires_grad_(True) for n, p in batched(self.model, support.num_tasks).items()}
            fast, curve = inner_loop(self.model, theta, support, steps=steps, lr=self._lr(), create_graph=False)
        fast = {n: p.detach() for n, p in fast.items()}
        with torch.no_grad():
            curve.append(self.model.task_loss(fast, support))
        return fast, curve

    def evaluate(self, batch: TaskBatch, steps: int | None = None) -> dict[str, Tensor]:
        """Per-task query metrics before and after adaptation (``pre_*``, ``post_*``) and the support curve."""
        self.model.check(batch.query, "query")
        fast, curve = self.adapt(batch.support, steps)
        with torch.no_grad():
            before = self.model.metrics(batch_params(self.model, batch.num_tasks), batch.query)
            after = self.model.metrics(fast, batch.query)
        out = {f"pre_{k}": v for k, v in before.items()}
        out.update({f"post_{k}": v for k, v in after.items()})
        out["support_curve"] = torch.stack(curve, 1)
        return out


def batch_params(model: nn.Module, num_tasks: int) -> dict[str, Tensor]:
    """θ, detached, broadcast to ``num_tasks`` tasks (un-adapted predictions)."""
    return {n: p.detach() for n, p in batched(model, num_tasks).items()}
