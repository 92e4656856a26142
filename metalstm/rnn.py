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


def _shared(w: Tensor) -> bool:
    """Whether every task holds the same tensor: θ broadcast to all tasks (stride 0), or a single task."""
    return w.shape[0] == 1 or w.stride(0) == 0


def _step_masks(mask: Tensor | None, length: int) -> tuple[Tensor | None, tuple[bool, ...]]:
    """``mask [T, B, L]`` as a bool ``[T, L, B, 1]`` plus, per step, whether every sequence is real there.

    Steps where every sequence is real (all of them when sequences are right-padded to a common length)
    skip the masking ops entirely; only the ragged tail pays for them.
    """
    if mask is None:
        return None, (True,) * length
    keep = (mask != 0).transpose(1, 2).unsqueeze(-1)
    return keep, tuple(keep.all(dim=(0, 2, 3)).tolist())


def _carry(new: Tensor, old: Tensor, keep: Tensor | None) -> Tensor:
    """The new state on real steps, the old one on padded steps (right-padding never changes a state)."""
    return new if keep is None else torch.where(keep, new, old)


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _rows_matmul(rows: Tensor, w: Tensor) -> Tensor:
    """``rows [T, N, K] @ w`` → ``[T, N, M]``: ``w [T, K, M]`` per task, or ``[K, M]`` shared by all tasks
    (one plain matmul over all T·N rows)."""
    if w.dim() == 2:
        return (rows.reshape(-1, rows.shape[-1]) @ w).view(*rows.shape[:-1], w.shape[-1])
    return torch.bmm(rows, w)


def _one_or_each(w: Tensor, shared: bool) -> Tensor:
    """The matrix every task shares, else the per-task stack. Select once per layer, never per step: in
    double backward each ``w[0]`` would cost a zero tensor the size of all tasks' weights."""
    return w[0] if shared else w


def _gates(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (i, f, g, o) blocks of a ``[..., 4H]`` tensor, as views."""
    return t.chunk(4, dim=-1)


class _LSTMLayer(torch.autograd.Function):
    """One task-batched LSTM layer over all steps, as a single autograd node.

    Outputs, laid out ``[T, L, B, ·]`` (each step one block per task): every step's ``h`` and ``c``, the
    activated gates ``a = (i, f, g, o)``, and two local derivatives that the backward needs at every step:
    ``coef = (g·σ'(i), c_prev·σ'(f), i·tanh'(g), tanh(c)·σ'(o))`` (so that ∂loss/∂pre-activations is
    ``[dc, dc, dc, dh] ⊙ coef``) and ``q = o·tanh'(c)`` (so that ``dc += dh ⊙ q``).

    The backward is the exact vector-Jacobian product written with differentiable torch ops on the saved
    inputs *and outputs* (saved outputs are part of the graph), so autograd differentiates it again for
    second-order MAML. Precomputing ``coef`` and ``q`` in the forward (no graph, in place) leaves the
    backward's recurrence six ops per step, which is what double backward has to differentiate. This
    node exists for speed:

    - the forward records no graph: it writes the gates into the input projection's buffer and the
      states into preallocated outputs;
    - the weight gradients are one ``[L·B, ·]^T @ [L·B, 4H]`` matmul per task (not ``L`` per-step outer
      products summed one by one), the bias gradient one sum, the input gradient one matmul;
    - when all tasks hold the same weights (θ broadcast before the first inner step: stride 0), each step
      is one plain matmul over all ``T·B`` rows. The returned weight gradients are still per task (each
      computed from that task's rows); only the graph recorded for double backward routes through the
      shared matrix, whose gradient reaches θ summed over tasks, exactly as the broadcast's would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
                keep: Tensor | None, real: tuple[bool, ...]) -> tuple[Tensor, ...]:
        t, b, length, d = x.shape
        hidden = w_hh.shape[-1]
        ih_shared = _shared(w_ih) and _shared(b_ih) and _shared(b_hh)
        hh_shared = _shared(w_hh)
        # every step's x @ W_ih^T + b in one matmul, time-major per task; the gates are computed in place here
        x_rows = x.transpose(1, 2).reshape(t, length * b, d)
        acts = _rows_matmul(x_rows, _one_or_each(w_ih.transpose(1, 2), ih_shared)).add_((b_ih + b_hh).unsqueeze(1))
        acts = acts.view(t, length, b, 4 * hidden)
        hs, cs, q = (x.new_empty(t, length, b, hidden) for _ in range(3))
        coef = torch.empty_like(acts)
        w = w_hh[0].t() if hh_shared else w_hh.transpose(1, 2).contiguous()
        steps = zip(acts.unbind(1), coef.unbind(1), hs.unbind(1), cs.unbind(1), q.unbind(1))
        h, c = h0, c0
        for s, (a, k, h_s, c_s, q_s) in enumerate(steps):
            a.add_(_rows_matmul(h, w))  # (in-place baddbmm_ on this view would loop over tasks)
            # one sigmoid over all four gates, with tanh(z) = 2·sigmoid(2z) - 1 for g: tanh on a strided
            # slice is many times slower than sigmoid on the whole contiguous block (CPU, several threads)
            i, f, g, o = _gates(a)
            g.mul_(2)
            a.sigmoid_()
            g.mul_(2).sub_(1)
            torch.mul(f, c, out=c_s).addcmul_(i, g)  # c = f·c_prev + i·g
            tanh_c = torch.tanh(c_s)
            torch.mul(o, tanh_c, out=h_s)  # h = o·tanh(c)
            torch.addcmul(o, h_s, tanh_c, value=-1, out=q_s)  # o·(1 - tanh²c)
            torch.addcmul(a, a, a, value=-1, out=k)  # σ' = σ - σ² (the g block is replaced below)
            k_i, k_f, k_g, k_o = _gates(k)
            k_i.mul_(g)
            k_f.mul_(c)
            torch.addcmul(i, i * g, g, value=-1, out=k_g)  # i·(1 - g²)
            k_o.mul_(tanh_c)
            if not real[s]:  # padded: carry the state; nothing flows through the discarded new one
                m = keep[:, s]
                torch.where(m, c_s, c, out=c_s)
                torch.where(m, h_s, h, out=h_s)
                k.masked_fill_(~m, 0.0)
                q_s.masked_fill_(~m, 0.0)
            h, c = h_s, c_s
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, hs, cs, acts, coef, q, keep)
        ctx.real, ctx.ih_shared, ctx.hh_shared = real, ih_shared, hh_shared
        ctx.set_materialize_grads(False)
        return hs, cs, acts, coef, q

    @staticmethod
    def backward(ctx, d_hs: Tensor | None, d_cs: Tensor | None, d_acts: Tensor | None, d_coef: Tensor | None,
                 d_q: Tensor | None):
        x, w_ih, w_hh, h0, c0, hs, cs, acts, coef, q, keep = ctx.saved_tensors
        t, b, length, d = x.shape
        d_c0 = None
        if d_coef is not None or d_q is not None:  # double backward reached the local derivatives
            d_acts, d_cs, d_c0 = _local_derivatives_vjp(acts, cs, c0, keep, d_coef, d_q, d_acts, d_cs)
        if d_acts is not None:  # through the activations: d(pre-activation) = d(activation)·act'
            i, f, g, o = _gates(acts)
            d_acts = d_acts * torch.cat([i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)], -1)

        def steps(v: Tensor | None) -> tuple[Tensor | None, ...]:
            return (None,) * length if v is None else v.unbind(1)

        d_hs, d_cs, d_acts = steps(d_hs), steps(d_cs), steps(d_acts)
        coef_s, q_s, f_s = coef.unbind(1), q.unbind(1), _gates(acts)[1].unbind(1)
        w = _one_or_each(w_hh, ctx.hh_shared)
        dh = dc = None  # gradients flowing into step s from step s + 1
        dz = [None] * length  # gradients of the pre-activation gates
        for s in reversed(range(length)):
            dh, dc = _plus(d_hs[s], dh), _plus(d_cs[s], dc)
            dh = torch.zeros_like(c0) if dh is None else dh
            dc = dh * q_s[s] if dc is None else torch.addcmul(dc, dh, q_s[s])  # h = o·tanh(c)
            dz_s = torch.cat([dc, dc, dc, dh], -1) * coef_s[s]  # c = f·c_prev + i·g, h = o·tanh(c)
            dz[s] = dz_s if d_acts[s] is None else dz_s + d_acts[s]
            dh_prev, dc_prev = _rows_matmul(dz[s], w), dc * f_s[s]
            if not ctx.real[s]:  # padded: the state was carried (coef and q are 0 there), so is its gradient
                m = keep[:, s]
                dh_prev, dc_prev = dh_prev + torch.where(m, 0.0, dh), torch.where(m, dc_prev, dc)
            dh, dc = dh_prev, dc_prev
        dz = torch.stack(dz, 1)  # [T, L, B, 4H]
        dz_rows = dz.view(t, length * b, -1)
        grads: list[Tensor | None] = [None] * 9
        grads[5], grads[6] = dh, _plus(dc, d_c0)
        if ctx.needs_input_grad[0]:
            grads[0] = _rows_matmul(dz_rows, _one_or_each(w_ih, ctx.ih_shared)).view(t, length, b, d).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            x_rows = x.transpose(1, 2).reshape(t, length * b, d)
            grads[1] = torch.bmm(x_rows.transpose(1, 2), dz_rows).transpose(1, 2)
        if ctx.needs_input_grad[2]:  # Σ_s h_{s-1}^T dz_s: the steps after the first in one matmul, then step 0
            d_w = torch.bmm(hs[:, :-1].flatten(1, 2).transpose(1, 2), dz[:, 1:].flatten(1, 2))
            grads[2] = torch.baddbmm(d_w, h0.transpose(1, 2), dz[:, 0]).transpose(1, 2)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grads[3] = grads[4] = dz_rows.sum(1)
        return tuple(grads)


def _local_derivatives_vjp(acts: Tensor, cs: Tensor, c0: Tensor, keep: Tensor | None, d_coef: Tensor | None,
                           d_q: Tensor | None, d_acts: Tensor | None,
                           d_cs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Fold gradients w.r.t. ``coef`` and ``q`` into gradients w.r.t. the gates, the cells and ``c0``.

    Only double backward gets here. ``coef`` and ``q`` are pointwise in (gates, c, c_prev), so this is
    all steps at once. On padded steps they are the constant 0.
    """
    i, f, g, o = _gates(acts)
    d_coef = torch.zeros_like(acts) if d_coef is None else d_coef
    d_q = torch.zeros_like(cs) if d_q is None else d_q
    if keep is not None:
        d_coef, d_q = torch.where(keep, d_coef, 0.0), torch.where(keep, d_q, 0.0)
    dk_i, dk_f, dk_g, dk_o = _gates(d_coef)
    c_prev = torch.cat([c0.unsqueeze(1), cs[:, :-1]], 1)
    tanh_c = torch.tanh(cs)
    tanh_grad = 1 - tanh_c * tanh_c
    d_gates = torch.cat([
        dk_i * g * (1 - 2 * i) + dk_g * (1 - g * g),  # coef_i = g·i(1-i), coef_g = i(1-g²)
        dk_f * c_prev * (1 - 2 * f),  # coef_f = c_prev·f(1-f)
        dk_i * i * (1 - i) - 2 * dk_g * i * g,
        dk_o * tanh_c * (1 - 2 * o) + d_q * tanh_grad,  # coef_o = tanh(c)·o(1-o), q = o(1-tanh²c)
    ], -1)
    d_c = tanh_grad * (dk_o * o * (1 - o) - 2 * d_q * o * tanh_c)
    d_c_prev = dk_f * f * (1 - f)
    d_c = d_c + torch.cat([d_c_prev[:, 1:], torch.zeros_like(d_c_prev[:, :1])], 1)
    return _plus(d_acts, d_gates), _plus(d_cs, d_c), d_c_prev[:, 0]


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
    (a view of time-major storage) and the final ``(h, c)``, each ``[T, B, H]``.
    """
    t, b, length, _ = x.shape
    hidden = w_hh.shape[-1]
    if state is None:
        h = x.new_zeros(t, b, hidden)
        c = x.new_zeros(t, b, hidden)
    else:
        h, c = state
    keep, real = _step_masks(mask, length)
    hs, cs, *_ = _LSTMLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h, c, keep, real)
    return hs.transpose(1, 2), (hs[:, -1], cs[:, -1])


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
    t, b, length, _ = x.shape
    hidden = w_hh.shape[-1]
    proj = _input_projection(x, w_ih, b_ih)
    h = x.new_zeros(t, b, hidden) if state is None else state[0]
    keep, real = _step_masks(mask, length)
    w_hh_t = w_hh.transpose(1, 2)
    b_hh = b_hh.unsqueeze(1)
    outputs = []
    for s, x_s in enumerate(proj.unbind(2)):  # unbind: its backward is one stack, not a zero tensor per step
        gh = torch.baddbmm(b_hh, h, w_hh_t)
        xr, xz, xn = x_s.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = _carry(n + z * (h - n), h, None if real[s] else keep[:, s])
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
