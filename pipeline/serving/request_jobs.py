"""A validated request → a ``Job``: its arrays, checked against the loaded model, in the layout training used.

pydantic (``pipeline.serving.schema``) has checked the request's shape and limits; what depends on the model
(feature counts, horizon, vocabulary, which convenience forms apply) is checked here, and every failure is a
:class:`RequestError` naming the field, so a bad request is a 422 before any work is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from metalstm.data import sentence_pieces
from pipeline.serving import history
from pipeline.serving.jobs import Job, ServedModel
from pipeline.serving.schema import (
    MAX_DECODE_CELLS,
    MAX_LENGTH,
    MAX_QUERY_CELLS,
    MAX_SUPPORT,
    MAX_SUPPORT_CELLS,
    MAX_TEXT_CHARS,
    AdapterRequest,
    AdaptRequest,
    DecodeOptions,
    PredictRequest,
    RequestError,
)

# ----------------------------------------------------------------------------- one example's arrays


def _tokens(seq: list[float], loc: tuple, vocab_size: int) -> np.ndarray:
    if not seq:
        raise RequestError(loc, "need at least 1 token(s), got 0")
    if isinstance(seq[0], list):
        raise RequestError(loc, "expected a flat list of token ids, got a list of lists")
    a = np.asarray(seq, np.float64)
    bad = np.flatnonzero((a != np.floor(a)) | (a < 0) | (a >= vocab_size))
    if bad.size:
        raise RequestError((*loc, int(bad[0])), f"unknown token {seq[bad[0]]!r}: ids must be integers in "
                                                f"[0, {vocab_size}) (the model's vocabulary size)")
    return a.astype(np.int64)


def _numbers(seq: list, loc: tuple) -> np.ndarray:
    try:
        return np.asarray(seq, np.float32)
    except ValueError:  # ragged nested lists
        raise RequestError(loc, "steps have different numbers of features") from None


def _vector(seq: list, loc: tuple, length: int) -> np.ndarray:
    """Exactly ``length`` numbers (an MLP's input or output, a forecast's horizon)."""
    a = _numbers(seq, loc)
    if a.ndim != 1 or len(a) != length:
        raise RequestError(loc, f"expected a flat list of {length} numbers, got shape {list(a.shape)}")
    return a


def _window(seq: list, loc: tuple, features: int) -> np.ndarray:
    """A forecast window ``[L, F]``; a flat list is ``[L, 1]``."""
    a = _numbers(seq, loc)
    if a.ndim == 1 and features == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise RequestError(loc, f"expected steps of {features} number(s), got shape {list(a.shape)}")
    if a.shape[1] != features:
        raise RequestError(loc, f"expected {features} number(s) per step (the model's input_size), got {a.shape[1]}")
    if len(a) < 1:
        raise RequestError(loc, "need at least 1 step")
    if not np.isfinite(a).all():  # finite float64 JSON numbers can still overflow float32
        raise RequestError(loc, "values overflow float32 (|x| > 3.4e38)")
    return a


# ----------------------------------------------------------------------------- what each family accepts

Parse = Callable[[Any, list, tuple], np.ndarray]  # (model, sequence, loc) -> checked array


@dataclass(frozen=True)
class Layout:
    """How one family's examples look in a request, and which convenience forms it accepts."""

    x: Parse
    y: Parse
    aligned: bool = False  # y holds one entry per x entry (the next token of each)
    models: str = ""  # what messages call this family's models
    forms: tuple[str, ...] = ()  # the request fields only this family accepts
    decodes: bool = False  # whether ``decode`` shapes the predictions (the others' jobs keep the defaults)


# The JSON layout of a request is a fact of the HTTP API, not of the model classes (the core knows tensors, not
# request fields), so the one table of what each family accepts lives here: how x and y are read and sized from
# the model, and the convenience fields (history, texts, pairs, ...) that make sense for that family alone.
LAYOUTS: dict[str, Layout] = {
    "regression": Layout(x=lambda m, s, loc: _vector(s, loc, m.sizes[0]),
                         y=lambda m, s, loc: _vector(s, loc, m.sizes[-1])),
    "forecast": Layout(x=lambda m, s, loc: _window(s, loc, m.input_size),
                       y=lambda m, s, loc: _vector(s, loc, m.horizon),
                       models="forecasting models", forms=("history",)),
    "lm": Layout(x=lambda m, s, loc: _tokens(s, loc, m.vocab_size),
                 y=lambda m, s, loc: _tokens(s, loc, m.vocab_size), aligned=True,
                 models="language models", forms=("texts", "prompts"), decodes=True),
    "mt": Layout(x=lambda m, s, loc: _tokens(s, loc, m.src_vocab_size),
                 y=lambda m, s, loc: _tokens(s, loc, m.tgt_vocab_size),
                 models="translation models", forms=("pairs", "sources"), decodes=True),
}


def _form(served: ServedModel, name: str) -> None:
    """Refuse a convenience field the loaded model's family does not accept."""
    if name not in LAYOUTS[served.family].forms:
        owner = next(layout for layout in LAYOUTS.values() if name in layout.forms)
        raise RequestError((name,), f"only for {owner.models}; this one is {served.family!r}")


def _example(served: ServedModel, x: list, y: list | None, loc: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    layout = LAYOUTS[served.family]
    xs = layout.x(served.model, x, (*loc, "x"))
    if y is None:
        return xs, None
    ys = layout.y(served.model, y, (*loc, "y"))
    if layout.aligned and len(ys) != len(xs):
        raise RequestError((*loc, "y"), f"expected the next token of every input token: {len(xs)} ids "
                                        f"(as many as x), got {len(ys)}")
    return xs, ys


def _cells(seqs: list[np.ndarray], loc: str, limit: int) -> None:
    longest = max(len(s) for s in seqs)
    if len(seqs) * longest > limit:
        raise RequestError((loc,), f"{len(seqs)} examples x longest {longest} steps = {len(seqs) * longest} "
                                   f"padded cells; the limit is {limit}")


def _decode_work(served: ServedModel, job: Job, form: str) -> None:
    """Refuse more decoding than ``MAX_DECODE_CELLS``: the query cells bound the encoding, not the tokens decoded."""
    cells = job.decode_cells
    if cells <= MAX_DECODE_CELLS:
        return
    d, n = job.decode, len(job.query_x)
    if served.family == "mt":
        what, lower = f"{n} {form} x decode.beam {d.beam} x decode.max_len {d.max_len}", "decode.max_len, decode.beam"
    else:
        what, lower = f"{n} {form} x decode.max_new_tokens {d.max_new_tokens}", "decode.max_new_tokens"
    raise RequestError(("decode",), f"{what} = {cells} decoding steps; the limit is {MAX_DECODE_CELLS}: lower "
                                    f"{lower} or send fewer {form}")


# ----------------------------------------------------------------------------- text forms


def _encode(served: ServedModel, side: str, text: str, loc: tuple, *, bos: bool = False, eos: bool = False,
            limit: int = MAX_LENGTH) -> np.ndarray:
    vocab = served.vocab(side)
    if vocab is None:
        raise RequestError(loc, "this model's checkpoint carries no vocabulary (extra.store.vocab); send token ids")
    ids = vocab.encode(text, bos=bos, eos=eos)
    if len(ids) < 1 + bos + eos:
        raise RequestError(loc, "text has no tokens")
    if len(ids) > limit:
        raise RequestError(loc, f"{len(ids)} tokens; the limit is {limit}")
    return np.asarray(ids, np.int64)


def _text_support(served: ServedModel, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Texts cut into (input, next token) sequences of the store's ``max_len``, as the ptb-char builder does."""
    max_len = int((served.store.get("features") or {}).get("max_len", MAX_LENGTH))
    pieces = [p for i, t in enumerate(texts)
              for p in sentence_pieces(_encode(served, "target", t, ("texts", i), limit=MAX_TEXT_CHARS).tolist(),
                                       max_len)]
    if len(pieces) > MAX_SUPPORT:
        raise RequestError(("texts",), f"{len(pieces)} sequences of at most {max_len} tokens; the limit is "
                                       f"{MAX_SUPPORT}")
    return [x.astype(np.int64) for x, _ in pieces], [y.astype(np.int64) for _, y in pieces]


# ----------------------------------------------------------------------------- requests


def prepare_support(served: ServedModel, req: AdaptRequest | AdapterRequest, job: Job) -> None:
    """Fill ``job``'s support arrays (and steps) from whichever support form the request used."""
    job.steps = served.learner.cfg.adapt_steps if req.steps is None else req.steps
    if req.support is not None:
        pairs = [_example(served, ex.x, ex.y, ("support", i)) for i, ex in enumerate(req.support)]
        job.support_x, job.support_y = [p[0] for p in pairs], [p[1] for p in pairs]
    elif req.history is not None:
        _form(served, "history")
        task = history.support_task(served, req.history)
        job.support_x, job.support_y = task["support_x"], task["support_y"]
        job.scale = (task["offset"], task["scale"])
        if isinstance(req, AdaptRequest):  # the history's next window is /v1/adapt's query
            job.query_x = task["query_x"]
    elif req.texts is not None:
        _form(served, "texts")
        job.support_x, job.support_y = _text_support(served, req.texts)
    else:
        _form(served, "pairs")
        job.support_x = [_encode(served, "source", p.source, ("pairs", i, "source"), eos=True)
                         for i, p in enumerate(req.pairs)]
        job.support_y = [_encode(served, "target", p.target, ("pairs", i, "target"), eos=True)
                         for i, p in enumerate(req.pairs)]
    _cells(job.support_x, "support", MAX_SUPPORT_CELLS)


def prepare_query(served: ServedModel, req: AdaptRequest | PredictRequest, job: Job) -> None:
    """Fill ``job``'s query arrays and decode options from whichever query form the request used."""
    job.decode = req.decode if LAYOUTS[served.family].decodes else DecodeOptions()
    form = "query"
    if req.query is not None:  # the task layout is in model units: no unscaling of the predictions
        job.query_x = [_example(served, q.x, None, ("query", i))[0] for i, q in enumerate(req.query)]
        job.scale = None
    elif getattr(req, "history", None) is not None and job.query_x is None:
        _form(served, "history")
        job.query_x, job.scale = history.query_window(served, req.history)
    elif req.prompts is not None:
        form = "prompts"
        _form(served, form)
        job.query_x = [_encode(served, "target", t, ("prompts", i), bos=True) for i, t in enumerate(req.prompts)]
    elif req.sources is not None:
        form = "sources"
        _form(served, form)
        job.query_x = [_encode(served, "source", t, ("sources", i), eos=True) for i, t in enumerate(req.sources)]
    if job.query_x is not None:
        _cells(job.query_x, "query", MAX_QUERY_CELLS)
        _decode_work(served, job, form)
