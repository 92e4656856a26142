"""MAML's meta-gradient against an independent per-task reference, padding invariance, options and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from raytrain import thread_workers
from torch import nn
from torch.func import functional_call

from metalstm import (
    MLP,
    CharLM,
    Forecaster,
    InnerRates,
    MAMLConfig,
    MetaLearner,
    NonFiniteLossError,
    Seq2Seq,
    Split,
    TaskBatch,
    inner_loop,
    multi_step_weights,
)
from metalstm import rnn as rnn_module
from metalstm.models import batched

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# The reference: what learn2learn / higher do, one task at a time over torch.nn modules loaded with the same θ.


class RefForecaster(nn.Module):
    def __init__(self, cell: str, d: int, hidden: int, layers: int, horizon: int) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(d, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


class RefCharLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(tokens))[0])  # right padding never reaches earlier outputs


class RefMLP(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if k < len(self.layers) - 1 else x
        return x


def mse(pred, y, mask):
    return ((pred - y) ** 2 * mask).sum() / mask.sum()


def token_nll(logits, y, mask):
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
    return (nll * mask).sum() / mask.sum()


def reference_meta_gradient(ref: nn.Module, loss_fn, batch: TaskBatch, steps: int, lr: float,
                            first_order: bool) -> dict[str, torch.Tensor]:
    """Per-task loop with torch.func.functional_call and autograd.grad(create_graph=True)."""
    theta = dict(ref.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        s, q = batch.support.select(t), batch.query.select(t)
        fast = dict(theta)
        for _ in range(steps):
            loss = loss_fn(functional_call(ref, fast, (s.x,)), s.y, s.y_mask)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr * (g.detach() if first_order else g) for (n, p), g in zip(fast.items(), grads)}
        total = total + loss_fn(functional_call(ref, fast, (q.x,)), q.y, q.y_mask)
    return dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))


def meta_gradient(learner: MetaLearner, batch: TaskBatch, progress: float = 1.0) -> dict[str, torch.Tensor]:
    out = learner.meta_loss(batch, progress)
    names, params = zip(*learner.model.named_parameters())
    return dict(zip(names, torch.autograd.grad(out.query.sum(), params)))


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert set(want) <= set(got)
    for name, g in want.items():
        assert got[name].abs().max() > 0, f"{name}: zero meta-gradient"
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=rtol * g.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Task batches


def forecast_batch(tasks=3, n=4, length=6, d=2, horizon=3, seed=0, pad_to=None, extra_rows=0) -> TaskBatch:
    """Real windows, optionally padded with garbage steps and all-padding rows that must change nothing."""
    g = torch.Generator().manual_seed(seed)

    def split():
        x = torch.randn(tasks, n, length, d, generator=g, dtype=F64)
        y = torch.randn(tasks, n, horizon, generator=g, dtype=F64)
        return Split(x, y, torch.ones(tasks, n, length, dtype=F64), torch.ones(tasks, n, horizon, dtype=F64))

    batch = TaskBatch(split(), split())
    return pad_batch(batch, pad_to, extra_rows) if pad_to or extra_rows else batch


def pad_batch(batch: TaskBatch, pad_to: int | None, extra_rows: int, seed: int = 99) -> TaskBatch:
    """Right-pad x (and token targets) to ``pad_to`` steps and add ``extra_rows`` all-padding sequences."""
    g = torch.Generator().manual_seed(seed)

    def garbage(like: torch.Tensor, shape) -> torch.Tensor:
        if like.is_floating_point():
            return 50 * torch.randn(shape, generator=g, dtype=like.dtype)
        return torch.randint(1, int(like.max()) + 1, shape, generator=g)

    def pad(t: torch.Tensor, mask: bool, time_dim: int | None) -> torch.Tensor:
        if time_dim is not None and pad_to:
            extra = list(t.shape)
            extra[time_dim] = pad_to - t.shape[time_dim]
            t = torch.cat([t, torch.zeros(extra, dtype=t.dtype) if mask else garbage(t, extra)], time_dim)
        if extra_rows:
            shape = list(t.shape)
            shape[1] = extra_rows
            t = torch.cat([t, torch.zeros(shape, dtype=t.dtype) if mask else garbage(t, shape)], 1)
        return t

    def split(s: Split) -> Split:
        y_time = 2 if s.y.shape == s.x.shape[:3] else None  # token targets are padded along time too
        return Split(pad(s.x, False, 2), pad(s.y, False, y_time), pad(s.x_mask, True, 2), pad(s.y_mask, True, y_time))

    return TaskBatch(split(batch.support), split(batch.query))


def ragged_lm_batch(vocab=7, tasks=3, n=3, length=6, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def split():
        x = torch.randint(1, vocab, (tasks, n, length), generator=g)
        y = torch.randint(1, vocab, (tasks, n, length), generator=g)
        lengths = torch.randint(1, length + 1, (tasks, n), generator=g)
        lengths[:, 0] = length  # the longest sequence fixes the padded length
        mask = (torch.arange(length) < lengths.unsqueeze(-1)).to(F64)
        x, y = x * mask.long(), y * mask.long()  # PAD (0) after each sequence's end
        return Split(x, y, mask, mask.clone())

    return TaskBatch(split(), split())


def mt_batch(src_vocab=9, tgt_vocab=8, tasks=2, n=3, src_len=5, tgt_len=4, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def split():
        x = torch.randint(4, src_vocab, (tasks, n, src_len), generator=g)
        y = torch.randint(4, tgt_vocab, (tasks, n, tgt_len), generator=g)
        xl = torch.randint(2, src_len + 1, (tasks, n), generator=g)
        yl = torch.randint(1, tgt_len + 1, (tasks, n), generator=g)
        xm = (torch.arange(src_len) < xl.unsqueeze(-1)).to(F64)
        ym = (torch.arange(tgt_len) < yl.unsqueeze(-1)).to(F64)
        return Split(x * xm.long(), y * ym.long(), xm, ym)

    return TaskBatch(split(), split())


# ---------------------------------------------------------------------------------------------------------------
# The meta-gradient equals the reference


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("cell,layers,local_bytes", [("lstm", 2, 1 << 40), ("lstm", 2, 0), ("gru", 1, 0)],
                         ids=["lstm-local_derivatives_all_steps_at_once", "lstm-local_derivatives_step_by_step", "gru"])
def test_forecaster_meta_gradient_matches_per_task_reference(cell, layers, local_bytes, first_order, monkeypatch):
    monkeypatch.setattr(rnn_module, "_WHOLE_SEQUENCE_LOCAL_BYTES", local_bytes)
    torch.manual_seed(0)
    model = Forecaster(2, 5, layers, 3, cell=cell).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.3, first_order=first_order))
    ref = RefForecaster(cell, 2, 5, layers, 3).to(F64)
    ref.load_state_dict(model.state_dict(), strict=True)
    batch = forecast_batch()
    want = reference_meta_gradient(ref, mse, batch, steps=2, lr=0.3, first_order=first_order)
    assert_grads_close(meta_gradient(learner, batch), want)


def test_first_and_second_order_differ():
    """Guards the comparison above: the second-order terms are not negligible at this size."""
    torch.manual_seed(0)
    model = Forecaster(2, 5, 1, 3).to(F64)
    batch = forecast_batch()
    g2 = meta_gradient(MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.3)), batch)
    g1 = meta_gradient(MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.3, first_order=True)), batch)
    w = "rnn.weight_hh_l0"
    assert (g2[w] - g1[w]).abs().max() > 1e-3 * g2[w].abs().max()


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_char_lm_meta_gradient_with_padding_matches_reference(first_order):
    torch.manual_seed(1)
    model = CharLM(7, 4, 6, 1).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.5, first_order=first_order))
    ref = RefCharLM(7, 4, 6, 1).to(F64)
    ref.load_state_dict(model.state_dict(), strict=True)
    batch = ragged_lm_batch()
    assert batch.support.x_mask.min() == 0, "the batch must contain padding"
    want = reference_meta_gradient(ref, token_nll, batch, steps=2, lr=0.5, first_order=first_order)
    assert_grads_close(meta_gradient(learner, batch), want)


def test_mlp_meta_gradient_matches_reference():
    torch.manual_seed(2)
    model = MLP([1, 8, 8, 1]).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=3, inner_lr=0.05))
    ref = RefMLP([1, 8, 8, 1]).to(F64)
    ref.load_state_dict(model.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.rand(4, n, 1, generator=g, dtype=F64) * 10 - 5
        return Split(x, torch.sin(x), torch.ones(4, n, dtype=F64), torch.ones(4, n, 1, dtype=F64))

    batch = TaskBatch(split(5), split(7))
    want = reference_meta_gradient(ref, mse, batch, steps=3, lr=0.05, first_order=False)
    assert_grads_close(meta_gradient(learner, batch), want)


def test_task_batched_equals_a_loop_over_tasks():
    torch.manual_seed(3)
    model = Forecaster(2, 5, 1, 3).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.3))
    batch = forecast_batch(tasks=4)
    together = learner.meta_loss(batch)
    per_task = [learner.meta_loss(batch.select(slice(t, t + 1))) for t in range(4)]
    torch.testing.assert_close(together.query_final, torch.cat([p.query_final for p in per_task]),
                               rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    g_together = torch.autograd.grad(together.query.sum(), params)
    g_loop = torch.autograd.grad(sum(p.query.sum() for p in per_task), params)
    for a, b in zip(g_together, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_on_a_tiny_meta_loss():
    torch.manual_seed(4)
    model = Forecaster(1, 2, 1, 1).to(F64)
    batch = forecast_batch(tasks=2, n=2, length=3, d=1, horizon=1)
    batch.support.x_mask[1, 1, 2:] = 0
    names = [n for n, _ in model.named_parameters()]

    def meta_loss(*theta):
        params = {n: p.unsqueeze(0).expand(2, *p.shape) for n, p in zip(names, theta)}
        fast, _ = inner_loop(model, params, batch.support, steps=2, lr=0.5)
        return model.task_loss(fast, batch.query)

    theta = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(meta_loss, theta)


# ---------------------------------------------------------------------------------------------------------------
# Padding never changes losses or gradients


def _loss_and_grads(learner: MetaLearner, batch: TaskBatch):
    out = learner.meta_loss(batch)
    return out.query.detach(), torch.autograd.grad(out.query.sum(), list(learner.model.parameters()))


@pytest.mark.parametrize("family", ["forecast", "lm", "mt"])
def test_padding_never_changes_losses_or_gradients(family):
    torch.manual_seed(5)
    if family == "forecast":
        model, batch = Forecaster(2, 4, 2, 3).to(F64), forecast_batch()
    elif family == "lm":
        model, batch = CharLM(7, 4, 5, 2).to(F64), ragged_lm_batch()
    else:
        model, batch = Seq2Seq(9, 8, 4, 5, 1).to(F64), mt_batch()
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.3))
    padded = pad_batch(batch, pad_to=batch.support.x.shape[2] + 3, extra_rows=2)
    if family == "mt":  # the targets get padded along time too
        padded = TaskBatch(*(pad_target_time(s, 2) for s in (padded.support, padded.query)))
    loss, grads = _loss_and_grads(learner, batch)
    loss_p, grads_p = _loss_and_grads(learner, padded)
    torch.testing.assert_close(loss_p, loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    metrics, metrics_p = learner.evaluate(batch), learner.evaluate(padded)
    for k in metrics:
        torch.testing.assert_close(metrics_p[k], metrics[k], rtol=1e-9, atol=1e-12)


def pad_target_time(s: Split, extra: int) -> Split:
    shape = (*s.y.shape[:2], extra)
    return Split(s.x, torch.cat([s.y, torch.randint(1, 5, shape)], 2), s.x_mask,
                 torch.cat([s.y_mask, torch.zeros(shape, dtype=s.y_mask.dtype)], 2))


# ---------------------------------------------------------------------------------------------------------------
# MAML++ options, adaptation, errors


def test_learned_rates_and_multi_step_loss_give_finite_gradients_to_rates_and_weights():
    torch.manual_seed(6)
    model = Forecaster(2, 4, 1, 3).to(F64)
    cfg = MAMLConfig(inner_steps=3, inner_lr=0.1, learn_inner_lr=True, multi_step_loss=True)
    learner = MetaLearner(model, cfg).to(F64)
    batch = forecast_batch()
    out = learner.meta_loss(batch, progress=0.3)
    out.query.sum().backward()
    assert len(out.support_curve) == 3
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    rates = dict(learner.rates.rates.named_parameters())
    assert set(rates) == {n.replace(".", "__") for n, _ in model.named_parameters()}
    for name, r in rates.items():
        assert r.shape == (3,)
        assert (r.grad != 0).all(), f"{name}: every step's rate must get a gradient, got {r.grad}"


def test_multi_step_loss_weighs_every_step_query_loss():
    torch.manual_seed(7)
    model = Forecaster(2, 4, 1, 3).to(F64)
    batch = forecast_batch()
    multi = MetaLearner(model, MAMLConfig(inner_steps=3, inner_lr=0.1, multi_step_loss=True))
    w = multi_step_weights(3, 0.25)
    losses = [MetaLearner(model, MAMLConfig(inner_steps=k, inner_lr=0.1)).meta_loss(batch).query_final
              for k in (1, 2, 3)]
    expected = sum(wk * lk for wk, lk in zip(w, losses))
    torch.testing.assert_close(multi.meta_loss(batch, progress=0.25).query.detach(), expected)
    # at the end of annealing only the last step counts: plain MAML
    torch.testing.assert_close(multi.meta_loss(batch, progress=1.0).query.detach(), losses[-1])


def test_multi_step_weights():
    assert multi_step_weights(4, 0.0) == pytest.approx([0.25] * 4)
    assert multi_step_weights(4, 1.0) == pytest.approx([0, 0, 0, 1])
    assert multi_step_weights(4, 7.0) == pytest.approx([0, 0, 0, 1])
    for p in (0.0, 0.3, 0.9):
        assert sum(multi_step_weights(5, p)) == pytest.approx(1.0)


def test_inner_rates_reuse_the_last_step_beyond_training():
    rates = InnerRates(["a.b"], steps=2, init=0.1)
    with torch.no_grad():
        rates.rates["a__b"].copy_(torch.tensor([0.1, 0.2]))
    assert rates.rate("a.b", 0).item() == pytest.approx(0.1)
    assert rates.rate("a.b", 5).item() == pytest.approx(0.2)


def test_adapt_returns_detached_fast_weights_and_lowers_the_support_loss():
    torch.manual_seed(8)
    model = Forecaster(2, 6, 1, 3).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=1, inner_lr=0.1, eval_inner_steps=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = forecast_batch()
    with torch.no_grad():  # serving calls it under no_grad
        fast, curve = learner.adapt(batch.support)
    assert len(curve) == 5 and all(c.shape == (3,) for c in curve)
    assert (curve[-1] < curve[0]).all()
    assert all(not p.requires_grad and p.shape[0] == 3 for p in fast.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    # adapted weights differ per task and match the per-task inner loop
    assert not torch.allclose(fast["head.bias"][0], fast["head.bias"][1])
    single, _ = learner.adapt(batch.support.select(slice(1, 2)))
    torch.testing.assert_close(single["head.weight"][0], fast["head.weight"][1])
    metrics = learner.evaluate(batch)
    assert {"pre_mse", "post_mse", "pre_nd", "post_nd", "pre_nrmse", "post_nrmse", "support_curve"} <= set(metrics)
    assert metrics["support_curve"].shape == (3, 5)


def test_non_finite_support_loss_raises_instead_of_producing_nan_weights():
    model = Forecaster(2, 4, 1, 3).to(F64)
    learner = MetaLearner(model, MAMLConfig(inner_steps=2, inner_lr=0.1))
    batch = forecast_batch()
    batch.support.y[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"inner step 0.*task\(s\) \[1\]"):
        learner.meta_loss(batch)
    with pytest.raises(NonFiniteLossError):
        learner.adapt(batch.support)
    # a rate so large that the weights blow up is caught at the step where the loss stops being finite
    huge = MetaLearner(model, MAMLConfig(inner_steps=60, inner_lr=1e6))
    with pytest.raises(NonFiniteLossError, match="inner step"):
        huge.adapt(forecast_batch().support)


def _with(split: Split, **changes) -> Split:
    return Split(**{**split.__dict__, **changes})


@pytest.mark.parametrize("case,match", [
    ("x_rank", r"support\.x: expected shape \[3, 4, \*, 2\], got \[3, 4, 6\]"),
    ("x_features", r"support\.x: expected shape \[3, 4, \*, 2\], got \[3, 4, 6, 5\]"),
    ("y_horizon", r"query\.y: expected shape \[3, 4, 3\], got \[3, 4, 2\]"),
    ("x_dtype", r"support\.x: expected a floating-point tensor, got dtype torch\.int64"),
])
def test_forecaster_rejects_bad_shapes_and_dtypes_naming_the_argument(case, match):
    learner = MetaLearner(Forecaster(2, 4, 1, 3).to(F64), MAMLConfig(inner_steps=1))
    batch = forecast_batch()
    s, q = batch.support, batch.query
    if case == "x_rank":
        s = _with(s, x=s.x[..., 0])
    elif case == "x_features":
        s = _with(s, x=torch.randn(3, 4, 6, 5, dtype=F64))
    elif case == "y_horizon":
        q = _with(q, y=q.y[..., :2])
    else:
        s = _with(s, x=s.x.long())
    with pytest.raises(ValueError, match=match):
        learner.meta_loss(TaskBatch(s, q))


def test_token_models_reject_float_tokens_and_out_of_range_ids():
    lm = MetaLearner(CharLM(7, 4, 5, 1).to(F64), MAMLConfig(inner_steps=1))
    batch = ragged_lm_batch()
    with pytest.raises(ValueError, match=r"support\.x: expected integer token ids"):
        lm.meta_loss(TaskBatch(_with(batch.support, x=batch.support.x.to(F64)), batch.query))
    with pytest.raises(ValueError, match=r"query\.y: token ids must be in \[0, 7\)"):
        lm.meta_loss(TaskBatch(batch.support, _with(batch.query, y=batch.query.y + 7)))
    with pytest.raises(ValueError, match=r"support\.y: expected shape"):
        lm.adapt(_with(batch.support, y=batch.support.y[:, :, :2]))
    mt = MetaLearner(Seq2Seq(9, 8, 4, 5, 1).to(F64), MAMLConfig(inner_steps=1))
    with pytest.raises(ValueError, match=r"support\.y: token ids must be in \[0, 8\)"):
        mt.adapt(_with(mt_batch().support, y=mt_batch().support.y + 8))


def test_maml_config_validation_names_the_field():
    for kwargs, match in [({"inner_steps": -1}, "maml.inner_steps"), ({"inner_lr": 0.0}, "maml.inner_lr"),
                          ({"eval_inner_steps": -2}, "maml.eval_inner_steps")]:
        with pytest.raises(ValueError, match=match):
            MetaLearner(MLP([1, 2, 1]), MAMLConfig(**kwargs))


def test_zero_inner_steps_is_plain_multi_task_training():
    model = Forecaster(2, 4, 1, 3).to(F64)
    batch = forecast_batch()
    out = MetaLearner(model, MAMLConfig(inner_steps=0)).meta_loss(batch)
    torch.testing.assert_close(out.query.detach(), model.task_loss(batched(model, 3), batch.query).detach())
    assert out.support_curve == []


def test_bits_per_character_is_nats_over_ln2():
    model = CharLM(7, 4, 5, 1).to(F64)
    batch = ragged_lm_batch()
    metrics = MetaLearner(model, MAMLConfig(inner_steps=1)).evaluate(batch)
    torch.testing.assert_close(metrics["post_bpc"], metrics["post_nll"] / math.log(2))


# ---------------------------------------------------------------------------------------------------------------
# The meta-step (`metalstm.training.meta_step`): one process, or several summing through an all-reduce


def test_meta_step_data_parallel_equals_one_process():
    """Three "workers" (threads: 3, 2 and no tasks) summing with an all-reduce take the step one process takes on
    the whole batch: the mean query loss's meta-gradient, clipped, learned rates and multi-step loss included."""
    import copy

    from metalstm.training import meta_step

    cfg = MAMLConfig(inner_steps=2, inner_lr=0.1, learn_inner_lr=True, multi_step_loss=True, multi_step_anneal=4)
    torch.manual_seed(0)
    base = MetaLearner(Forecaster(2, 4, 1, 3), cfg).to(F64)
    batch = forecast_batch(tasks=5)

    ref = copy.deepcopy(base)  # by hand: step 2 of 4 annealing steps, mean over the 5 tasks, clip, Adam
    result = ref.meta_loss(batch, progress=1 / 4)
    (result.query.sum() / 5).backward()
    for p in ref.parameters():  # never let two parameters share one grad tensor under the in-place clip
        p.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    torch.optim.Adam(ref.parameters(), lr=0.01).step()

    one = copy.deepcopy(base)
    out = meta_step(one, batch, torch.optim.Adam(one.parameters(), lr=0.01), step=2, grad_clip=0.05)
    assert out["tasks"] == 5 and out["wait_s"] == out["allreduce_s"] == 0.0
    assert out["query_loss"] == pytest.approx(float(result.query_final.sum()), rel=1e-12)
    assert out["support_loss"] == pytest.approx(float(result.support_curve[0].sum()), rel=1e-12)

    parts = [batch.select(slice(0, 3)), batch.select(slice(3, 5)), None]
    learners = [copy.deepcopy(base) for _ in parts]
    outs = thread_workers(parts, lambda r, part, all_reduce: meta_step(
        learners[r], part, torch.optim.Adam(learners[r].parameters(), lr=0.01), step=2, grad_clip=0.05,
        all_reduce=all_reduce))
    for rank, learner in enumerate([one, *learners]):
        if rank:
            assert outs[rank - 1]["tasks"] == 5
            assert outs[rank - 1]["query_loss"] == pytest.approx(out["query_loss"], rel=1e-12)
        for (name, p), q in zip(learner.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, r=rank, n=name: f"{r} {n}: {m}")
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(ref.parameters(), base.parameters()))  # it did move


def test_meta_train_rows_are_batch_means():
    from metalstm.training import meta_train

    torch.manual_seed(0)
    learner = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=1, inner_lr=0.1)).to(F64)
    batch = forecast_batch(tasks=3)
    expected = learner.meta_loss(batch)
    out = meta_train(learner, iter([batch, batch]), 2, torch.optim.Adam(learner.parameters(), lr=0.01))
    assert out["tasks_seen"] == 6 and [r["step"] for r in out["history"]] == [1, 2]
    assert out["history"][0]["query_loss"] == pytest.approx(float(expected.query_final.mean()), rel=1e-12)
    assert out["history"][0]["support_loss"] == pytest.approx(float(expected.support_curve[0].mean()), rel=1e-12)
    assert out["history"][1]["query_loss"] < out["history"][0]["query_loss"]

    plain = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=0)).to(F64)
    rows = meta_train(plain, iter([batch]), 1, torch.optim.Adam(plain.parameters()))["history"]
    assert math.isnan(rows[0]["support_loss"])  # no inner step: no support loss


# ---------------------------------------------------------------------------------------------------------------
# The benchmark (`metalstm bench maml`): it runs, and the two implementations it times agree


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bench_smoke_gradients_agree(cell):
    from metalstm.bench import bench

    out = bench({"cell": cell, "dtype": "float64", "tasks": "3", "hidden": "6", "length": "5", "support": "2",
                 "query": "2", "horizon": "2", "steps": "1,2", "repeats": "1", "warmup": "0",
                 "memory": "1" if cell == "lstm" else "0"})
    assert [(c["order"], c["inner_steps"]) for c in out["cases"]] == [
        ("second", 1), ("first", 1), ("second", 2), ("first", 2)]
    for case in out["cases"]:
        assert case["grads_agree"] and case["grad_max_rel_err"] < 1e-8, case
        assert case["flop_per_meta_step"] > 0 and case["project"]["tasks_per_s"] > 0
        if cell == "lstm":
            assert case["project"]["peak_mem_mb"] > 0 and case["naive"]["peak_mem_mb"] > 0


@pytest.mark.parametrize("options,match", [
    ({"tasks": "0"}, r"bench maml tasks: must be in \[1, 4096\], got 0"),
    ({"steps": "1,x"}, "bench maml steps"),
    ({"orders": "third"}, "bench maml orders"),
    ({"malloc": "jemalloc"}, "bench maml malloc"),
    ({"flux": "1"}, r"unknown option\(s\) \['flux'\]"),
])
def test_bench_rejects_bad_options(options, match):
    from metalstm.bench import bench

    with pytest.raises(ValueError, match=match):
        bench(options)


def test_cli_takes_key_value_options_after_flags(capsys):
    """``metalstm bench maml --json key=value``: items after a flag still reach the benchmark's options."""
    from pipeline.cli import main

    assert main(["bench", "maml", "--json", "flux=1"]) == 2
    assert "unknown option(s) ['flux']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # anything else after the flag is still an error
        main(["bench", "maml", "--json", "--flux"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --flux" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Divergence (issue 19): a non-finite loss or meta-gradient never reaches the optimiser, on any process


@pytest.mark.parametrize("poison", [False, True])
def test_meta_step_skips_on_every_worker_when_one_has_a_nan_loss(poison):
    """Worker 1's query targets are NaN: both workers skip (the check is on the all-reduced tensors), neither
    optimiser steps, θ stays identical and finite; without the NaN both step."""
    import copy

    from metalstm.training import meta_step

    torch.manual_seed(0)
    base = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=1, inner_lr=0.1)).to(F64)
    batch = forecast_batch(tasks=4)
    parts = [batch.select(slice(0, 2)), batch.select(slice(2, 4))]
    if poison:
        parts[1].query.y.fill_(float("nan"))
    learners = [copy.deepcopy(base) for _ in parts]
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in learners]
    outs = thread_workers(parts, lambda r, part, ar: meta_step(learners[r], part, optimizers[r], step=1,
                                                                all_reduce=ar))
    for rank, (out, learner, opt) in enumerate(zip(outs, learners, optimizers)):
        assert out["skipped"] == float(poison) and out["nonfinite_workers"] == float(poison), (rank, out)
        assert bool(opt.state) != poison  # Adam never saw the step
        moved = [not torch.equal(p, q) for p, q in zip(learner.parameters(), base.parameters())]
        assert any(moved) != poison
        assert all(torch.isfinite(p).all() for p in learner.parameters())
    for p, q in zip(learners[0].parameters(), learners[1].parameters()):
        assert torch.equal(p, q)


def test_meta_step_says_whether_theta_or_the_inner_loop_diverged():
    """NaN support data fails at inner step 0 (θ's own loss: not the inner rate); a huge inner rate later."""
    from metalstm.training import meta_step

    learner = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=2, inner_lr=0.1)).to(F64)
    bad = forecast_batch()
    bad.support.x[0, 0, 0, 0] = float("nan")
    out = meta_step(learner, bad, torch.optim.Adam(learner.parameters()), step=1)
    assert out["skipped"] == 1 and out["nonfinite_at_theta"] == 1
    huge = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=2, inner_lr=1e200)).to(F64)
    out = meta_step(huge, forecast_batch(), torch.optim.Adam(huge.parameters()), step=1)
    assert out["skipped"] == 1 and out["nonfinite_at_theta"] == 0


def test_non_finite_error_at_inner_step_0_does_not_blame_the_inner_rate():
    learner = MetaLearner(Forecaster(2, 4, 1, 3).to(F64), MAMLConfig(inner_steps=2, inner_lr=0.1))
    batch = forecast_batch()
    batch.support.y[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        learner.meta_loss(batch)
    assert info.value.inner_step == 0 and "maml.inner_lr" not in str(info.value)


def test_meta_train_raises_before_any_update():
    from metalstm.training import meta_train

    learner = MetaLearner(Forecaster(2, 4, 1, 3), MAMLConfig(inner_steps=1, inner_lr=0.1)).to(F64)
    before = [p.clone() for p in learner.parameters()]
    batch = forecast_batch()
    batch.query.y[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="meta-step 1"):
        meta_train(learner, iter([batch]), 1, torch.optim.Adam(learner.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(learner.parameters(), before))


def test_pretrain_step_skips_a_non_finite_loss_when_asked():
    from metalstm.training import pretrain_step

    model = Forecaster(2, 4, 1, 3).to(F64)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    split = forecast_batch(tasks=1).support
    opt = torch.optim.Adam(model.parameters())
    out = pretrain_step(model, split, opt, skip_nonfinite=True)
    assert out["skipped"] == 1 and not opt.state
    with pytest.raises(NonFiniteLossError, match="lower pretrain.lr"):
        pretrain_step(model, split, opt)
