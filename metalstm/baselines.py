"""The conventional baselines Meta-LSTM is compared against, and the statistics of the comparison.

- :func:`seasonal_naive`: the forecast is the last season of actual values (yesterday's load for hourly data).
- :class:`KneserNeyLM`: an interpolated Kneser-Ney character n-gram, fit on training text only.
- :func:`pretrain`: standard supervised training of the *same* network on the pooled support + query sequences
  of the training tasks (the "transfer" model); :func:`adapt_path` then fine-tunes it on a support set with the
  same inner loop MAML uses (plain SGD), or trains a freshly initialised copy from scratch (Adam).
- :func:`t_interval`: mean and 95 % t-interval over (task, seed) values.

Everything here is plain PyTorch/NumPy on the task-batch layout of :mod:`metalstm.data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metalstm.data import PAD, Split, collate
from metalstm.maml import InnerRates, NonFiniteLossError, inner_loop
from metalstm.models import MetaModel, batched, seasonal_naive  # noqa: F401  (re-exported: a baseline)
from metalstm.training import fit, pretrain_step

Params = Mapping[str, Tensor]

# --------------------------------------------------------------------------------------------- statistics


def t_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` of a Student-t interval; half-width is NaN for fewer than two finite values.

    The unit is one (test task, seed) pair: the spread covers both task difficulty and training randomness.
    """
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    if a.size == 1 or not np.isfinite(a).all():  # an infinite value (a diverged adaptation): no interval
        return float(a.mean()), float("nan"), int(a.size)
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + confidence / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return float(a.mean()), half, int(a.size)


# --------------------------------------------------------------------------------------------- K-shot


def subsample_support(task: Mapping[str, Any], shots: int, rng: np.random.Generator) -> dict[str, Any]:
    """A copy of ``task`` whose support set is ``shots`` sequences drawn without replacement (all if fewer)."""
    if shots < 1:
        raise ValueError(f"shots: must be >= 1, got {shots}")
    n = len(task["support_x"])
    out = dict(task)
    if shots < n:
        keep = np.sort(rng.choice(n, size=shots, replace=False))
        out["support_x"] = [task["support_x"][i] for i in keep]
        out["support_y"] = [task["support_y"][i] for i in keep]
    return out


# --------------------------------------------------------------------------------------------- forecasting


def pooled_errors(pred: Tensor, target: Tensor, mask: Tensor, offset: Tensor, scale: Tensor) -> dict[str, float]:
    """ND and NRMSE pooled over every series and step in original units (the literature's definition).

    ``pred``/``target``/``mask`` ``[T, N, H]`` are scaled per task; ``offset``/``scale`` ``[T]`` undo it.
    ND = Σ|y − ŷ| / Σ|y|; NRMSE = sqrt(mean (y − ŷ)²) / mean |y|.
    """
    shape = (-1,) + (1,) * (pred.dim() - 1)
    y = target * scale.view(shape) + offset.view(shape)
    p = pred * scale.view(shape) + offset.view(shape)
    m = mask.to(y.dtype)
    err, tot, n = ((p - y).abs() * m).sum(), (y.abs() * m).sum(), m.sum().clamp_min(1)
    return {"nd": float(err / tot.clamp_min(1e-12)),
            "nrmse": float(((p - y).pow(2) * m).sum().div(n).sqrt() / (tot / n).clamp_min(1e-12))}


# --------------------------------------------------------------------------------------------- n-gram


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram over token ids (Chen & Goodman 1999), counted with NumPy.

    A prediction ``y[i]`` is conditioned on ``x[i-n+2..i]`` — the same inputs the LSTM sees — left-padded
    with PAD at a sequence start. Discounts per order are ``D = n1 / (n1 + 2 n2)``. The lowest order mixes
    with the uniform distribution over the vocabulary, so every token has non-zero probability.
    """

    def __init__(self, order: int, vocab_size: int) -> None:
        if order < 1:
            raise ValueError(f"order: must be >= 1, got {order}")
        if vocab_size ** order >= 2**62:
            raise ValueError(f"order: vocab_size ** order = {vocab_size}^{order} overflows the int64 n-gram keys")
        self.order, self.vocab_size = order, vocab_size
        self.tables: list[dict[str, np.ndarray]] = []

    def _grams(self, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        """Encoded n-grams (context of ``order-1`` inputs + target) for every position of every sequence."""
        n, v, keys = self.order, self.vocab_size, []
        for x, y in pairs:
            x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
            if x.shape != y.shape:
                raise ValueError(f"sequence: x and y lengths differ ({x.shape} vs {y.shape})")
            padded = np.concatenate([np.full(n - 1, PAD, np.int64), x])
            key = np.zeros(len(y), np.int64)
            for j in range(n - 1):  # context tokens oldest first: x[i-n+2+j]
                key = key * v + padded[1 + j: 1 + j + len(y)]
            keys.append(key * v + y)
        return np.concatenate(keys) if keys else np.zeros(0, np.int64)

    def fit(self, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> KneserNeyLM:
        """Count from ``(x, y)`` training sequences; lower orders use continuation counts."""
        v = self.vocab_size
        keys, counts = np.unique(self._grams(pairs), return_counts=True)
        if keys.size == 0:
            raise ValueError("training text: no tokens to count")
        tables = []
        for k in range(self.order, 0, -1):  # highest order first: raw counts, then continuation counts
            if k < self.order:
                keys, counts = np.unique(keys % v**k, return_counts=True)
            n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
            # without singletons the estimate is D = 0, which leaves no mass for unseen tokens (log 0): back off
            d = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5
            ctx, inverse = np.unique(keys // v, return_inverse=True)
            tables.append({"keys": keys, "counts": counts.astype(np.float64), "ctx": ctx,
                           "ctx_total": np.bincount(inverse, weights=counts).astype(np.float64),
                           "ctx_types": np.bincount(inverse).astype(np.float64), "d": np.float64(d)})
        self.tables = tables[::-1]  # index k-1 = order k
        return self

    @staticmethod
    def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_keys, query).clip(max=len(sorted_keys) - 1)
        return np.where(sorted_keys[pos] == query, values[pos], 0.0)

    def token_log2probs(self, x: Sequence[int], y: Sequence[int]) -> np.ndarray:
        """log2 P(y[i] | x[..i]) for one sequence."""
        if not self.tables:
            raise RuntimeError("KneserNeyLM: call fit() first")
        v, grams = self.vocab_size, self._grams([(x, y)])
        p = np.full(grams.shape, 1.0 / v)
        for k in range(1, self.order + 1):
            t = self.tables[k - 1]
            key = grams % v**k
            ctx = key // v
            total = self._lookup(t["ctx"], t["ctx_total"], ctx)
            types = self._lookup(t["ctx"], t["ctx_types"], ctx)
            count = self._lookup(t["keys"], t["counts"], key)
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            mixed = np.maximum(count - t["d"], 0.0) / safe + t["d"] * types / safe * p
            p = np.where(seen, mixed, p)
        return np.log2(p)

    def bits_per_token(self, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> float:
        """Mean bits per predicted token over the sequences (token-weighted, like the LSTM's BPC)."""
        lp = [self.token_log2probs(x, y) for x, y in pairs]
        total = sum(len(a) for a in lp)
        return float(-sum(a.sum() for a in lp) / max(total, 1))


# --------------------------------------------------------------------------------------------- neural


def pooled_sequences(tasks: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any]]:
    """Every (x, y) sequence of the tasks' support and query sets: the conventional training set."""
    return [(x, y) for t in tasks for side in ("support", "query") for x, y in zip(t[f"{side}_x"], t[f"{side}_y"])]


def as_split(pairs: Sequence[tuple[Any, Any]]) -> Split:
    """Sequences as ONE task's split ``[1, N, ...]``, for conventional (non-task-batched) training."""
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    return collate([{"support_x": xs, "support_y": ys, "query_x": xs[:1], "query_y": ys[:1]}]).support


def pretrain(model: MetaModel, pairs: Sequence[tuple[Any, Any]], *, steps: int, batch_size: int, lr: float,
             seed: int, grad_clip: float = 10.0, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", validate: Callable[[], float] | None = None, val_every: int = 0,
             log: Callable[[dict], None] | None = None, log_every: int = 50) -> dict[str, Any]:
    """Train θ of ``model`` in place with Adam on minibatches of pooled sequences (ordinary supervised training).

    With ``validate`` (lower is better) every ``val_every`` steps, θ ends at the best validated state: the
    same model selection on validation tasks that meta-training gets. Returns history and compute.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps/batch_size: need steps >= 0 and batch_size >= 1, got {steps}/{batch_size}")
    if not pairs:
        raise ValueError("pairs: no training sequences to pre-train on")
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(i: int) -> dict:  # the one pre-training step ``metalstm train``'s stage takes too, on one process
        idx = rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False)
        split = as_split([pairs[j] for j in idx]).to(device, dtype)
        out = pretrain_step(model, split, opt, grad_clip=grad_clip, step=i, rate_key="baselines.pretrain_lr")
        return {"loss": out["loss"]}

    out = fit(model, step, steps, validate=validate, val_every=val_every, log=log, log_every=log_every)
    return {**out, "sequences_seen": steps * min(batch_size, len(pairs))}


def _adam_steps(model: MetaModel, params: dict[str, Tensor], support: Split, steps: int, lr: float,
                state: dict[str, Any]) -> dict[str, Tensor]:
    """Task-batched Adam on fast weights (moments are elementwise, so each task's slice is its own Adam)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    for _ in range(steps):
        params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = model.task_loss(params, support)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError("scratch/fine-tune step: support loss is not finite; lower the rate")
        grads = torch.autograd.grad(loss.sum(), list(params.values()), allow_unused=True)
        state["t"] = state.get("t", 0) + 1
        t, new = state["t"], {}
        for (name, p), g in zip(params.items(), grads):
            if g is None:
                new[name] = p.detach()
                continue
            m = state.setdefault(("m", name), torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
            v = state.setdefault(("v", name), torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
            step = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            new[name] = (p - step).detach()
        params = new
    return params


def adapt_path(model: MetaModel, start: Params, support: Split, steps: Sequence[int], lr: float | InnerRates,
               optimizer: str = "sgd") -> dict[int, dict[str, Tensor]]:
    """Fast weights after each step count in ``steps`` (one run to the largest), from ``start`` (θ, no task dim).

    ``sgd`` is exactly MAML's inner loop (:func:`metalstm.maml.inner_loop`, no meta-graph), so Meta-LSTM,
    first-order MAML and the fine-tuned transfer model adapt identically; ``adam`` is for scratch training.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer: expected sgd or adam, got {optimizer!r}")
    if isinstance(lr, InnerRates) and optimizer != "sgd":
        raise ValueError("optimizer: learned inner rates need sgd")
    targets = sorted(set(int(s) for s in steps))
    if not targets or targets[0] < 0:
        raise ValueError(f"steps: need non-negative step counts, got {list(steps)}")
    t = support.num_tasks
    fast = {n: p.detach().unsqueeze(0).expand(t, *p.shape).clone() for n, p in start.items()}
    out, done, adam_state = {}, 0, {}
    for k in targets:
        if k > done:
            if optimizer == "sgd":
                with torch.enable_grad():
                    fast = {n: p.detach().requires_grad_(True) for n, p in fast.items()}
                    fast, _ = inner_loop(model, fast, support, steps=k - done, lr=lr, create_graph=False,
                                         first_step=done)
            else:
                with torch.enable_grad():
                    fast = _adam_steps(model, fast, support, k - done, float(lr), adam_state)
            fast = {n: p.detach() for n, p in fast.items()}
            done = k
        out[k] = fast
    return out
