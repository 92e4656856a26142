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


def _rows_matmul(rows: Tensor, w: Tensor, shared: bool) -> Tensor:
    """``rows [T, N, K] @ w [T, K, M]`` → ``[T, N, M]``; one plain matmul over all T·N rows when shared."""
    if shared:
        return (rows.reshape(-1, rows.shape[-1]) @ w[0]).view(*rows.shape[:-1], w.shape[-1])
    return torch.bmm(rows, w)


class _LSTMLayer(torch.autograd.Function):
    """One task-batched LSTM layer over all steps, as a single autograd node.

    Outputs every step's ``h``, ``c`` and activated gates ``(i, f, g, o)``, laid out ``[T, L, B, ·]``
    (each step one block per task). The backward is the exact vector-Jacobian product written with
    differentiable torch ops on the saved inputs *and outputs* (saved outputs are part of the graph), so
    autograd differentiates it again for second-order MAML. It exists for speed:

    - the forward records no graph: it writes the gates into the input projection's buffer and the
      states into preallocated outputs, a handful of in-place ops per step;
    - the weight gradients are one ``[L·B, ·]^T @ [L·B, 4H]`` matmul per task (not ``L`` per-step outer
      products summed one by one), the bias gradient one sum, the input gradient one matmul;
    - when all tasks hold the same weights (θ broadcast before the first inner step: stride 0), each step
      is one plain matmul over all ``T·B`` rows. The returned weight gradients are still per task (each
      computed from that task's rows); only the graph recorded for double backward routes through the
      shared matrix, whose gradient reaches θ summed over tasks, exactly as the broadcast's would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
                keep: Tensor | None, real: tuple[bool, ...]) -> tuple[Tensor, Tensor, Tensor]:
        t, b, length, d = x.shape
        hidden = w_hh.shape[-1]
        ih_shared = _shared(w_ih) and _shared(b_ih) and _shared(b_hh)
        hh_shared = _shared(w_hh)
        # every step's x @ W_ih^T + b in one matmul, time-major per task; the gates are computed in place here
        acts = _rows_matmul(x.transpose(1, 2).reshape(t, length * b, d), w_ih.transpose(1, 2), ih_shared)
        acts = acts.add_((b_ih + b_hh).unsqueeze(1)).view(t, length, b, 4 * hidden)
        hs, cs = x.new_empty(t, length, b, hidden), x.new_empty(t, length, b, hidden)
        w = w_hh.transpose(1, 2) if hh_shared else w_hh.transpose(1, 2).contiguous()
        gate_g = slice(2 * hidden, 3 * hidden)
        h, c = h0, c0
        for s in range(length):
            a = acts[:, s].add_(_rows_matmul(h, w, hh_shared))  # (in-place baddbmm_ on this view loops over tasks)
            # one sigmoid over all four gates, with tanh(z) = 2·sigmoid(2z) - 1 for g: tanh on a strided
            # slice is many times slower than sigmoid on the whole contiguous block (CPU, several threads)
            a[..., gate_g].mul_(2)
            a.sigmoid_()
            a[..., gate_g].mul_(2).sub_(1)
            i, f, g, o = a.chunk(4, dim=-1)
            h_s, c_s = hs[:, s], cs[:, s]
            torch.mul(f, c, out=c_s).addcmul_(i, g)  # c = f·c_prev + i·g
            torch.tanh(c_s, out=h_s).mul_(o)  # h = o·tanh(c)
            if not real[s]:
                torch.where(keep[:, s], c_s, c, out=c_s)
                torch.where(keep[:, s], h_s, h, out=h_s)
            h, c = h_s, c_s
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, hs, cs, acts, keep)
        ctx.real, ctx.ih_shared, ctx.hh_shared = real, ih_shared, hh_shared
        ctx.set_materialize_grads(False)
        return hs, cs, acts

    @staticmethod
    def backward(ctx, d_hs: Tensor | None, d_cs: Tensor | None, d_acts: Tensor | None):
        x, w_ih, w_hh, h0, c0, hs, cs, acts, keep = ctx.saved_tensors
        t, b, length, d = x.shape

        def steps(v: Tensor | None) -> tuple[Tensor | None, ...]:
            return (None,) * length if v is None else v.unbind(1)

        d_hs, d_cs, d_acts, cs_s, acts_s = steps(d_hs), steps(d_cs), steps(d_acts), cs.unbind(1), acts.unbind(1)
        one = cs.new_ones(())
        dh = dc = None  # gradients flowing into step s from step s + 1
        dz = [None] * length  # gradients of the pre-activation gates
        for s in reversed(range(length)):
            a = acts_s[s]
            i, f, g, o = a.chunk(4, dim=-1)
            c_prev = cs_s[s - 1] if s > 0 else c0
            dh, dc = _plus(d_hs[s], dh), _plus(d_cs[s], dc)
            dh_keep = dc_keep = None  # on padded steps the state was carried: its gradient passes through
            if not ctx.real[s]:
                m = keep[:, s]
                dh, dh_keep = (None, None) if dh is None else (torch.where(m, dh, 0.0), torch.where(m, 0.0, dh))
                dc, dc_keep = (None, None) if dc is None else (torch.where(m, dc, 0.0), torch.where(m, 0.0, dc))
            dh = torch.zeros_like(c0) if dh is None else dh
            tanh_c = torch.tanh(cs_s[s])
            dh_o = dh * o  # h = o·tanh(c)
            dc = dh_o * torch.addcmul(one, tanh_c, tanh_c, value=-1) if dc is None else \
                torch.addcmul(dc, dh_o, torch.addcmul(one, tanh_c, tanh_c, value=-1))
            # c = f·c_prev + i·g: d(i, f, g, o) = (dc·g, dc·c_prev, dc·i, dh·tanh c), times each activation's
            # derivative (σ' = σ - σ², tanh' = 1 - tanh²); whole 4H-wide ops, few and cheap
            sig_grad = torch.addcmul(a, a, a, value=-1).chunk(4, dim=-1)
            act_grad = torch.cat([sig_grad[0], sig_grad[1], torch.addcmul(one, g, g, value=-1), sig_grad[3]], -1)
            dz_s = torch.cat([dc, dc, dc, dh], -1) * torch.cat([g, c_prev, i, tanh_c], -1) * act_grad
            if d_acts[s] is not None:  # the activated gates are outputs too (double backward reaches them)
                dz_s = torch.addcmul(dz_s, d_acts[s], act_grad)
            dz[s] = dz_s
            dh = _plus(_rows_matmul(dz_s, w_hh, ctx.hh_shared), dh_keep)
            dc = _plus(dc * f, dc_keep)
        dz = torch.stack(dz, 1)  # [T, L, B, 4H]
        dz_rows = dz.view(t, length * b, -1)
        grads: list[Tensor | None] = [None] * 9
        grads[5], grads[6] = dh, dc
        if ctx.needs_input_grad[0]:
            grads[0] = _rows_matmul(dz_rows, w_ih, ctx.ih_shared).view(t, length, b, d).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            x_rows = x.transpose(1, 2).reshape(t, length * b, d)
            grads[1] = torch.bmm(x_rows.transpose(1, 2), dz_rows).transpose(1, 2)
        if ctx.needs_input_grad[2]:  # Σ_s h_{s-1}^T dz_s: the steps after the first in one matmul, then step 0
            d_w = torch.bmm(hs[:, :-1].flatten(1, 2).transpose(1, 2), dz[:, 1:].flatten(1, 2))
            grads[2] = torch.baddbmm(d_w, h0.transpose(1, 2), dz[:, 0]).transpose(1, 2)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grads[3] = grads[4] = dz_rows.sum(1)
        return tuple(grads)


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
    hs, cs, _ = _LSTMLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h, c, keep, real)
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
