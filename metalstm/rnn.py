"""Task-batched recurrent layers as plain functions of their weights.

Every weight carries a leading task dimension ``T``: task ``t`` runs with its own fast weights, and
all tasks advance together through batched matmuls. Nothing here calls cuDNN's RNN kernels, so the
whole graph supports double backward (second-order MAML) on CPU and CUDA alike.

Shapes: inputs ``[T, B, L, D]`` (tasks, sequences per task, time, features); masks ``[T, B, L]``
(1 = real step). On padded steps the state is carried unchanged, so right-padding never alters the
outputs at real steps nor the final state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

State = tuple[Tensor, ...]


def _input_projection(x: Tensor, w_ih: Tensor, bias: Tensor) -> Tensor:
    """All time steps' ``x @ W_ih^T + b`` in one batched matmul: ``[T, B, L, G]``."""
    t, b, length, d = x.shape
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(t, b * length, d), w_ih.transpose(1, 2))
    return out.view(t, b, length, -1)


def _steps(proj: Tensor, mask: Tensor | None) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """Per-step views via ``unbind`` (its backward is one ``stack``, not a zero tensor per step)."""
    steps = proj.unbind(2)
    masks = mask.to(proj.dtype).unsqueeze(-1).unbind(2) if mask is not None else (None,) * len(steps)
    return steps, masks


def _carry(new: Tensor, old: Tensor, m: Tensor | None) -> Tensor:
    return new if m is None else old + m * (new - old)


def lstm_layer(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
    mask: Tensor | None = None,
    state: State | None = None,
) -> tuple[Tensor, State]:
    """One LSTM layer in ``torch.nn.LSTM``'s gate order (i, f, g, o).

    ``w_ih: [T, 4H, D]``, ``w_hh: [T, 4H, H]``, biases ``[T, 4H]``. Returns outputs ``[T, B, L, H]``
    and the final ``(h, c)``, each ``[T, B, H]``.
    """
    t, b, _, _ = x.shape
    hidden = w_hh.shape[-1]
    proj = _input_projection(x, w_ih, b_ih + b_hh)
    if state is None:
        h = x.new_zeros(t, b, hidden)
        c = x.new_zeros(t, b, hidden)
    else:
        h, c = state
    w_hh_t = w_hh.transpose(1, 2)
    outputs = []
    for x_t, m in zip(*_steps(proj, mask)):
        gates = torch.baddbmm(x_t, h, w_hh_t)
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        c, h = _carry(c_new, c, m), _carry(h_new, h, m)
        outputs.append(h)
    return torch.stack(outputs, dim=2), (h, c)


def gru_layer(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
    mask: Tensor | None = None,
    state: State | None = None,
) -> tuple[Tensor, State]:
    """One GRU layer in ``torch.nn.GRU``'s gate order (r, z, n); weights ``[T, 3H, ·]``."""
    t, b, _, _ = x.shape
    hidden = w_hh.shape[-1]
    proj = _input_projection(x, w_ih, b_ih)
    h = x.new_zeros(t, b, hidden) if state is None else state[0]
    w_hh_t = w_hh.transpose(1, 2)
    b_hh = b_hh.unsqueeze(1)
    outputs = []
    for x_t, m in zip(*_steps(proj, mask)):
        gh = torch.baddbmm(b_hh, h, w_hh_t)
        xr, xz, xn = x_t.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = _carry(n + z * (h - n), h, m)
        outputs.append(h)
    return torch.stack(outputs, dim=2), (h,)


LAYERS = {"lstm": lstm_layer, "gru": gru_layer}
GATES = {"lstm": 4, "gru": 3}


def rnn_stack(
    cell: str,
    params: Mapping[str, Tensor],
    x: Tensor,
    num_layers: int,
    mask: Tensor | None = None,
    states: list[State] | None = None,
) -> tuple[Tensor, list[State]]:
    """A stack of layers whose weights follow ``torch.nn.LSTM``/``GRU`` names (``weight_ih_l{k}``…)."""
    layer = LAYERS[cell]
    finals = []
    for k in range(num_layers):
        x, final = layer(
            x,
            params[f"weight_ih_l{k}"],
            params[f"weight_hh_l{k}"],
            params[f"bias_ih_l{k}"],
            params[f"bias_hh_l{k}"],
            mask=mask,
            state=None if states is None else states[k],
        )
        finals.append(final)
    return x, finals
