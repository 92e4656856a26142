"""Task-batched recurrent layers as plain functions of their weights.

Every weight carries a leading task dimension ``T``: task ``t`` runs with its own fast weights, and
all tasks advance together through batched matmuls. Nothing here calls cuDNN's RNN kernels, so the
whole graph supports double backward (second-order MAML) on CPU and CUDA alike.

The LSTM layer is one autograd node (``_LSTMLayer``) whose backward is itself written in differentiable
ops: MAML's hot path, built for speed. The GRU is plain autograd over per-step ops.

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
    """``mask [T, B, L]`` as a bool ``[L, T, B, 1]`` plus, per step, whether every sequence is real there.

    Steps where every sequence is real (all of them when sequences are right-padded to a common length)
    skip the masking ops entirely; only the ragged tail pays for them.
    """
    if mask is None:
        return None, (True,) * length
    keep = (mask != 0).permute(2, 0, 1).unsqueeze(-1)
    real = tuple(keep.all(dim=(1, 2, 3)).tolist())
    return (None, real) if all(real) else (keep, real)


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


def _matmul_acc(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` (batched) in one fused op; in place unless autograd is recording (create_graph)."""
    if acc is None:
        return torch.bmm(a, b)
    return torch.baddbmm(acc, a, b) if torch.is_grad_enabled() else acc.baddbmm_(a, b)


def _one_or_each(w: Tensor, shared: bool) -> Tensor:
    """The matrix every task shares, else the per-task stack. Select once per layer, never per step: in
    double backward each ``w[0]`` would cost a zero tensor the size of all tasks' weights."""
    return w[0] if shared else w


_BLOCK = 8  # steps whose gate gradients the LSTM backward folds into the weight gradients at once


def _gates(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (i, f, g, o) blocks of a ``[..., 4H]`` tensor, as views."""
    return t.chunk(4, dim=-1)


class _LSTMLayer(torch.autograd.Function):
    """One task-batched LSTM layer over all steps, as a single autograd node.

    Outputs: every step's ``h`` and ``c`` (``[T, L, B, H]``: each task's rows form one matrix for the
    weight gradients), the activated gates ``a = (i, f, g, o)`` and two local derivatives the backward
    needs at every step (``[L, T, B, ·]``: each step one contiguous block), and the final ``h``, ``c``:

    - ``coef = (g·σ'(i), c_prev·σ'(f), i·tanh'(g), tanh(c)·σ'(o))``, so that ∂/∂(pre-activations) is
      ``[dc, dc, dc, dh] ⊙ coef``;
    - ``q = o·tanh'(c)``, so that ``dc += dh ⊙ q``.

    The backward is the exact vector-Jacobian product written with differentiable torch ops on the saved
    inputs *and outputs* (saved outputs are part of the graph), so autograd differentiates it again for
    second-order MAML; gradients reaching ``coef`` and ``q`` that way are folded back by ``_local_vjp``.
    Everything here is for speed on top of plain autograd:

    - the forward records no graph: a few in-place ops per step into preallocated outputs, ``coef`` and
      ``q`` included, which leaves the backward's recurrence (what double backward differentiates) at
      six ops per step;
    - the weight, bias and input gradients are a few large matmuls over blocks of ``_BLOCK`` steps
      (``[4H, n·B] @ [n·B, ·]`` per task), not ``L`` per-step outer products summed one by one;
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
        # every step's x @ W_ih^T + b: the gates are then computed in place in this buffer
        if ih_shared:
            x_rows = x.permute(2, 0, 1, 3).reshape(length * t * b, d)
            acts = torch.addmm(b_ih[0] + b_hh[0], x_rows, w_ih[0].t()).view(length, t, b, 4 * hidden)
        else:  # one batched matmul (each task's rows), then the bias added on the way into the time-major layout
            x_rows = x.transpose(1, 2).reshape(t, length * b, d)
            proj = torch.bmm(x_rows, w_ih.transpose(1, 2)).view(t, length, b, 4 * hidden).transpose(0, 1)
            acts = torch.add(proj, (b_ih + b_hh)[:, None], out=x.new_empty(length, t, b, 4 * hidden))
        coef, q = torch.empty_like(acts), acts.new_empty(length, t, b, hidden)
        hs, cs = x.new_empty(t, length, b, hidden), x.new_empty(t, length, b, hidden)
        w = w_hh[0].t() if hh_shared else w_hh.transpose(1, 2).contiguous()
        steps = zip(acts.unbind(0), coef.unbind(0), q.unbind(0), hs.unbind(1), cs.unbind(1))
        h, c = h0, c0
        for s, (a, k, q_s, h_s, c_s) in enumerate(steps):
            if hh_shared:
                a.view(t * b, -1).addmm_(h.reshape(t * b, hidden), w)
            else:
                a.baddbmm_(h, w)
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
                m = keep[s]
                torch.where(m, c_s, c, out=c_s)
                torch.where(m, h_s, h, out=h_s)
                k.masked_fill_(~m, 0.0)
                q_s.masked_fill_(~m, 0.0)
            h, c = h_s, c_s
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, hs, cs, acts, coef, q, keep)
        ctx.real, ctx.ih_shared, ctx.hh_shared = real, ih_shared, hh_shared
        ctx.set_materialize_grads(False)
        # the final state again as its own outputs: a caller that uses only it (a forecaster) sends no gradient
        # through ``hs`` and ``cs``, so the backward never adds all-zero per-step gradients
        return hs, cs, acts, coef, q, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, d_hs: Tensor | None, d_cs: Tensor | None, d_acts: Tensor | None, d_coef: Tensor | None,
                 d_q: Tensor | None, d_h_last: Tensor | None, d_c_last: Tensor | None):
        x, w_ih, w_hh, h0, c0, hs, cs, acts, coef, q, keep = ctx.saved_tensors
        t, b, length, d = x.shape

        def steps(v: Tensor | None, dim: int) -> tuple[Tensor | None, ...]:
            return (None,) * length if v is None else v.unbind(dim)

        d_hs, d_cs = steps(d_hs, 1), steps(d_cs, 1)
        d_acts, d_coef, d_q = steps(d_acts, 0), steps(d_coef, 0), steps(d_q, 0)
        acts_s, cs_s, coef_s, q_s = acts.unbind(0), cs.unbind(1), coef.unbind(0), q.unbind(0)
        w = _one_or_each(w_hh, ctx.hh_shared)
        dh, dc = d_h_last, d_c_last  # gradients flowing into step s from step s + 1
        need_x, need_w_ih, need_w_hh = ctx.needs_input_grad[:3]
        need_b = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        x_steps, w_x = x.transpose(1, 2), _one_or_each(w_ih, ctx.ih_shared)
        d_x, d_w_ih, d_w_hh, d_b = [], None, None, None
        pending = []  # gradients of the pre-activation gates (dz) of the steps not yet folded in, latest first
        for s in reversed(range(length)):
            a, c_prev = acts_s[s], cs_s[s - 1] if s > 0 else c0
            m = None if ctx.real[s] else keep[s]
            dh, dc = _plus(d_hs[s], dh), _plus(d_cs[s], dc)
            d_a, dc_prev = d_acts[s], None  # gradients w.r.t. the activated gates and c_prev, beyond the state path
            if d_coef[s] is not None or d_q[s] is not None:  # only in double backward
                d_a_local, dc_local, dc_prev = _local_vjp(a, cs_s[s], c_prev, m, d_coef[s], d_q[s])
                d_a, dc = _plus(d_a, d_a_local), _plus(dc, dc_local)
            dh = torch.zeros_like(c0) if dh is None else dh
            dc = dh * q_s[s] if dc is None else torch.addcmul(dc, dh, q_s[s])  # h = o·tanh(c)
            dz = torch.cat([dc, dc, dc, dh], -1) * coef_s[s]  # c = f·c_prev + i·g, h = o·tanh(c)
            if d_a is not None:
                i, f, g, o = _gates(a)
                dz = torch.addcmul(dz, d_a, torch.cat([i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)], -1))
            pending.append(dz)
            dh_prev, dc_prev = _rows_matmul(dz, w), _plus(dc * _gates(a)[1], dc_prev)
            if m is not None:  # padded: the state was carried (coef and q are 0 there), so is its gradient
                dh_prev, dc_prev = dh_prev + torch.where(m, 0.0, dh), torch.where(m, dc_prev, dc)
            dh, dc = dh_prev, dc_prev
            if len(pending) == _BLOCK or s == 0:
                # fold steps s .. s+n-1 into the weight, bias and input gradients: a few large matmuls, and
                # never a buffer of every step's dz (large fresh allocations cost page faults on CPU)
                n, rows = len(pending), torch.stack(pending[::-1], 1).flatten(1, 2)  # [T, n·B, 4H]
                pending = []
                if need_x:
                    d_x.append(_rows_matmul(rows, w_x).view(t, n, b, d))
                if need_w_ih:
                    d_w_ih = _matmul_acc(d_w_ih, rows.transpose(1, 2), x_steps[:, s:s + n].reshape(t, n * b, d))
                if need_w_hh:  # Σ_s dz_s^T h_{s-1}
                    h_prev = hs[:, s - 1:s + n - 1] if s > 0 else torch.cat([h0.unsqueeze(1), hs[:, :n - 1]], 1)
                    d_w_hh = _matmul_acc(d_w_hh, rows.transpose(1, 2), h_prev.flatten(1, 2))
                if need_b:
                    d_b = _plus(d_b, rows.sum(1))
        d_x = torch.cat(d_x[::-1], 1).transpose(1, 2) if need_x else None
        return d_x, d_w_ih, d_w_hh, d_b, d_b, dh, dc, None, None


def _local_vjp(a: Tensor, c: Tensor, c_prev: Tensor, keep: Tensor | None, d_coef: Tensor | None,
               d_q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One step's gradients w.r.t. ``coef`` and ``q`` as gradients w.r.t. the gates, ``c`` and ``c_prev``.

    Only double backward gets here. On padded steps ``coef`` and ``q`` are the constant 0.
    """
    i, f, g, o = _gates(a)
    d_coef = torch.zeros_like(a) if d_coef is None else d_coef
    d_q = torch.zeros_like(c) if d_q is None else d_q
    if keep is not None:
        d_coef, d_q = torch.where(keep, d_coef, 0.0), torch.where(keep, d_q, 0.0)
    dk_i, dk_f, dk_g, dk_o = _gates(d_coef)
    tanh_c = torch.tanh(c)
    tanh_grad = 1 - tanh_c * tanh_c
    d_gates = torch.cat([
        dk_i * g * (1 - 2 * i) + dk_g * (1 - g * g),  # coef_i = g·i(1-i), coef_g = i(1-g²)
        dk_f * c_prev * (1 - 2 * f),  # coef_f = c_prev·f(1-f)
        dk_i * i * (1 - i) - 2 * dk_g * i * g,
        dk_o * tanh_c * (1 - 2 * o) + d_q * tanh_grad,  # coef_o = tanh(c)·o(1-o), q = o(1-tanh²c)
    ], -1)
    d_c = tanh_grad * (dk_o * o * (1 - o) - 2 * d_q * o * tanh_c)
    return d_gates, d_c, dk_f * f * (1 - f)


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
    hs, _, _, _, _, h, c = _LSTMLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h, c, keep, real)
    return hs.transpose(1, 2), (h, c)


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
        h = _carry(n + z * (h - n), h, None if real[s] else keep[s])
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
