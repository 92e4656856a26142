"""The networks MAML adapts, each a plain function of a parameter dict with a leading task dimension.

A model's ``nn.Parameter`` s are the meta-parameters θ (no task dimension). ``forward(params, ...)``
takes *fast* weights ``{name: [T, *shape]}`` (see :func:`batched`) so that every task runs with its own
weights in one pass. ``task_loss`` returns one loss per task; ``metrics`` the family's metrics per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metalstm import losses
from metalstm.config import ModelConfig
from metalstm.data import BOS, EOS, PAD, Split
from metalstm.rnn import GATES, rnn_stack

Params = Mapping[str, Tensor]


def batched(module: nn.Module, num_tasks: int) -> dict[str, Tensor]:
    """θ broadcast to ``num_tasks`` tasks (a view: gradients flow back to θ summed over tasks)."""
    return {n: p.unsqueeze(0).expand(num_tasks, *p.shape) for n, p in module.named_parameters()}


def sub(params: Params, prefix: str) -> dict[str, Tensor]:
    cut = len(prefix) + 1
    return {n[cut:]: p for n, p in params.items() if n.startswith(prefix + ".")}


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Task-batched ``x @ W^T + b`` for ``x [T, ..., D]``, ``W [T, O, D]``, ``b [T, O]``."""
    lead = x.shape[:-1]
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(x.shape[0], -1, x.shape[-1]), weight.transpose(1, 2))
    return out.view(*lead, -1)


def embed(table: Tensor, tokens: Tensor) -> Tensor:
    """Task-batched embedding lookup: ``table [T, V, E]``, ``tokens [T, ...]`` → ``[T, ..., E]``."""
    tasks = torch.arange(tokens.shape[0], device=tokens.device).view(-1, *([1] * (tokens.dim() - 1)))
    return table[tasks, tokens]


def _expect(t: Tensor, name: str, shape: tuple[int | None, ...], *, integer: bool | None = None) -> None:
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if integer is True and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name}: expected integer token ids, got dtype {t.dtype}")
    if integer is False and not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


class RNN(nn.Module):
    """Parameters of a ``torch.nn.LSTM``/``GRU`` stack (same names, shapes and init), run task-batched."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell: expected one of {sorted(GATES)}, got {cell!r}")
        self.cell, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        gates = GATES[cell] * hidden_size
        for k in range(num_layers):
            d = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, d)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, params: Params, x: Tensor, mask: Tensor | None = None, states=None):
        return rnn_stack(self.cell, params, x, self.num_layers, mask=mask, states=states)


class MetaModel(nn.Module):
    """Base class: a family's network, loss and metrics as functions of fast weights.

    Each subclass also carries its family's facts, so that training, the registry, serving and the experiment
    ask the model instead of keeping tables: ``kind`` (its ``model.kind`` in configs, checkpoints and store
    manifests), ``family``, ``primary_metric`` (lower is better after adaptation; selection and promotion
    compare exactly this), how it predicts, and how a prediction becomes JSON rows.
    """

    kind: str = ""
    family: str = ""
    primary_metric: str = ""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MetaModel:  # pragma: no cover - overridden
        raise NotImplementedError

    def check(self, split: Split, name: str) -> None:  # pragma: no cover - overridden
        pass

    def task_loss(self, params: Params, split: Split) -> Tensor:
        raise NotImplementedError

    def metrics(self, params: Params, split: Split) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, params: Params, x: Tensor, x_mask: Tensor, *, max_len: int = 0, beam: int = 1) -> Tensor:
        """What the family predicts for query inputs ``x [T, N, ...]`` (values, logits or token ids)."""
        return self(params, x, x_mask)

    def placeholder_targets(self, query_x: list) -> list[np.ndarray]:
        """Query targets the collate layout needs when only inputs are known (prediction never reads them)."""
        raise NotImplementedError

    def prediction_rows(self, pred: Tensor, x_mask: Tensor, output: str = "argmax") -> list[list]:
        """One task's ``predict`` output ``[N, ...]`` as JSON-ready rows (``output`` matters to token models)."""
        return pred.tolist()

    @classmethod
    def example_task(cls, cfg: ModelConfig, rng: np.random.Generator) -> dict[str, Any]:
        """A tiny valid task (``support_x``, ``support_y``, ``query_x``) for a model of this config."""
        raise NotImplementedError


class MLP(MetaModel):
    """A ReLU MLP on ``x [T, N, F]`` → ``[T, N, O]`` (the canonical sinusoid-regression network)."""

    kind, family, primary_metric = "mlp", "regression", "mse"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MLP:
        return cls([cfg.input_size, *cfg.mlp_hidden, cfg.output_size])

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, params: Params, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        for k in range(len(self.layers)):
            x = linear(x, params[f"layers.{k}.weight"], params[f"layers.{k}.bias"])
            if k < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def check(self, split: Split, name: str) -> None:
        t = split.x.shape[0]
        _expect(split.x, f"{name}.x", (t, None, self.sizes[0]), integer=False)
        _expect(split.y, f"{name}.y", (t, split.x.shape[1], self.sizes[-1]), integer=False)

    def task_loss(self, params: Params, split: Split) -> Tensor:
        return losses.masked_mse(self(params, split.x), split.y, split.y_mask)

    def metrics(self, params: Params, split: Split) -> dict[str, Tensor]:
        return {"mse": self.task_loss(params, split)}

    def placeholder_targets(self, query_x: list) -> list[np.ndarray]:
        return [np.zeros(self.sizes[-1], np.float32)] * len(query_x)

    @classmethod
    def example_task(cls, cfg: ModelConfig, rng: np.random.Generator) -> dict[str, Any]:
        x = rng.uniform(-5, 5, size=(5, cfg.input_size)).round(3).tolist()
        y = rng.normal(size=(3, cfg.output_size)).round(3).tolist()
        return {"support_x": x[:3], "support_y": y, "query_x": x[3:]}


def seasonal_naive(x: Tensor, x_mask: Tensor, horizon: int, season: int) -> Tensor:
    """Repeat each window's last ``season`` actual values: ``ŷ[h] = x[end - season + h mod season]``.

    ``x [T, N, L, F]`` (value in feature 0, as scaled in the store), ``x_mask [T, N, L]`` → ``[T, N, H]``.
    With hourly data and ``season = 24`` this is "tomorrow looks like today", the strong naive load forecast.
    """
    if season < 1:
        raise ValueError(f"season: must be >= 1, got {season}")
    lengths = x_mask.sum(-1).long()  # [T, N]; 0 for a padding row of a task with fewer examples
    real = lengths[lengths > 0]
    if real.numel() and int(real.min()) < season:
        raise ValueError(f"season: {season} exceeds the shortest input window ({int(real.min())} steps)")
    offs = torch.arange(horizon, device=x.device) % season  # [H]
    index = (lengths.unsqueeze(-1) - season + offs).clamp_min(0)  # [T, N, H]
    return x[..., 0].gather(-1, index)


class Forecaster(MetaModel):
    """A window of values (+ covariates) ``[T, N, L, F]`` → the next ``horizon`` values ``[T, N, H]``.

    ``base_season > 0`` makes the network predict a *correction* to the seasonal-naive forecast (the last
    ``base_season`` values repeated): its head starts at zero, so before any training it *is* the classical
    baseline, and learning (or adaptation) only has to find what the naive forecast gets wrong.
    ``loss="l1"`` trains on the mean absolute error of the scaled values, which ranks forecasts as ND does.
    """

    kind, family, primary_metric = "forecaster", "forecast", "mse"
    LOSSES = ("mse", "l1")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Forecaster:
        return cls(cfg.input_size, cfg.hidden_size, cfg.num_layers, cfg.horizon, cfg.cell,
                   base_season=cfg.base_season, loss=cfg.loss)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, horizon: int, cell: str = "lstm",
                 base_season: int = 0, loss: str = "mse"):
        super().__init__()
        if base_season < 0:
            raise ValueError(f"model.base_season: must be >= 0 (0 = no seasonal-naive base), got {base_season}")
        if loss not in self.LOSSES:
            raise ValueError(f"model.loss: expected one of {list(self.LOSSES)}, got {loss!r}")
        self.input_size, self.horizon, self.base_season, self.loss = input_size, horizon, base_season, loss
        self.rnn = RNN(cell, input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, horizon)
        if base_season:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, params: Params, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        _, finals = self.rnn(sub(params, "rnn"), x, x_mask)
        out = linear(finals[-1][0], params["head.weight"], params["head.bias"])
        if self.base_season:
            mask = x_mask if x_mask is not None else torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
            out = out + seasonal_naive(x, mask, self.horizon, self.base_season)
        return out

    def check(self, split: Split, name: str) -> None:
        t, n = split.x.shape[:2]
        _expect(split.x, f"{name}.x", (t, n, None, self.input_size), integer=False)
        _expect(split.y, f"{name}.y", (t, n, self.horizon), integer=False)

    def task_loss(self, params: Params, split: Split) -> Tensor:
        pred = self(params, split.x, split.x_mask)
        if self.loss == "l1":
            return losses.masked_l1(pred, split.y, split.y_mask)
        return losses.masked_mse(pred, split.y, split.y_mask)

    def metrics(self, params: Params, split: Split) -> dict[str, Tensor]:
        pred = self(params, split.x, split.x_mask)
        return {
            "mse": losses.masked_mse(pred, split.y, split.y_mask),
            "nd": losses.normalized_deviation(pred, split.y, split.y_mask),
            "nrmse": losses.nrmse(pred, split.y, split.y_mask),
        }

    def placeholder_targets(self, query_x: list) -> list[np.ndarray]:
        return [np.zeros(self.horizon, np.float32)] * len(query_x)

    @classmethod
    def example_task(cls, cfg: ModelConfig, rng: np.random.Generator) -> dict[str, Any]:
        x = rng.normal(size=(3, 8, cfg.input_size)).round(3).tolist()
        y = rng.normal(size=(2, cfg.horizon)).round(3).tolist()
        return {"support_x": x[:2], "support_y": y, "query_x": x[2:]}


class CharLM(MetaModel):
    """Tokens ``[T, N, L]`` → next-token logits ``[T, N, L, V]``."""

    kind, family, primary_metric = "char_lm", "lm", "bpc"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> CharLM:
        return cls(cfg.vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.num_layers, cfg.cell)

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int, cell: str = "lstm"):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = RNN(cell, embedding_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, params: Params, tokens: Tensor, mask: Tensor | None = None, states=None):
        out, finals = self.rnn(sub(params, "rnn"), embed(params["embedding.weight"], tokens), mask, states)
        return linear(out, params["head.weight"], params["head.bias"]), finals

    def check(self, split: Split, name: str) -> None:
        t, n = split.x.shape[:2]
        _expect(split.x, f"{name}.x", (t, n, None), integer=True)
        _expect(split.y, f"{name}.y", tuple(split.x.shape), integer=True)
        for field, tokens in (("x", split.x), ("y", split.y)):
            if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                raise ValueError(f"{name}.{field}: token ids must be in [0, {self.vocab_size}), got "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")

    def task_loss(self, params: Params, split: Split) -> Tensor:
        logits, _ = self(params, split.x, split.x_mask)
        return losses.masked_cross_entropy(logits, split.y, split.y_mask)

    def metrics(self, params: Params, split: Split) -> dict[str, Tensor]:
        nll = self.task_loss(params, split)
        return {"nll": nll, "bpc": losses.bits_per_character(nll)}

    def predict(self, params: Params, x: Tensor, x_mask: Tensor, *, max_len: int = 0, beam: int = 1) -> Tensor:
        """Next-token logits at every position ``[T, N, L, V]``."""
        return self(params, x, x_mask)[0]

    def placeholder_targets(self, query_x: list) -> list[np.ndarray]:
        return [np.zeros(len(x), np.int64) for x in query_x]

    def prediction_rows(self, pred: Tensor, x_mask: Tensor, output: str = "argmax") -> list[list]:
        """Per real position: the next-token id (``argmax``) or the log-probabilities (``logprobs``)."""
        pred = torch.log_softmax(pred, -1) if output == "logprobs" else pred.argmax(-1)
        return [pred[n, : int(x_mask[n].sum())].tolist() for n in range(pred.shape[0])]

    @classmethod
    def example_task(cls, cfg: ModelConfig, rng: np.random.Generator) -> dict[str, Any]:
        seqs = rng.integers(4, max(cfg.vocab_size, 5), size=(3, 9)).tolist()
        return {"support_x": [s[:-1] for s in seqs[:2]], "support_y": [s[1:] for s in seqs[:2]],
                "query_x": [seqs[2][:-1]]}


class Seq2Seq(MetaModel):
    """Encoder-decoder with (Luong, dot-product) attention: source ``[T, N, S]`` → target ``[T, N, L]``.

    Teacher forcing runs the decoder over the whole target in one pass (input projection in one matmul),
    then attends over the encoder outputs; padding is masked out of the attention and the loss.
    """

    kind, family, primary_metric = "seq2seq", "mt", "nll"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Seq2Seq:
        return cls(cfg.vocab_size, cfg.tgt_vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.num_layers,
                   cfg.cell)

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embedding_size: int, hidden_size: int,
                 num_layers: int, cell: str = "lstm"):
        super().__init__()
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.src_embedding = nn.Embedding(src_vocab_size, embedding_size)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_size)
        self.encoder = RNN(cell, embedding_size, hidden_size, num_layers)
        self.decoder = RNN(cell, embedding_size, hidden_size, num_layers)
        self.combine = nn.Linear(2 * hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, tgt_vocab_size)

    def encode(self, params: Params, src: Tensor, src_mask: Tensor):
        memory, finals = self.encoder(sub(params, "encoder"), embed(params["src_embedding.weight"], src), src_mask)
        return memory, finals

    def decode(self, params: Params, memory: Tensor, src_mask: Tensor, prev: Tensor, states, mask=None):
        """Logits for target positions given previous tokens ``prev [T, N, L]`` and decoder states."""
        out, states = self.decoder(sub(params, "decoder"), embed(params["tgt_embedding.weight"], prev), mask, states)
        scores = out @ memory.transpose(-1, -2)  # [T, N, L, S]
        # finfo.min, not -inf: an all-padding row (a task with fewer sequences) must give finite, unused logits
        scores = scores.masked_fill(src_mask.unsqueeze(2) == 0, torch.finfo(scores.dtype).min)
        context = torch.softmax(scores, dim=-1) @ memory
        hidden = torch.tanh(linear(torch.cat([out, context], -1), params["combine.weight"], params["combine.bias"]))
        return linear(hidden, params["head.weight"], params["head.bias"]), states

    def forward(self, params: Params, src: Tensor, src_mask: Tensor, tgt: Tensor, tgt_mask: Tensor) -> Tensor:
        memory, states = self.encode(params, src, src_mask)
        prev = torch.cat([torch.full_like(tgt[..., :1], BOS), tgt[..., :-1]], dim=-1)
        logits, _ = self.decode(params, memory, src_mask, prev, states, tgt_mask)
        return logits

    def check(self, split: Split, name: str) -> None:
        t, n = split.x.shape[:2]
        _expect(split.x, f"{name}.x", (t, n, None), integer=True)
        _expect(split.y, f"{name}.y", (t, n, None), integer=True)
        for field, tokens, vocab in (("x", split.x, self.src_vocab_size), ("y", split.y, self.tgt_vocab_size)):
            if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
                raise ValueError(f"{name}.{field}: token ids must be in [0, {vocab}), got "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")

    def task_loss(self, params: Params, split: Split) -> Tensor:
        logits = self(params, split.x, split.x_mask, split.y, split.y_mask)
        return losses.masked_cross_entropy(logits, split.y, split.y_mask)

    def metrics(self, params: Params, split: Split) -> dict[str, Tensor]:
        return {"nll": self.task_loss(params, split)}

    def predict(self, params: Params, x: Tensor, x_mask: Tensor, *, max_len: int = 0, beam: int = 1) -> Tensor:
        """Translations ``[T, N, ≤max_len]`` (greedy, or beam search; ``max_len`` 0 = 2 × source + 10)."""
        return self.translate(params, x, x_mask, max_len if max_len > 0 else 2 * x.shape[-1] + 10, beam)

    def placeholder_targets(self, query_x: list) -> list[np.ndarray]:
        return [np.array([EOS], np.int64)] * len(query_x)

    def prediction_rows(self, pred: Tensor, x_mask: Tensor, output: str = "argmax") -> list[list]:
        """Each translation's token ids up to, not including, its EOS."""
        rows = [ids.tolist() for ids in pred]
        return [ids[: ids.index(EOS)] if EOS in ids else ids for ids in rows]

    @classmethod
    def example_task(cls, cfg: ModelConfig, rng: np.random.Generator) -> dict[str, Any]:
        src = rng.integers(4, max(cfg.vocab_size, 5), size=(3, 6)).tolist()
        tgt = rng.integers(4, max(cfg.tgt_vocab_size, 5), size=(2, 5)).tolist()
        return {"support_x": src[:2], "support_y": [t + [EOS] for t in tgt], "query_x": src[2:]}

    @torch.no_grad()
    def translate(self, params: Params, src: Tensor, src_mask: Tensor, max_len: int, beam: int = 1) -> Tensor:
        """Decode ``[T, N, ≤max_len]`` token ids (EOS then PAD after the end); greedy when ``beam == 1``."""
        t, n = src.shape[:2]
        memory, states = self.encode(params, src, src_mask)
        if beam > 1:  # every hypothesis is one more "sequence" of its task: [T, N*beam, ...]
            memory = memory.repeat_interleave(beam, 1)
            src_mask = src_mask.repeat_interleave(beam, 1)
            states = [tuple(s.repeat_interleave(beam, 1) for s in st) for st in states]
        width = n * beam
        prev = torch.full((t, width, 1), BOS, dtype=torch.long, device=src.device)
        scores = torch.zeros(t, n, beam, device=src.device, dtype=memory.dtype)
        scores[..., 1:] = float("-inf")  # start from one live hypothesis per sequence
        done = torch.zeros(t, width, dtype=torch.bool, device=src.device)
        out = torch.full((t, width, 0), PAD, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            logits, states = self.decode(params, memory, src_mask, prev, states)
            logp = torch.log_softmax(logits[:, :, -1], -1)  # [T, W, V]
            logp = torch.where(done.unsqueeze(-1), torch.full_like(logp, float("-inf")), logp)
            logp[..., PAD] = torch.where(done, 0.0, float("-inf"))  # finished hypotheses extend with PAD
            if beam == 1:
                token = logp.argmax(-1)
            else:
                v = logp.shape[-1]
                total = (scores.view(t, n, beam, 1) + logp.view(t, n, beam, v)).view(t, n, beam * v)
                scores, flat = total.topk(beam, dim=-1)
                origin = (flat // v) + torch.arange(n, device=src.device).view(1, n, 1) * beam
                origin, token = origin.view(t, width), (flat % v).view(t, width)
                gather = origin.unsqueeze(-1)
                out = out.gather(1, gather.expand(-1, -1, out.shape[-1]))
                done = done.gather(1, origin)
                states = [tuple(s.gather(1, gather.expand(-1, -1, s.shape[-1])) for s in st) for st in states]
            out = torch.cat([out, token.unsqueeze(-1)], -1)
            done = done | (token == EOS)
            prev = token.unsqueeze(-1)
            if bool(done.all()):
                break
        if beam > 1:  # keep the best hypothesis (topk sorts, so index 0)
            out = out.view(t, n, beam, -1)[:, :, 0]
        return out


MODEL_KINDS: dict[str, type[MetaModel]] = {cls.kind: cls for cls in (MLP, Forecaster, CharLM, Seq2Seq)}


def model_class(kind: str) -> type[MetaModel]:
    """The model class for a ``model.kind`` (from a config, a checkpoint or a store manifest)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind: expected one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    return MODEL_KINDS[kind]


def build_model(cfg: ModelConfig) -> MetaModel:
    """The one place a model is built from its config (training, checkpoints and serving use it)."""
    return model_class(cfg.kind).from_config(cfg)
