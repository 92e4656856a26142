"""Task-batched recurrent layers as plain functions of their weights.

Every weight carries a leading task dimension ``T``: task ``t`` runs with its own fast weights, and
all tasks advance together through batched matmuls. Nothing here calls cuDNN's RNN kernels, so the
whole graph supports double backward (second-order MAML) on CPU and CUDA alike.

The LSTM layer is MAML's hot path, built for speed: one autograd node (``_LSTMLayer``) with a hand-written
backward, which under ``create_graph`` records itself as a second node (``_LSTMLayerGrad``) with a
hand-written backward of its own, so second-order MAML never replays per-step ops through autograd.
The GRU is plain autograd over per-step ops.

Shapes: inputs ``[T, B, L, D]`` (tasks, sequences per task, time, features); masks ``[T, B, L]``
(1 = real step). On padded steps the state is carried unchanged, so right-padding never alters the
outputs at real steps nor the final state.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from metalstm import kernels

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


def _unit_stride(v: Tensor | None) -> Tensor | None:
    """``v`` with a contiguous last dimension, as the fused kernels read it (gradients often come expanded)."""
    return v if v is None or v.stride(-1) == 1 else v.contiguous()


# A block of gate gradients folded into the weight gradients at once holds at most this many bytes (unless
# recording): large enough for efficient matmuls, small enough to stay in cache and avoid page faults
_BLOCK_BYTES = 4 << 20
# The forward computes the local derivatives (coef, q) of all steps at once after the loop when the gates
# of all steps take at most this many bytes (serving one task: 18 % faster adaptation), step by step in the
# loop otherwise (a 31 MB training batch: 2.5 % faster than at once)
_WHOLE_SEQUENCE_LOCAL_BYTES = 8 << 20


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

    The backward (``_lstm_backward``) is the exact vector-Jacobian product, computed without a graph. When
    autograd must differentiate it (``create_graph``: second-order MAML), it runs as ``_LSTMLayerGrad``,
    whose hand-written backward sends gradients to the saved gates, ``coef``, ``q`` and ``hs``; those
    reach this node's backward again, which folds them in with ``_local_vjp``. For speed:

    - the forward records no graph: per step, one matmul and one fused kernel pass on CPU
      (``metalstm.kernels``; forward and backward each do a step's elementwise work in one pass), or else
      a few in-place ops, into preallocated outputs; ``coef`` and ``q`` are skipped when no backward will
      follow and, with the ops, computed after the loop for all steps at once when the gates are small
      (``_WHOLE_SEQUENCE_LOCAL_BYTES``: per-step calls would cost more than their work), step by step
      otherwise;
    - the weight, bias and input gradients are a few large matmuls over blocks of at most ``_BLOCK_BYTES``
      (``[4H, n·B] @ [n·B, ·]`` per task), not ``L`` per-step outer products summed one by one;
    - when all tasks hold the same weights (θ broadcast before the first inner step: stride 0), each step
      is one plain matmul over all ``T·B`` rows. The returned weight gradients are still per task (each
      computed from that task's rows); only the graph recorded for double backward routes through the
      shared matrix, whose gradient reaches θ summed over tasks, exactly as the broadcast's would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, h0: Tensor, c0: Tensor,
                keep: Tensor | None, real: tuple[bool, ...], backward: bool = True) -> tuple[Tensor, ...]:
        t, b, length, d = x.shape
        hidden = w_hh.shape[-1]
        ih_shared = _shared(w_ih) and _shared(b_ih) and _shared(b_hh)
        hh_shared = _shared(w_hh)
        # every step's x @ W_ih^T + b: the gates are then computed in place in this buffer. The g gate uses
        # tanh(z) = 2·sigmoid(2z) - 1 (one sigmoid over all four gates: tanh on a strided slice is many times
        # slower on CPU), so the g rows of the weights and bias enter doubled
        g_rows = slice(2 * hidden, 3 * hidden)
        bias = b_ih + b_hh
        bias[..., g_rows] *= 2
        if ih_shared:
            x_rows = x.permute(2, 0, 1, 3).reshape(length * t * b, d)
            w_x = w_ih[0].t().clone()
            w_x[:, g_rows] *= 2
            acts = torch.addmm(bias[0], x_rows, w_x).view(length, t, b, 4 * hidden)
        elif d == 1:  # one input feature: each step's projection is an outer product, written time-major in one op
            w_x = w_ih[..., 0].clone()
            w_x[..., g_rows] *= 2
            acts = torch.addcmul(bias[:, None], x.permute(2, 0, 1, 3), w_x[:, None],
                                 out=x.new_empty(length, t, b, 4 * hidden))
        else:  # one batched matmul (each task's rows), then the bias added on the way into the time-major layout
            x_rows = x.transpose(1, 2).reshape(t, length * b, d)
            w_x = w_ih.transpose(1, 2).clone()
            w_x[..., g_rows] *= 2
            proj = torch.bmm(x_rows, w_x).view(t, length, b, 4 * hidden).transpose(0, 1)
            acts = torch.add(proj, bias[:, None], out=x.new_empty(length, t, b, 4 * hidden))
        # no backward will follow (evaluation, serving): the local derivatives are not worth computing
        coef, q = (torch.empty_like(acts), acts.new_empty(length, t, b, hidden)) if backward else (acts, acts)
        hs, cs = x.new_empty(t, length, b, hidden), x.new_empty(t, length, b, hidden)
        # always a copy (the g rows are doubled in place next), whatever the layout of the weights given
        w = (w_hh[0] if hh_shared else w_hh).transpose(-1, -2).clone(memory_format=torch.contiguous_format)
        w[..., g_rows] *= 2
        minus_one, zero = x.new_full((), -1.0), x.new_zeros(())
        # each step's elementwise work in one fused pass where the kernels apply (metalstm.kernels); otherwise as
        # PyTorch ops, with the local derivatives after the loop, all steps at once, when the gates are small
        # (each per-step op would cost more in calls than in work), or step by step while each step is in cache
        fused = kernels.lstm_step(x)
        whole = fused is None and backward and acts.numel() * acts.element_size() <= _WHOLE_SEQUENCE_LOCAL_BYTES
        per_step = fused is None and backward and not whole
        # every step's views made up front: per-step indexing would cost more calls than the tiny steps of
        # serving take to compute
        # (a step's gates as one [T·B, 4H] matrix when the recurrent weights are shared, else [T, B, 4H])
        step_gates = acts.view(length, t * b, 4 * hidden) if hh_shared else acts
        gates = zip(*(v.unbind(0) for v in acts.view(length, t, b, 4, hidden).unbind(3)))
        local = (zip(coef.unbind(0), *(v.unbind(0) for v in coef.view(length, t, b, 4, hidden).unbind(3)))
                 if per_step else itertools.repeat((None,) * 5))
        steps = zip(step_gates.unbind(0), gates, local, q.unbind(0) if backward else itertools.repeat(None),
                    hs.unbind(1), cs.unbind(1))
        h, c = h0, _unit_stride(c0)
        for s, (a, (i, f, g, o), (k, k_i, k_f, k_g, k_o), q_s, h_s, c_s) in enumerate(steps):
            if hh_shared:
                a.addmm_(h.reshape(t * b, hidden), w)
            else:
                a.baddbmm_(h, w)
            if fused is not None:  # the same maths as the ops below, in one pass
                k = coef[s] if backward else c_s
                fused.forward_step(a.view(t, b, 4 * hidden), c, c_s, h_s, k, q_s if backward else c_s, backward)
            else:
                a.sigmoid_()  # the g block now holds s = sigmoid(2z)
                if per_step:  # σ' = σ - σ²; for g, s(1 - s) = (1 - tanh²z)/4
                    torch.addcmul(a, a, a, value=-1, out=k.view_as(a))
                torch.add(minus_one, g, alpha=2, out=g)  # g = 2s - 1 = tanh(z)
                torch.mul(f, c, out=c_s).addcmul_(i, g)  # c = f·c_prev + i·g
                tanh_c = torch.tanh(c_s, out=q_s) if whole else torch.tanh(c_s)  # q keeps tanh(c) for after the loop
                torch.mul(o, tanh_c, out=h_s)  # h = o·tanh(c)
                if per_step:
                    torch.addcmul(o, h_s, tanh_c, value=-1, out=q_s)  # o·(1 - tanh²c)
                    k_i.mul_(g)
                    k_f.mul_(c)
                    torch.addcmul(zero, k_g, i, value=4, out=k_g)  # i·(1 - g²)
                    k_o.mul_(tanh_c)
            if not real[s]:  # padded: carry the state; nothing flows through the discarded new one
                m = keep[s]
                torch.where(m, c_s, c, out=c_s)
                torch.where(m, h_s, h, out=h_s)
                if backward and not whole:  # this step's local derivatives are written (by the kernel or the ops)
                    k.masked_fill_(~m, 0.0)
                    q_s.masked_fill_(~m, 0.0)
            h, c = h_s, c_s
        if whole:
            _local_derivatives(acts, cs, c0, q, coef, keep)
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
        flags = (keep, ctx.real, ctx.ih_shared, ctx.hh_shared, ctx.needs_input_grad[:5])
        if torch.is_grad_enabled():  # create_graph: second-order MAML differentiates this backward
            if d_acts is not None or d_coef is not None or d_q is not None:
                raise RuntimeError("the LSTM layer supports gradients up to second order, not third")
            grads = _LSTMLayerGrad.apply(d_hs, d_cs, d_h_last, d_c_last, x, w_ih, w_hh, h0, c0, hs, acts, coef, q,
                                         *flags)
        else:
            grads = _lstm_backward(x, w_ih, w_hh, h0, c0, hs, cs, acts, coef, q, *flags,
                                   d_hs, d_cs, d_acts, d_coef, d_q, d_h_last, d_c_last)[:6]
        d_x, d_w_ih, d_w_hh, d_b, dh0, dc0 = grads
        # the two biases get equal gradients but never one tensor: autograd may store it as both ``.grad`` s, and an
        # in-place update of one (``clip_grad_norm_``) would then scale the other twice
        d_b_hh = d_b.clone() if d_b is not None else None
        return d_x, d_w_ih, d_w_hh, d_b, d_b_hh, dh0, dc0, None, None, None


def _local_derivatives(acts: Tensor, cs: Tensor, c0: Tensor, q: Tensor, coef: Tensor, keep: Tensor | None) -> None:
    """Every step's ``coef`` and ``q`` at once (in place), from the activated gates, the cells and ``tanh(c)``
    (which ``q`` holds on entry): ten whole-sequence ops instead of six per step."""
    i, f, g, o = acts.unflatten(-1, (4, -1)).unbind(3)
    k_i, k_f, k_g, k_o = coef.unflatten(-1, (4, -1)).unbind(3)
    torch.addcmul(acts, acts, acts, value=-1, out=coef)  # σ' = σ - σ² (the g block is replaced below)
    k_i.mul_(g)  # g·σ'(i)
    k_f[0].mul_(c0)  # c_prev·σ'(f)
    k_f[1:].mul_(cs[:, :-1].transpose(0, 1))
    torch.addcmul(acts.new_ones(()), g, g, value=-1, out=k_g).mul_(i)  # i·(1 - g²)
    k_o.mul_(q)  # tanh(c)·σ'(o)
    torch.addcmul(o, o, q.square(), value=-1, out=q)  # o·(1 - tanh²c)
    if keep is not None:  # padded steps: the state was carried, nothing flows through the gates
        coef.mul_(keep)
        q.mul_(keep)


def _task_rows(v: Tensor) -> Tensor:
    """``[T, L, B, K]`` (or a slice of its steps) as each task's rows ``[T, L·B, K]``, a view."""
    return v.flatten(1, 2)


def _sum_dz_outer_previous(dz: Tensor, first: Tensor | None, rest: Tensor, out: Tensor | None = None,
                           overwrite: bool = False) -> Tensor:
    """``Σ_s dz_sᵀ v_{s-1}`` per task, with ``v_{-1} = first`` (``[T, B, K]``; None: zero) and ``v_s = rest[:, s]``,
    added to ``out`` in place when given, or written over it with ``overwrite`` (no graph is recorded here).

    Two matmuls over views: no copy of ``rest`` shifted by one step."""
    t, length, _, gates = dz.shape
    if out is None:
        out, overwrite = dz.new_empty(t, gates, rest.shape[-1]), True
    if overwrite and length == 1 and first is None:
        return out.zero_()
    beta = 0 if overwrite else 1
    if length > 1:
        out.baddbmm_(_task_rows(dz[:, 1:]).transpose(1, 2), _task_rows(rest[:, :-1]), beta=beta)
        beta = 1
    return out if first is None else out.baddbmm_(dz[:, 0].transpose(1, 2), first, beta=beta)


@torch.no_grad()
def _lstm_backward(x: Tensor, w_ih: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, hs: Tensor, cs: Tensor | None,
                   acts: Tensor, coef: Tensor, q: Tensor, keep: Tensor | None, real: tuple[bool, ...],
                   ih_shared: bool, hh_shared: bool, need: tuple[bool, ...], d_hs: Tensor | None,
                   d_cs: Tensor | None, d_acts: Tensor | None, d_coef: Tensor | None, d_q: Tensor | None,
                   d_h_last: Tensor | None, d_c_last: Tensor | None, record: bool = False) -> tuple:
    """The layer's vector-Jacobian product, recording no graph.

    A reverse-time recurrence of a few ops and one matmul per step; the steps' gate gradients ``dz`` go into
    blocks of at most ``_BLOCK_BYTES``, each folded into the input, weight and bias gradients with a few
    large matmuls. Gradients reaching the saved gates, ``coef`` and ``q`` (the second backward of
    second-order MAML) are folded in step by step by ``_local_vjp``.

    Returns ``(d_x, d_w_ih, d_w_hh, d_b, dh0, dc0, dz, dh, dc)``; the last three only with ``record``, for
    ``_LSTMLayerGrad``: every step's ``dz`` (``[T, L, B, 4H]``), ``dh`` and the ``dc`` that entered ``dz``
    (``[T, L, B, H]``).
    """
    t, b, length, d = x.shape
    hidden = h0.shape[-1]
    need_x, need_w_ih, need_w_hh, need_b_ih, need_b_hh = need
    local = d_acts is not None or d_coef is not None or d_q is not None
    w = w_hh[0] if hh_shared else w_hh
    d_x = x.new_empty(t, length, b, d) if need_x else None
    d_w_hh = x.new_empty(w_hh.shape) if need_w_hh else None
    # W_ih and the bias in one matmul per block: the inputs with a column of ones, [T, L, B, D + 1]
    need_b = need_b_ih or need_b_hh
    x_ones = torch.cat([x.transpose(1, 2), x.new_ones(t, length, b, 1)], -1) if need_w_ih or need_b else None
    # kept transposed, [T, D + 1, 4H]: [x, 1]ᵀ dz is 2-3x faster than dzᵀ [x, 1] for a few input features
    d_w_ih_b_t = x.new_empty(t, d + 1, 4 * hidden) if x_ones is not None else None
    folded = False  # the first block folded (the last steps) writes the weight gradients, the others add to them

    def fold(dz: Tensor, start: int) -> None:
        """Steps ``start …`` into the input, weight and bias gradients: a few large matmuls per block."""
        nonlocal folded
        n, rows = dz.shape[1], _task_rows(dz)
        beta = 1 if folded else 0
        if need_x:
            d_x[:, start:start + n] = torch.matmul(rows, w_ih[0] if ih_shared else w_ih).view(t, n, b, d)
        if d_w_ih_b_t is not None:  # Σ_s [x_s, 1]ᵀ dz_s
            d_w_ih_b_t.baddbmm_(_task_rows(x_ones[:, start:start + n]).transpose(1, 2), rows, beta=beta)
        if need_w_hh and start:  # Σ_s dz_sᵀ h_{s-1}: the block's previous states are one slice of hs
            d_w_hh.baddbmm_(rows.transpose(1, 2), _task_rows(hs[:, start - 1:start + n - 1]), beta=beta)
        elif need_w_hh:  # the first block: h0 before step 0
            _sum_dz_outer_previous(dz, h0, hs[:, :n], out=d_w_hh, overwrite=not folded)
        folded = True

    # dz of blocks of _BLOCK_BYTES (all steps when recording: large fresh buffers cost page faults), written
    # task-major ([T, n, B, 4H]) so that each task's rows of a block are one matrix for the fold
    k4 = coef.view(length, t, b, 4, hidden)
    k_ifg, k_o = k4[..., :3, :].unbind(0), k4[..., 3, :].unbind(0)
    f_gate, q = acts.view(length, t, b, 4, hidden)[..., 1, :].unbind(0), q.unbind(0)
    dz_all = None
    fused = kernels.lstm_step(x)
    block_steps = max(1, _BLOCK_BYTES // (t * b * 4 * hidden * x.element_size()))
    dh_all, dc_all = (x.new_empty(t, length, b, hidden), x.new_empty(t, length, b, hidden)) if record else (None, None)
    block, start = None, length
    dh, dc = d_h_last, d_c_last  # gradients flowing into step s from step s + 1
    for s in reversed(range(length)):
        if block is None:
            start = 0 if record else max(s + 1 - block_steps, 0)
            block = x.new_empty(t, s + 1 - start, b, 4, hidden)
            z_ifg, z_o, z_rows = block[..., :3, :].unbind(1), block[..., 3, :].unbind(1), block.flatten(3).unbind(1)
        m = None if real[s] else keep[s]
        dh = _plus(None if d_hs is None else d_hs[:, s], dh)
        dc = _plus(None if d_cs is None else d_cs[:, s], dc)
        dh = h0.new_zeros(t, b, hidden) if dh is None else dh
        dz = z_rows[s - start]
        if fused is not None and m is None and not local and not record:  # the same maths as below, in one pass
            dc_prev = fused.backward_step(_unit_stride(dh), _unit_stride(dc), q[s], coef[s], f_gate[s], dz)
        else:
            dc = dh * q[s] if dc is None else torch.addcmul(dc, dh, q[s])  # h = o·tanh(c)
            dz_local = dc_prev_local = None
            if local:
                step = (None if g is None else g[s] for g in (d_acts, d_coef, d_q))
                dz_local, dc_local, dc_prev_local = _local_vjp(acts[s], cs[:, s], cs[:, s - 1] if s else c0,
                                                               hs[:, s], m, *step)
                dc += dc_local
            # c = f·c_prev + i·g, h = o·tanh(c): dz = [dc, dc, dc, dh] ⊙ coef
            torch.mul(k_ifg[s], dc.unsqueeze(2), out=z_ifg[s - start])
            torch.mul(k_o[s], dh, out=z_o[s - start])
            if dz_local is not None:
                dz += dz_local
            if record:
                dh_all[:, s], dc_all[:, s] = dh, dc
            dc_prev = dc * f_gate[s]
            if dc_prev_local is not None:
                dc_prev += dc_prev_local
        dh_prev = torch.matmul(dz, w)
        if m is not None:  # padded (ops path only): the state was carried (coef and q are 0 there), so is its gradient
            dh_prev, dc_prev = dh_prev + torch.where(m, 0.0, dh), torch.where(m, dc_prev, dc)
        dh, dc = dh_prev, dc_prev
        if s == start:
            rows = block.flatten(3)  # [T, n, B, 4H]
            fold(rows, start)
            dz_all = rows if record else None
            block = None
    d_x = None if d_x is None else d_x.transpose(1, 2)
    d_w_ih = d_w_ih_b_t[:, :d].transpose(1, 2) if need_w_ih else None
    d_b = d_w_ih_b_t[:, d] if need_b else None
    return d_x, d_w_ih, d_w_hh, d_b, dh, dc, dz_all, dh_all, dc_all


def _local_vjp(a: Tensor, c: Tensor, c_prev: Tensor, h: Tensor, keep: Tensor | None, d_a: Tensor | None,
               d_coef: Tensor | None, d_q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One step's gradients w.r.t. the activated gates ``a``, ``coef`` and ``q``, as gradients w.r.t. the
    pre-activations, ``c`` and ``c_prev``. Only the second backward of second-order MAML gets here.

    With ``coef = (g·σ'(i), c_prev·σ'(f), i·tanh'(g), tanh(c)·σ'(o))``, ``q = o·tanh'(c)``, ``σ' = σ(1-σ)``
    (so ``∂σ'/∂σ = 1 - 2σ``) and ``tanh' = 1 - tanh²``. On padded steps ``coef`` and ``q`` are the constant 0.
    """
    i, f, g, o = _gates(a)
    slope = torch.addcmul(a, a, a, value=-1)  # ∂a/∂z: σ' for i, f, o; the g block is replaced next
    s_i, s_f, s_g, s_o = _gates(slope)
    torch.addcmul(a.new_ones(()), g, g, value=-1, out=s_g)
    d_gates = torch.zeros_like(a) if d_a is None else d_a.clone()  # gradient w.r.t. the activated gates
    dc = dc_prev = torch.zeros_like(c)
    if d_coef is not None or d_q is not None:
        d_coef = torch.zeros_like(a) if d_coef is None else d_coef
        d_q = torch.zeros_like(c) if d_q is None else d_q
        if keep is not None:
            d_coef, d_q = torch.where(keep, d_coef, 0.0), torch.where(keep, d_q, 0.0)
        dk_i, dk_f, dk_g, dk_o = _gates(d_coef)
        tanh_c = torch.tanh(c)
        tanh_grad = torch.addcmul(c.new_ones(()), tanh_c, tanh_c, value=-1)
        u = torch.add(a.new_ones(()), a, alpha=-2).mul_(d_coef)  # dk ⊙ (1 - 2a): the σ' terms' derivative
        u_i, u_f, u_g, u_o = _gates(u)
        u_i.mul_(g).addcmul_(dk_g, s_g)  # coef_i = g·σ'(i), coef_g = i·tanh'(g)
        u_f.mul_(c_prev)  # coef_f = c_prev·σ'(f)
        torch.mul(dk_i, s_i, out=u_g).addcmul_(dk_g, i * g, value=-2)
        u_o.mul_(tanh_c).addcmul_(d_q, tanh_grad)  # coef_o = tanh(c)·σ'(o), q = o·tanh'(c)
        d_gates += u
        dc = (dk_o * s_o).addcmul_(d_q, h, value=-2).mul_(tanh_grad)  # h = o·tanh(c)
        dc_prev = dk_f * s_f
    return d_gates.mul_(slope), dc, dc_prev


class _LSTMLayerGrad(torch.autograd.Function):
    """The LSTM layer's backward as its own node, with a hand-written backward: second-order MAML.

    Its forward is ``_lstm_backward``, a reverse-time recurrence linear in the incoming gradients. Its
    backward is that recurrence's adjoint: a forward-time recurrence of one matmul and a few in-place ops
    per step, plus large matmuls for everything that is not recurrent. Autograd differentiating the
    backward op by op would instead record and replay some thirty small ops per step.

    With ``Z̄``, ``H̄``, ``C̄`` the gradients w.r.t. a step's ``dz``, ``dh`` and ``dc``, and ``P̄h``, ``P̄c``
    those w.r.t. the ``dh_prev``, ``dc_prev`` it passes back (``H̄``, ``C̄`` of the step before; the gradients
    w.r.t. ``dh0``, ``dc0`` at step 0)::

        Z̄ = h_{s-1} W̄_hhᵀ + x_s W̄_ihᵀ + b̄ + x̄_s W_ihᵀ + P̄h W_hhᵀ
        C̄ = P̄c ⊙ f + Σ_{i,f,g} Z̄ ⊙ coef,   H̄ = Z̄_o ⊙ coef_o + C̄ ⊙ q

    (on padded steps ``dc_prev = dc`` and ``dh_prev`` gains ``dh``). The gradients w.r.t. the saved
    gates, ``coef``, ``q`` and ``hs`` go on to ``_LSTMLayer``'s backward, which turns them into gradients
    w.r.t. θ. Third-order gradients are not supported.
    """

    @staticmethod
    def forward(ctx, d_hs: Tensor | None, d_cs: Tensor | None, d_h_last: Tensor | None, d_c_last: Tensor | None,
                x: Tensor, w_ih: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, hs: Tensor, acts: Tensor,
                coef: Tensor, q: Tensor, keep: Tensor | None, real: tuple[bool, ...], ih_shared: bool,
                hh_shared: bool, need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
        out = _lstm_backward(x, w_ih, w_hh, h0, c0, hs, None, acts, coef, q, keep, real, ih_shared, hh_shared, need,
                             d_hs, d_cs, None, None, None, d_h_last, d_c_last, record=True)
        d_x, d_w_ih, d_w_hh, d_b, dh0, dc0, dz, dh, dc = out
        ctx.save_for_backward(x, w_ih, w_hh, h0, hs, acts, coef, q, keep, dz, dh, dc)
        ctx.real, ctx.hh_shared = real, hh_shared
        ctx.set_materialize_grads(False)
        return d_x, d_w_ih, d_w_hh, d_b, dh0, dc0

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dx: Tensor | None, g_dw_ih: Tensor | None, g_dw_hh: Tensor | None, g_db: Tensor | None,
                 g_dh0: Tensor | None, g_dc0: Tensor | None):
        x, w_ih, w_hh, h0, hs, acts, coef, q, keep, dz, dh, dc = ctx.saved_tensors
        t, b, length, d = x.shape
        hidden = h0.shape[-1]
        need = ctx.needs_input_grad
        # Z̄'s terms that are not recurrent: a few large matmuls over all steps, then time-major like ``coef``
        rows, z_rows = _task_rows(dz), x.new_zeros(t, length, b, 4 * hidden)
        if g_db is not None:
            z_rows += g_db[:, None, None, :]
        if g_dw_hh is not None:  # d_w_hh = Σ_s dz_sᵀ h_{s-1}
            g_dw_hh_t = g_dw_hh.transpose(1, 2)
            z_rows[:, 0].baddbmm_(h0, g_dw_hh_t)
            _task_rows(z_rows[:, 1:]).baddbmm_(_task_rows(hs[:, :-1]), g_dw_hh_t)
        if g_dw_ih is not None:  # d_w_ih = Σ_s dz_sᵀ x_s
            _task_rows(z_rows).baddbmm_(x.transpose(1, 2).reshape(t, length * b, d), g_dw_ih.transpose(1, 2))
        g_dx_rows = None if g_dx is None else g_dx.transpose(1, 2).reshape(t, length * b, d)
        if g_dx is not None:  # d_x_s = dz_s W_ih
            _task_rows(z_rows).baddbmm_(g_dx_rows, w_ih.transpose(1, 2))
        z_bar = z_rows.transpose(0, 1).contiguous()
        # the recurrence, forward in time; the gradients w.r.t. the saved coef, q and f gate on the way
        w = w_hh[0].t() if ctx.hh_shared else w_hh.transpose(1, 2).contiguous()
        h_bar, c_bar = x.new_empty(t, length, b, hidden), x.new_empty(t, length, b, hidden)
        coef_bar = torch.empty_like(coef) if need[11] else None
        q_bar = torch.empty_like(q) if need[12] else None
        acts_bar = torch.zeros_like(acts) if need[10] else None
        ph, pc = g_dh0, g_dc0
        for s in range(length):
            zb, hb, cb, dh_s, dc_s = z_bar[s], h_bar[:, s], c_bar[:, s], dh[:, s], dc[:, s]
            if ph is not None:
                if ctx.hh_shared:
                    zb.view(t * b, -1).addmm_(ph.reshape(t * b, hidden), w)
                else:
                    zb.baddbmm_(ph, w)
            z_i, z_f, z_g, z_o = _gates(zb)
            k_i, k_f, k_g, k_o = _gates(coef[s])
            m = None if ctx.real[s] else keep[s]
            f = _gates(acts[s])[1]
            if pc is None:
                torch.mul(z_i, k_i, out=cb)
            else:
                torch.mul(pc, f, out=cb) if m is None else torch.where(m, pc * f, pc, out=cb)
                cb.addcmul_(z_i, k_i)
                if acts_bar is not None:  # dc_prev = dc ⊙ f
                    f_bar = _gates(acts_bar[s])[1]
                    torch.mul(pc, dc_s, out=f_bar)
                    if m is not None:
                        f_bar.masked_fill_(~m, 0.0)
            cb.addcmul_(z_f, k_f).addcmul_(z_g, k_g)
            torch.mul(z_o, k_o, out=hb)
            if m is not None and ph is not None:
                hb += torch.where(m, 0.0, ph)
            hb.addcmul_(cb, q[s])
            if coef_bar is not None:  # dz = [dc, dc, dc, dh] ⊙ coef
                c4, z4 = coef_bar[s].view(t, b, 4, hidden), zb.view(t, b, 4, hidden)
                torch.mul(z4[:, :, :3], dc_s.unsqueeze(2), out=c4[:, :, :3])
                torch.mul(z_o, dh_s, out=c4[:, :, 3])
            if q_bar is not None:  # dc = dc_in + dh ⊙ q
                torch.mul(cb, dh_s, out=q_bar[s])
            ph, pc = hb, cb
        # the gradients of the backward's inputs
        grads: list[Tensor | None] = [None] * 18
        grads[0], grads[1] = (h_bar if need[0] else None), (c_bar if need[1] else None)
        grads[2], grads[3] = (h_bar[:, -1] if need[2] else None), (c_bar[:, -1] if need[3] else None)
        if need[4] and g_dw_ih is not None:  # d_w_ih = Σ_s dz_sᵀ x_s
            grads[4] = torch.bmm(rows, g_dw_ih).view(t, length, b, d).transpose(1, 2)
        if need[5] and g_dx is not None:  # d_x_s = dz_s W_ih
            grads[5] = torch.bmm(rows.transpose(1, 2), g_dx_rows)
        if need[6]:  # dh_prev = dz W_hh
            grads[6] = _sum_dz_outer_previous(dz, g_dh0, h_bar)
        if (need[7] or need[9]) and g_dw_hh is not None:  # d_w_hh = Σ_s dz_sᵀ h_{s-1}
            grads[7] = torch.bmm(dz[:, 0], g_dw_hh)
            hs_bar = grads[9] = x.new_zeros(t, length, b, hidden)
            if length > 1:
                _task_rows(hs_bar[:, :-1]).baddbmm_(_task_rows(dz[:, 1:]), g_dw_hh)
        grads[10], grads[11], grads[12] = acts_bar, coef_bar, q_bar
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
    backward = torch.is_grad_enabled() and any(v.requires_grad for v in (x, w_ih, w_hh, b_ih, b_hh, h, c))
    hs, _, _, _, _, h, c = _LSTMLayer.apply(x, w_ih, w_hh, b_ih, b_hh, h, c, keep, real, backward)
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
