"""Models, losses, collate and the checkpoint format."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from metalstm import (
    BOS,
    EOS,
    MLP,
    PAD,
    CharLM,
    Forecaster,
    MAMLConfig,
    MetaLearner,
    ModelConfig,
    Seq2Seq,
    Split,
    build_model,
    collate,
    learner_from_checkpoint,
    load_checkpoint,
    losses,
    save_checkpoint,
)
from metalstm import checkpoint as checkpoint_module
from metalstm.decoding import predict
from metalstm.models import batched
from metalstm.training import fit

F64 = torch.float64


def noisy_params(model: torch.nn.Module, tasks: int, scale: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in batched(model, tasks).items()}


# ---------------------------------------------------------------------------------------------------------------
# collate


def test_collate_pads_ragged_tasks_and_builds_masks():
    tasks = [
        {"support_x": [[1, 2, 3], [4]], "support_y": [[2, 3, 3], [5]],
         "query_x": [[7, 8]], "query_y": [[8, 9]]},
        {"support_x": [[5, 6]], "support_y": [[6, 7]],
         "query_x": [[1], [2, 3, 4, 5]], "query_y": [[2], [3, 4, 5, 6]]},
    ]
    batch = collate(tasks)
    s, q = batch.support, batch.query
    assert batch.num_tasks == 2
    assert s.x.shape == (2, 2, 3) and s.x.dtype == torch.int64
    assert q.x.shape == (2, 2, 4)
    assert s.x_mask.tolist() == [[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]]]  # task 1 has one sequence
    assert s.x[0, 1].tolist() == [4, PAD, PAD]
    assert torch.equal(s.y_mask, s.x_mask)
    assert q.x_mask.tolist() == [[[1, 1, 0, 0], [0, 0, 0, 0]], [[1, 0, 0, 0], [1, 1, 1, 1]]]


def test_collate_real_valued_steps_and_fixed_size_targets():
    rng = np.random.default_rng(0)
    tasks = [{"support_x": [rng.normal(size=(5, 3)), rng.normal(size=(4, 3))], "support_y": [rng.normal(size=2)] * 2,
              "query_x": [rng.normal(size=(5, 3))], "query_y": [rng.normal(size=2)]} for _ in range(3)]
    batch = collate(tasks)
    assert batch.support.x.shape == (3, 2, 5, 3) and batch.support.x.dtype == torch.float32
    assert batch.support.x_mask[:, 1].tolist() == [[1, 1, 1, 1, 0]] * 3
    assert batch.support.y.shape == (3, 2, 2) and batch.support.y_mask.shape == (3, 2, 2)
    assert batch.support.y_mask.min() == 1
    torch.testing.assert_close(batch.support.x[2, 0].double(), torch.from_numpy(tasks[2]["support_x"][0]))
    moved = batch.to("cpu", F64)
    assert moved.support.x.dtype == F64 and moved.support.x_mask.dtype == F64


def test_collate_per_step_targets_get_a_per_feature_mask():
    tasks = [{"support_x": [np.ones((3, 2))], "support_y": [np.ones((3, 2))],
              "query_x": [np.ones((2, 2))], "query_y": [np.ones((2, 2))]},
             {"support_x": [np.ones((1, 2))], "support_y": [np.ones((1, 2))],
              "query_x": [np.ones((2, 2))], "query_y": [np.ones((2, 2))]}]
    batch = collate(tasks)
    assert batch.support.y_mask.shape == batch.support.y.shape == (2, 1, 3, 2)
    assert batch.support.y_mask[1, 0, :, 0].tolist() == [1, 0, 0]


@pytest.mark.parametrize("tasks,match", [
    ([], "tasks: need at least one task"),
    ([{"support_x": [[1]], "support_y": [[1]], "query_x": [[1]]}], "query_y: missing from task 0"),
    ([{"support_x": [], "support_y": [[1]], "query_x": [[1]], "query_y": [[1]]}],
     r"support_x: task 0 has no sequences"),
    ([{"support_x": [np.ones((2, 3)), np.ones((2, 4))], "support_y": [[1.0], [1.0]], "query_x": [np.ones((2, 3))],
       "query_y": [[1.0]]}], r"support_x: task 0 sequence 1 has feature shape \(4,\), expected \(3,\)"),
])
def test_collate_errors_name_the_field(tasks, match):
    with pytest.raises(ValueError, match=match):
        collate(tasks)


# ---------------------------------------------------------------------------------------------------------------
# losses and metrics


def test_losses_ignore_padding_and_match_hand_computed_values():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 100.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[2.0, 2.0], [1.0, -7.0]], [[1.0, -1.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(losses.masked_mse(pred, target, mask), torch.tensor([(1 + 0 + 4) / 3, 1.0]))
    torch.testing.assert_close(losses.normalized_deviation(pred, target, mask), torch.tensor([3 / 5, 1.0]))
    torch.testing.assert_close(losses.nrmse(pred, target, mask),
                               torch.tensor([math.sqrt(5 / 3) / (5 / 3), 1.0]))
    logits = torch.randn(2, 1, 3, 5)
    tokens = torch.tensor([[[1, 2, 3]], [[4, 0, 0]]])
    tmask = torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])
    nll = -torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(losses.masked_cross_entropy(logits, tokens, tmask),
                               torch.stack([nll[0].mean(), nll[1, 0, 0]]))
    torch.testing.assert_close(losses.bits_per_character(torch.tensor([math.log(2.0)])), torch.tensor([1.0]))


def test_forecaster_metrics():
    torch.manual_seed(0)
    model = Forecaster(1, 4, 1, 2)
    x = torch.randn(2, 3, 5, 1)
    split = Split(x, torch.randn(2, 3, 2), torch.ones(2, 3, 5), torch.ones(2, 3, 2))
    params = batched(model, 2)
    metrics = model.metrics(params, split)
    pred = model(params, x, split.x_mask)
    assert set(metrics) == {"mse", "nd", "nrmse"} and all(v.shape == (2,) for v in metrics.values())
    want_nd = (pred - split.y).abs().sum((1, 2)) / split.y.abs().sum((1, 2))
    torch.testing.assert_close(metrics["nd"], want_nd)


def test_forecaster_on_a_seasonal_naive_base_starts_as_the_baseline_and_learns_a_correction():
    from metalstm.models import seasonal_naive

    torch.manual_seed(0)
    model = Forecaster(1, 4, 1, 3, base_season=2, loss="l1")
    x = torch.randn(2, 3, 6, 1)
    mask = torch.ones(2, 3, 6)
    mask[1, 2] = 0  # a padding row (a task with fewer windows) must not trip the season check
    split = Split(x, torch.randn(2, 3, 3), mask, mask[..., :3].clone())
    params = {n: p.clone().requires_grad_(True) for n, p in batched(model, 2).items()}
    torch.testing.assert_close(model(params, x, mask), seasonal_naive(x, mask, 3, 2))  # zero head: the baseline
    loss = model.task_loss(params, split)
    want = ((model(params, x, mask) - split.y).abs() * split.y_mask).sum((1, 2)) / split.y_mask.sum((1, 2))
    torch.testing.assert_close(loss, want)
    grads = torch.autograd.grad(loss.sum(), list(params.values()), allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)  # the correction head learns
    built = build_model(ModelConfig(kind="forecaster", input_size=1, hidden_size=4, horizon=3, base_season=2,
                                    loss="l1"))
    assert built.base_season == 2 and built.loss == "l1"
    with pytest.raises(ValueError, match="model.base_season"):
        Forecaster(1, 4, 1, 3, base_season=-1)
    with pytest.raises(ValueError, match="model.loss"):
        Forecaster(1, 4, 1, 3, loss="huber")
    with pytest.raises(ValueError, match="season"):
        model(params, x[..., :1, :], mask[..., :1])  # one input step cannot hold a season of 2


def test_fit_can_validate_the_starting_state_and_keep_it():
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(7.0)
    vals = iter([0.5, 1.0, 2.0])

    def step(i: int) -> dict:
        with torch.no_grad():
            model.weight.fill_(float(i))
        return {"loss": float(i)}

    out = fit(model, step, 2, validate=lambda: next(vals), val_every=1, validate_start=True)
    assert out["history"][0] == {"step": 0, "val": 0.5} and out["best_val"] == 0.5
    assert float(model.weight.detach()) == 7.0  # no step beat the warm start on val: it is kept


# ---------------------------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("cfg,cls,names", [
    (ModelConfig(kind="mlp", input_size=1, mlp_hidden=[40, 40], output_size=1), MLP, {"layers.2.bias"}),
    (ModelConfig(kind="forecaster", input_size=3, hidden_size=8, num_layers=2, horizon=4), Forecaster,
     {"rnn.weight_hh_l1", "head.weight"}),
    (ModelConfig(kind="char_lm", vocab_size=20, embedding_size=6, hidden_size=8, cell="gru"), CharLM,
     {"embedding.weight", "rnn.weight_ih_l0"}),
    (ModelConfig(kind="seq2seq", vocab_size=20, tgt_vocab_size=15, embedding_size=6, hidden_size=8), Seq2Seq,
     {"encoder.weight_hh_l0", "decoder.bias_ih_l0", "combine.weight", "tgt_embedding.weight"}),
])
def test_build_model(cfg, cls, names):
    model = build_model(cfg)
    assert isinstance(model, cls)
    assert names <= {n for n, _ in model.named_parameters()}


def test_build_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match="model.kind"):
        build_model(ModelConfig(kind="transformer"))


def test_char_lm_states_continue_a_sequence():
    """Running a prefix and then the rest from its states equals one pass (what sampling relies on)."""
    torch.manual_seed(1)
    model = CharLM(9, 4, 6, 2).to(F64)
    params = noisy_params(model, 2)
    tokens = torch.randint(0, 9, (2, 3, 7))
    whole, _ = model(params, tokens)
    first, states = model(params, tokens[..., :4])
    rest, _ = model(params, tokens[..., 4:], None, states)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole, rtol=1e-12, atol=1e-12)


def _score(model: Seq2Seq, params, memory, src_mask, states, hyps: torch.Tensor) -> torch.Tensor:
    """Log-probability of each hypothesis ``[T, C, L]`` under teacher forcing, counting up to the first EOS."""
    prev = torch.cat([torch.full_like(hyps[..., :1], BOS), hyps[..., :-1]], -1)
    logits, _ = model.decode(params, memory, src_mask, prev.clamp_min(0), states)
    logp = torch.log_softmax(logits, -1).gather(-1, hyps.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ended = torch.cumsum((hyps == EOS).long(), -1) - (hyps == EOS).long()  # EOS itself still counts
    return (logp * (ended == 0)).sum(-1)


def test_seq2seq_greedy_and_beam_search_are_exact():
    """Greedy takes each step's argmax; a beam wide enough to be exhaustive finds the best hypothesis."""
    torch.manual_seed(2)
    vocab, max_len = 6, 3
    model = Seq2Seq(7, vocab, 4, 5, 1).to(F64)
    params = noisy_params(model, 2, scale=1.5)
    src = torch.randint(4, 7, (2, 2, 4))
    src_mask = torch.ones(2, 2, 4, dtype=F64)
    src_mask[1, 0, 2:] = 0
    src = src * src_mask.long()
    greedy = model.translate(params, src, src_mask, max_len=max_len)
    beam = model.translate(params, src, src_mask, max_len=max_len, beam=(vocab - 1) ** 2)
    assert greedy.shape[:2] == beam.shape[:2] == (2, 2) and greedy.shape[2] <= max_len

    # every hypothesis: live tokens are anything but PAD; after EOS only PAD
    live = [v for v in range(vocab) if v != PAD]
    hyps = []
    for seq in itertools.product(live, repeat=max_len):
        seq = list(seq)
        if EOS in seq:
            k = seq.index(EOS)
            seq = seq[: k + 1] + [PAD] * (max_len - k - 1)
        if seq not in hyps:
            hyps.append(seq)
    hyps = torch.tensor(hyps)
    for t, n in itertools.product(range(2), range(2)):
        one = {k: v[t : t + 1] for k, v in params.items()}
        memory, states = model.encode(one, src[t : t + 1, n : n + 1], src_mask[t : t + 1, n : n + 1])
        c = hyps.shape[0]
        mem = memory.expand(1, c, *memory.shape[2:])
        mask = src_mask[t : t + 1, n : n + 1].expand(1, c, -1)
        st = [tuple(s.expand(1, c, -1) for s in layer) for layer in states]
        scores = _score(model, one, mem, mask, st, hyps.unsqueeze(0))[0]

        def score_of(out: torch.Tensor, scores: torch.Tensor = scores) -> torch.Tensor:
            full = torch.full((max_len,), PAD)
            full[: out.shape[-1]] = out
            idx = (hyps == full).all(-1).nonzero()
            assert idx.numel() == 1, f"not a well-formed hypothesis: {out.tolist()}"
            return scores[idx[0, 0]]

        torch.testing.assert_close(score_of(beam[t, n]), scores.max())
        greedy_score = score_of(greedy[t, n])
        assert greedy_score <= scores.max() + 1e-12
        # greedy: each token is the argmax (PAD excluded) given the tokens before it
        prefix = greedy[t, n]
        prev = torch.cat([torch.tensor([BOS]), prefix[:-1]]).view(1, 1, -1)
        logits, _ = model.decode(one, memory, src_mask[t : t + 1, n : n + 1], prev, states)
        logits[..., PAD] = -math.inf
        real = int((torch.cumsum((prefix == EOS).long(), 0) - (prefix == EOS).long() == 0).sum())
        assert torch.equal(logits[0, 0, :real].argmax(-1), prefix[:real])


def test_predict_dispatches_on_the_family():
    """``decoding.predict`` is the one place that knows what each family predicts for a query."""
    torch.manual_seed(5)
    x_lm = torch.randint(4, 9, (2, 3, 6))
    mask = torch.ones(2, 3, 6)
    cases = [(MLP([1, 8, 2]), torch.randn(2, 3, 1), (2, 3, 2)),
             (Forecaster(1, 8, 1, 4), torch.randn(2, 3, 6, 1), (2, 3, 4)),
             (CharLM(9, 8, 4, 1), x_lm, (2, 3, 6, 9))]
    for model, x, shape in cases:
        params = batched(model, 2)
        out = predict(model, params, x, mask)
        assert out.shape == shape and not out.requires_grad
    s2s = Seq2Seq(9, 7, 4, 8, 1)
    params = noisy_params(s2s, 2, scale=1.0)
    torch.testing.assert_close(predict(s2s, params, x_lm, mask, max_len=5),
                               s2s.translate(params, x_lm, mask, max_len=5))
    assert predict(s2s, params, x_lm, mask).shape[-1] <= 2 * 6 + 10  # default: twice the source + 10


def test_fit_ends_at_the_best_validated_state():
    model = torch.nn.Linear(1, 1)
    vals = iter([3.0, 1.0, 2.0])
    seen = []

    def step(i: int) -> dict:
        with torch.no_grad():
            model.weight.fill_(float(i))
        return {"loss": float(i)}

    def validate() -> float:
        seen.append(float(model.weight))
        return next(vals)

    out = fit(model, step, 3, validate=validate, val_every=1)
    assert seen == [1.0, 2.0, 3.0] and out["best_val"] == 1.0 and float(model.weight) == 2.0
    assert [r["step"] for r in out["history"]] == [1, 2, 3] and out["history"][1]["val"] == 1.0
    with pytest.raises(ValueError, match="steps"):
        fit(model, step, -1)


def test_seq2seq_all_padding_rows_give_finite_logits():
    """A task with fewer sequences than its neighbours has all-padding rows: they must not make NaN."""
    model = Seq2Seq(7, 6, 4, 5, 1).to(F64)
    src = torch.zeros(1, 2, 3, dtype=torch.long)
    src[0, 0] = torch.tensor([4, 5, 6])
    src_mask = (src != 0).to(F64)
    tgt = torch.tensor([[[4, 5], [0, 0]]])
    logits = model(batched(model, 1), src, src_mask, tgt, (tgt != 0).to(F64))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def _learner(dtype=F64) -> tuple[MetaLearner, ModelConfig]:
    cfg = ModelConfig(kind="forecaster", input_size=2, hidden_size=6, num_layers=2, horizon=3)
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=2, inner_lr=0.2, learn_inner_lr=True))
    learner.to(dtype)
    with torch.no_grad():
        for p in learner.rates.parameters():
            p.uniform_(0.05, 0.3)  # not the initial value, so loading must really restore it
    return learner, cfg


def _forecast_split(tasks=3):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(tasks, 4, 5, 2, generator=g, dtype=F64), torch.randn(tasks, 4, 3, generator=g, dtype=F64),
                 torch.ones(tasks, 4, 5, dtype=F64), torch.ones(tasks, 4, 3, dtype=F64))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    learner, cfg = _learner()
    extra = {"step": 7, "vocab": ["a", "b"], "norm": {"mean": torch.tensor([1.5])}, "note": "x"}
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", learner, cfg, extra)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left
    ckpt = load_checkpoint(path)
    assert ckpt["extra"]["step"] == 7 and ckpt["extra"]["vocab"] == ["a", "b"]
    torch.testing.assert_close(ckpt["extra"]["norm"]["mean"], torch.tensor([1.5]))
    restored, restored_cfg = learner_from_checkpoint(ckpt)
    assert restored_cfg == cfg and restored.cfg == learner.cfg
    assert next(restored.parameters()).dtype == F64
    for (n, a), (m, b) in zip(learner.state_dict().items(), restored.state_dict().items()):
        assert n == m and torch.equal(a, b)
    support = _forecast_split()
    fast_a, curve_a = learner.adapt(support)
    fast_b, curve_b = restored.adapt(support)
    for n in fast_a:
        assert torch.equal(fast_a[n], fast_b[n])
    assert all(torch.equal(a, b) for a, b in zip(curve_a, curve_b))


class Sneaky:
    """Any pickled class could run code on load; ``weights_only=True`` refuses it."""


def test_checkpoint_is_read_with_weights_only(tmp_path):
    learner, cfg = _learner()
    path = save_checkpoint(tmp_path / "bad.pt", learner, cfg, {"obj": Sneaky()})
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_checkpoint_refuses_to_overwrite(tmp_path):
    learner, cfg = _learner()
    path = save_checkpoint(tmp_path / "m.pt", learner, cfg, {"step": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(path, learner, cfg, {"step": 2})
    assert load_checkpoint(path)["extra"]["step"] == 1
    save_checkpoint(path, learner, cfg, {"step": 2}, overwrite=True)
    assert load_checkpoint(path)["extra"]["step"] == 2


def test_checkpoint_refuses_a_newer_version_and_foreign_files(tmp_path):
    learner, cfg = _learner()
    path = save_checkpoint(tmp_path / "m.pt", learner, cfg)
    ckpt = torch.load(path, weights_only=True)
    ckpt["version"] = checkpoint_module.VERSION + 1
    torch.save(ckpt, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=f"version {checkpoint_module.VERSION + 1} is newer"):
        load_checkpoint(tmp_path / "newer.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a MetaLSTM checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_float32_round_trip(tmp_path):
    learner, cfg = _learner(torch.float32)
    restored, _ = learner_from_checkpoint(load_checkpoint(save_checkpoint(tmp_path / "m.pt", learner, cfg)))
    assert next(restored.parameters()).dtype == torch.float32
    params = batched(learner.model, 3)
    split = _forecast_split().to("cpu", torch.float32)
    restored_params = batched(restored.model, 3)
    assert torch.equal(learner.model.task_loss(params, split), restored.model.task_loss(restored_params, split))
