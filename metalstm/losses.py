"""Masked per-task losses and the families' metrics.

Every function returns one value per task (``[T]``): MAML differentiates the *sum* so that each task's
fast weights get exactly their own gradient, and reports the mean. Padding (mask 0) never contributes.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def _per_task(values: Tensor, mask: Tensor) -> Tensor:
    dims = tuple(range(1, values.dim()))
    return (values * mask).sum(dims) / mask.sum(dims).clamp_min(1.0)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    return _per_task((pred - target).pow(2), mask)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error per task: on per-task scaled values it ranks forecasts as ND does."""
    return _per_task((pred - target).abs(), mask)


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean token negative log-likelihood (nats) per task; ``logits [T, N, L, V]``, ``target [T, N, L]``."""
    nll = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view_as(target)
    return _per_task(nll, mask)


def normalized_deviation(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """ND = sum |y - ŷ| / sum |y| per task (the forecasting literature's scale-free error)."""
    dims = tuple(range(1, pred.dim()))
    return ((pred - target).abs() * mask).sum(dims) / (target.abs() * mask).sum(dims).clamp_min(1e-12)


def nrmse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """NRMSE = sqrt(mean (y - ŷ)²) / mean |y| per task."""
    return masked_mse(pred, target, mask).sqrt() / _per_task(target.abs(), mask).clamp_min(1e-12)


def bits_per_character(nll_nats: Tensor) -> Tensor:
    return nll_nats / math.log(2.0)
