"""The served model and its batched maths: what a replica's model process runs (no Ray here).

A request becomes a ``Job`` (its arrays, checked against the model it was prepared for, by
``pipeline.serving.request_jobs``). ``adapt_and_predict`` adapts a batch of jobs in ONE task-batched inner loop
per model and step count (``MetaLearner.adapt``, the code path training evaluates with) and predicts their
queries in one forward pass; ``predict_jobs`` predicts with cached fast weights. Predictions come from the model's
own ``predict`` and ``prediction_rows``; only a language model answers differently when served (the
distribution after a prompt, or a sampled continuation). ``pipeline.serving.model_process`` runs these in a
child process of the replica.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalstm import MetaLearner, NonFiniteLossError, collate, series
from metalstm.checkpoint import learner_from_checkpoint, load_checkpoint
from metalstm.data import EOS, PAD, Split
from metalstm.decoding import predict, sample_continuation
from metalstm.vocab import Vocab
from pipeline.serving.schema import DecodeOptions, Prediction

# requests adapted together. 16, not 32: per task, one inner loop over 16 tasks costs 6.0 ms here and over 32
# 7.1 (their fast weights no longer fit in cache), and at concurrency 32 two batches of 16 alternate, one
# computing while the other's responses and next requests cross HTTP (measured: +15 % adapt req/s at 32)
MAX_BATCH_REQUESTS = 16
MAX_BATCH_CELLS = 65536  # padded support cells (tasks x examples x steps) plus decoding cells in one batch


# ----------------------------------------------------------------------------- the loaded model


@dataclass
class ServedModel:
    """A loaded model version and what serving needs to encode requests the way training data was made.

    ``checkpoint`` keeps the version's checkpoint as bytes: the model process rebuilds the model from it
    (``served_model``), also after a restart, without asking the registry again.
    """

    learner: MetaLearner
    checkpoint: bytes = field(repr=False)
    name: str
    version: str
    alias: str | None
    config_digest: str | None
    model_uri: str
    run_id: str | None
    kind: str
    store: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)
    _vocabs: dict[str, Any] = field(default_factory=dict, repr=False)

    def metadata(self) -> dict[str, Any]:
        """Everything but the model and checkpoint: with the checkpoint, what ``served_model`` needs."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "config_digest": self.config_digest,
                "model_uri": self.model_uri, "run_id": self.run_id, "loaded_at": self.loaded_at}

    @property
    def model(self):
        return self.learner.model

    @property
    def family(self) -> str:
        return self.learner.model.family

    def vocab(self, side: str = "target"):
        """The vocabulary of one side (``source``/``target``; a language model has one), or None.

        Stores keep ``{"tokens", "tokenizer"}`` (ptb-char) or ``{"src": [...], "tgt": [...], "tokenizer"}`` (mt).
        """
        if side not in self._vocabs:
            v = self.store.get("vocab") or {}
            key = {"source": "src", "target": "tgt"}[side]
            tokens = v.get(key) if isinstance(v.get(key), list) else v.get("tokens")
            try:
                self._vocabs[side] = None if tokens is None else Vocab(tokens, v.get("tokenizer", "words"))
            except ValueError:
                self._vocabs[side] = None
        return self._vocabs[side]


def _served(learner: MetaLearner, ckpt: dict[str, Any], checkpoint: bytes, **metadata: Any) -> ServedModel:
    learner.eval()
    learner.to(torch.float32)
    return ServedModel(learner=learner, checkpoint=checkpoint, kind=ckpt["model"]["kind"],
                       store=dict(ckpt["extra"].get("store") or {}), **metadata)


def served_model(checkpoint: bytes, **metadata: Any) -> ServedModel:
    """A model version from its checkpoint bytes (read with ``weights_only=True``) and registry metadata."""
    ckpt = load_checkpoint(io.BytesIO(checkpoint))
    return _served(learner_from_checkpoint(ckpt)[0], ckpt, checkpoint, **metadata)


def load_model(model_uri: str, tracking_uri: str | None = None, alias: str | None = None) -> ServedModel:
    """Load a registered version through the registry; its checkpoint file's bytes are kept as they are."""
    from pipeline.tracking.registry import load_learner

    with tempfile.TemporaryDirectory(prefix="metalstm-serve-") as tmp:  # weights are in memory once loaded
        learner, ckpt, resolved = load_learner(model_uri, tracking_uri, dst_dir=tmp)
        checkpoint = Path(resolved.checkpoint_path).read_bytes()
    return _served(learner, ckpt, checkpoint, name=resolved.name, version=str(resolved.version),
                   alias=resolved.alias or alias, config_digest=resolved.config_digest, model_uri=model_uri,
                   run_id=resolved.run_id)


@dataclass
class Job:
    """One request's arrays, checked against the model it was prepared for."""

    served: ServedModel  # None only while the job crosses to the model process, which holds it by URI
    support_x: list[np.ndarray] | None = None
    support_y: list[np.ndarray] | None = None
    steps: int = 0
    query_x: list[np.ndarray] | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    scale: tuple[float, float] | None = None  # forecast history: (offset, scale) to map predictions back
    params: dict[str, torch.Tensor] | None = None  # a cached adapter's fast weights [1, ...]

    @property
    def decode_cells(self) -> int:
        """Decoding work, rows x steps: a translation's ``beam`` rows per query for up to ``max_len`` tokens, a
        sampled continuation's ``max_new_tokens`` per prompt; 0 where predicting is one forward pass.

        Why apart from the query's cells: each decoded token is one more sequential step over every row (and,
        for a translation, a projection onto the whole target vocabulary), so 64 sources x beam 8 x 1024
        tokens is half a million steps from a request whose query is 64 short sentences.
        """
        if self.query_x is None or self.served is None:
            return 0
        if self.served.family == "mt":
            return len(self.query_x) * self.decode.beam * self.decode.max_len
        if self.served.family == "lm" and self.decode.mode == "sample":
            return len(self.query_x) * self.decode.max_new_tokens
        return 0

    @functools.cached_property
    def cost(self) -> int:
        """Padded support cells plus decoding cells, at least the per-request share of a full batch: what one
        batch may hold (bounds a batch's memory and time). Cached: a job is complete before it is queued, and
        the batchers ask for the cost of every queued job each time they consider adding one."""
        cells = len(self.support_x) * max(len(a) for a in self.support_x) if self.support_x else 0
        return max(cells + self.decode_cells, MAX_BATCH_CELLS // MAX_BATCH_REQUESTS)


# ----------------------------------------------------------------------------- batched maths


def _split(seqs_per_task: list[list[np.ndarray]], targets: list[list[np.ndarray]] | None = None):
    """Collate ragged per-task sequences with the one ``collate`` (targets default to the inputs)."""
    ys = targets if targets is not None else seqs_per_task
    return collate([{"support_x": x, "support_y": y, "query_x": x, "query_y": y}
                    for x, y in zip(seqs_per_task, ys)]).support


def adapt_jobs(jobs: list[Job]) -> list[tuple[dict[str, torch.Tensor], float, float] | Exception]:
    """Adapt every job's support set; jobs on the same model and step count share one inner loop."""
    out: list[Any] = [None] * len(jobs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.served), job.steps), []).append(i)
    for (_, steps), idx in groups.items():
        learner = jobs[idx[0]].served.learner
        try:
            support = _split([jobs[i].support_x for i in idx], [jobs[i].support_y for i in idx])
            fast, curve = learner.adapt(support, steps)
        except (NonFiniteLossError, ValueError, RuntimeError) as e:
            if len(idx) == 1:
                out[idx[0]] = e
                continue
            for i in idx:  # one bad task fails the batch: redo them alone so only the culprit fails
                out[i] = adapt_jobs([jobs[i]])[0]
            continue
        for k, i in enumerate(idx):
            params = {n: p[k : k + 1].clone() for n, p in fast.items()}
            out[i] = (params, float(curve[0][k]), float(curve[-1][k]))
    return out


def _trim(tokens: list[int]) -> list[int]:
    """A sampled continuation up to, not including, its first EOS or PAD."""
    out = []
    for t in tokens:
        if t in (EOS, PAD):
            break
        out.append(t)
    return out


def _text(served: ServedModel, tokens: list[int]) -> str | None:
    vocab = served.vocab("target")
    return None if vocab is None else vocab.decode(tokens)


def _next_tokens(served: ServedModel, params: dict[str, torch.Tensor], split: Split, counts: list[int],
                 decode: DecodeOptions) -> list[list[Prediction]]:
    """A language model's answer to each prompt: the next-token distribution after it, or a sampled
    continuation (``decode.mode``)."""
    model = served.model
    if decode.mode == "sample":
        gen = torch.Generator().manual_seed(decode.seed if decode.seed is not None else
                                            int.from_bytes(os.urandom(8), "little") >> 1)
        tokens = sample_continuation(model, params, split.x, split.x_mask, decode.max_new_tokens,
                                     temperature=decode.temperature, top_k=decode.top_k, generator=gen)
        return [[Prediction(tokens=s, text=_text(served, s)) for s in map(_trim, tokens[g, :n].tolist())]
                for g, n in enumerate(counts)]
    probs = torch.softmax(predict(model, params, split.x, split.x_mask)[:, :, -1].double(), -1)
    vocab = served.vocab()
    out = []
    for g, n in enumerate(counts):
        preds = []
        for p in probs[g, :n]:
            top = p.topk(min(decode.top, p.numel()))
            preds.append(Prediction(next_token_probs=p.tolist(), top=[
                {"id": int(i), "p": float(v), "token": None if vocab is None else vocab.tokens[int(i)]}
                for v, i in zip(top.values, top.indices)]))
        out.append(preds)
    return out


def predict_group(served: ServedModel, params: dict[str, torch.Tensor], queries: list[list[np.ndarray]],
                  decode: DecodeOptions, scales: list[tuple[float, float] | None]) -> list[list[Prediction]]:
    """Predictions for ``G`` tasks at once: ``params`` are ``[G, ...]`` fast weights, ``queries`` their inputs."""
    model = served.model
    split = _split(queries)
    counts = [len(q) for q in queries]
    if model.family == "lm":  # a served language model continues a text, rather than predicting every position
        return _next_tokens(served, params, split, counts, decode)
    pred = predict(model, params, split.x, split.x_mask, max_len=decode.max_len, beam=decode.beam)
    rows = [model.prediction_rows(pred[g, :n], split.x_mask[g, :n]) for g, n in enumerate(counts)]
    if not pred.is_floating_point():  # token ids (a translation each)
        return [[Prediction(tokens=r, text=_text(served, r)) for r in task] for task in rows]
    return [[Prediction(values=r) for r in (task if scale is None else series.unscale(task, *scale).tolist())]
            for task, scale in zip(rows, scales)]


def _samples_alone(job: Job) -> bool:
    """Seeded sampling runs alone, so that a seed reproduces the same continuation whatever the batch."""
    return job.served.family == "lm" and job.decode.mode == "sample" and job.decode.seed is not None


def predict_jobs(jobs: list[Job], params: list[dict[str, torch.Tensor]]) -> list[list[Prediction] | Exception]:
    """Predict every job's query with its fast weights; jobs of one model and decode options share one pass."""
    out: list[Any] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((id(job.served), job.decode.key(), i if _samples_alone(job) else -1), []).append(i)
    for idx in groups.values():
        try:
            stacked = {n: torch.cat([params[i][n] for i in idx]) for n in params[idx[0]]}
            preds = predict_group(jobs[idx[0]].served, stacked, [jobs[i].query_x for i in idx], jobs[idx[0]].decode,
                                  [jobs[i].scale for i in idx])
            for i, p in zip(idx, preds):
                out[i] = p
        except (ValueError, RuntimeError) as e:
            for i in idx:
                out[i] = e
    return out


def adapt_and_predict(jobs: list[Job]) -> list[tuple[Any, list[Prediction] | Exception | None]]:
    """Per job ``(adapted, predictions)``: ``adapt_jobs``'s outcome, then its query's predictions (None
    without a query, or when adaptation failed)."""
    adapted = adapt_jobs(jobs)
    ok = [i for i, a in enumerate(adapted) if not isinstance(a, Exception) and jobs[i].query_x is not None]
    preds = predict_jobs([jobs[i] for i in ok], [adapted[i][0] for i in ok]) if ok else []
    results: list[Any] = [(a, None) for a in adapted]
    for i, p in zip(ok, preds):
        results[i] = (adapted[i], p)
    return results
