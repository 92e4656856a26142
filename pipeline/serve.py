"""Serve fast adaptation over HTTP with Ray Serve, and the ``metalstm serve`` command.

A client sends a new task's support set; the replica adapts θ on it (``MetaLearner.adapt``, the code path
training evaluates with) and predicts the query. Concurrent requests are batched with ``serve.batch`` into
ONE task-batched inner loop: their support sets are collated into a single ``TaskBatch`` (one task per
request, grouped by step count), so a batch of 16 costs one adaptation of 16 tasks, not 16 adaptations.
While one batch computes, the batches ``serve.batch`` closes meanwhile are merged into the next one
(``pipeline.coalesce``): under load each inner loop takes every request that waited for it. The maths
(``pipeline.adaptation``) runs in the replica's model process (``pipeline.model_process``), so HTTP handling
and the inner loop do not share a GIL; this module turns requests into jobs and answers.

The model is a registered MLflow version, given to the deployment as ``user_config``
(``{"model_uri": "models:/NAME/V", "tracking_uri": ...}``). ``reconfigure`` loads a new version in a
thread while the old one keeps serving and swaps only when loading succeeded, so switching versions needs
no restart and a broken version never replaces a working one. ``metalstm serve --follow`` re-resolves a
registry alias and redeploys with the new ``user_config`` when the alias moves.

Routes: ``GET /healthz``, ``GET /v1/model``, ``POST /v1/adapt``, ``POST /v1/adapters``,
``POST /v1/adapters/{id}/predict``, ``DELETE /v1/adapters/{id}`` (see docs/serving.md).
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from metalstm import NonFiniteLossError, series
from pipeline.adaptation import MAX_BATCH_CELLS, MAX_BATCH_REQUESTS, Job, ServedModel, load_model
from pipeline.adapter_cache import AdapterCache, AdapterTooLargeError, tensor_bytes
from pipeline.coalesce import Coalescer
from pipeline.model_process import ModelProcess, ModelProcessError
from pipeline.serve_schema import (
    MAX_BODY_BYTES,
    MAX_LENGTH,
    MAX_QUERY_CELLS,
    MAX_SUPPORT,
    MAX_SUPPORT_CELLS,
    MAX_TEXT_CHARS,
    AdapterRequest,
    AdapterResponse,
    AdaptRequest,
    AdaptResponse,
    ForecastHistory,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "METALSTM_SERVE_TOKEN"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # read by Serve's controller and replicas at start
APP_NAME = "metalstm"
DEPLOYMENT_NAME = "MetaLSTMAdapter"


class RequestError(ValueError):
    """A request that does not fit the loaded model; ``loc`` names the field (422)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, status: int = 422) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc, self.msg, self.status = loc, msg, status


# ----------------------------------------------------------------------------- request → arrays


def _tokens(seq: list[float], loc: tuple, vocab_size: int, min_len: int = 1) -> np.ndarray:
    if len(seq) < min_len:
        raise RequestError(loc, f"need at least {min_len} token(s), got {len(seq)}")
    if seq and isinstance(seq[0], list):
        raise RequestError(loc, "expected a flat list of token ids, got a list of lists")
    a = np.asarray(seq, np.float64)
    bad = np.flatnonzero((a != np.floor(a)) | (a < 0) | (a >= vocab_size))
    if bad.size:
        raise RequestError((*loc, int(bad[0])), f"unknown token {seq[bad[0]]!r}: ids must be integers in "
                                                f"[0, {vocab_size}) (the model's vocabulary size)")
    return a.astype(np.int64)


def _reals(seq: list, loc: tuple, features: int | None, length: int | None = None) -> np.ndarray:
    """A forecast window ``[L, F]`` (a flat list is ``[L, 1]``) or a fixed-size vector (``features=None``)."""
    try:
        a = np.asarray(seq, np.float32)
    except ValueError:  # ragged nested lists
        raise RequestError(loc, "steps have different numbers of features") from None
    if features is None:  # a vector of exactly `length` numbers
        if a.ndim != 1 or len(a) != length:
            raise RequestError(loc, f"expected a flat list of {length} numbers, got shape {list(a.shape)}")
        return a
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


def _example(served: ServedModel, x: list, y: list | None, loc: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    model, family = served.model, served.family
    if family == "regression":
        xs = _reals(x, (*loc, "x"), None, model.sizes[0])
        return xs, None if y is None else _reals(y, (*loc, "y"), None, model.sizes[-1])
    if family == "forecast":
        xs = _reals(x, (*loc, "x"), model.input_size)
        return xs, None if y is None else _reals(y, (*loc, "y"), None, model.horizon)
    if family == "lm":
        xs = _tokens(x, (*loc, "x"), model.vocab_size)
        if y is None:
            return xs, None
        ys = _tokens(y, (*loc, "y"), model.vocab_size)
        if len(ys) != len(xs):
            raise RequestError((*loc, "y"), f"expected the next token of every input token: {len(xs)} ids "
                                            f"(as many as x), got {len(ys)}")
        return xs, ys
    if family == "mt":
        xs = _tokens(x, (*loc, "x"), model.src_vocab_size)
        return xs, None if y is None else _tokens(y, (*loc, "y"), model.tgt_vocab_size)
    raise RequestError(("model",), f"family {family!r} is not servable")  # pragma: no cover


def _cells(seqs: list[np.ndarray], loc: str, limit: int) -> None:
    cells = len(seqs) * max(len(s) for s in seqs)
    if cells > limit:
        raise RequestError((loc,), f"{len(seqs)} examples x longest {max(len(s) for s in seqs)} steps = {cells} "
                                   f"padded cells; the limit is {limit}")


def _forecast_settings(served: ServedModel) -> dict[str, Any]:
    """How the task builder windowed and scaled a history, from the checkpoint's ``extra.store``."""
    feats, norm = served.store.get("features") or {}, served.store.get("normalisation") or {}
    if "window" not in feats:
        raise RequestError(("history",), "this model's checkpoint has no extra.store.features.window, so a raw "
                                         "history cannot be windowed the way it was trained; send support/query")
    covariates = [c for c in feats.get("covariates") or [] if c != "value"]  # the builder lists "value" first
    if 1 + len(covariates) != served.model.input_size:
        raise RequestError(("history",), f"the store's covariates {covariates} do not match the model's "
                                         f"input_size {served.model.input_size}")
    horizon = int(feats.get("horizon", served.model.horizon))
    return {"window": int(feats["window"]), "horizon": horizon, "stride": int(feats.get("stride", horizon)),
            "support_windows": feats.get("support_windows"), "covariates": covariates,
            "scale_method": norm.get("method", "mean"), "max_gap": int(norm.get("max_gap", 0))}


def _history_timestamps(h: ForecastHistory, covariates: list[str]) -> list[str] | np.ndarray:
    if h.timestamps is not None:
        return h.timestamps
    if covariates:
        raise RequestError(("history", "timestamps"), f"required: the model uses calendar covariates {covariates}")
    return np.arange(len(h.values)).astype("datetime64[h]")  # placeholders: no covariate reads them


def _history_support(served: ServedModel, h: ForecastHistory) -> dict[str, Any]:
    s = _forecast_settings(served)
    values = np.asarray([np.nan if v is None else v for v in h.values], np.float64)
    try:
        task = series.adaptation_task(values, _history_timestamps(h, s["covariates"]), window=s["window"],
                                      horizon=s["horizon"], stride=s["stride"],
                                      support_windows=h.support_windows or s["support_windows"],
                                      covariates=s["covariates"], scale_method=s["scale_method"],
                                      max_gap=s["max_gap"])
    except ValueError as e:
        raise RequestError(("history",), str(e)) from None
    if len(task["support_x"]) > MAX_SUPPORT:
        task["support_x"], task["support_y"] = task["support_x"][-MAX_SUPPORT:], task["support_y"][-MAX_SUPPORT:]
    return task


def _history_query(served: ServedModel, h: ForecastHistory) -> tuple[list[np.ndarray], tuple[float, float]]:
    s = _forecast_settings(served)
    values = np.asarray([np.nan if v is None else v for v in h.values], np.float64)
    try:
        values = series.interpolate_gaps(values, s["max_gap"])
        offset, scale = series.series_scale(values, s["scale_method"])
        x = series.forecast_input(values, _history_timestamps(h, s["covariates"]), s["window"], offset=offset,
                                  scale=scale, covariates=s["covariates"])
    except ValueError as e:
        raise RequestError(("history",), str(e)) from None
    return [x], (offset, scale)


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


def prepare_support(served: ServedModel, req: AdaptRequest | AdapterRequest, job: Job) -> None:
    """Fill ``job``'s support arrays from whichever support form the request used."""
    job.steps = served.learner.cfg.adapt_steps if req.steps is None else req.steps
    family = served.family
    if req.support is not None:
        pairs = [_example(served, ex.x, ex.y, ("support", i)) for i, ex in enumerate(req.support)]
        job.support_x, job.support_y = [p[0] for p in pairs], [p[1] for p in pairs]
    elif req.history is not None:
        if family != "forecast":
            raise RequestError(("history",), f"only for forecasting models; this one is {family!r}")
        task = _history_support(served, req.history)
        job.support_x, job.support_y = task["support_x"], task["support_y"]
        job.scale = (task["offset"], task["scale"])
        if isinstance(req, AdaptRequest):
            job.query_x = task["query_x"]
    elif req.texts is not None:
        if family != "lm":
            raise RequestError(("texts",), f"only for language models; this one is {family!r}")
        from pipeline.builders.ptb import sentence_pieces  # x = [BOS] + ids, y = ids + [EOS], cut at max_len

        max_len = int((served.store.get("features") or {}).get("max_len", MAX_LENGTH))
        pieces = [p for i, t in enumerate(req.texts)
                  for p in sentence_pieces(_encode(served, "target", t, ("texts", i), limit=MAX_TEXT_CHARS).tolist(),
                                                   max_len)]
        if len(pieces) > MAX_SUPPORT:
            raise RequestError(("texts",), f"{len(pieces)} sequences of at most {max_len} tokens; the limit is "
                                           f"{MAX_SUPPORT}")
        job.support_x = [x.astype(np.int64) for x, _ in pieces]
        job.support_y = [y.astype(np.int64) for _, y in pieces]
    else:
        if family != "mt":
            raise RequestError(("pairs",), f"only for translation models; this one is {family!r}")
        job.support_x = [_encode(served, "source", p.source, ("pairs", i, "source"), eos=True)
                         for i, p in enumerate(req.pairs)]
        job.support_y = [_encode(served, "target", p.target, ("pairs", i, "target"), eos=True)
                         for i, p in enumerate(req.pairs)]
    _cells(job.support_x, "support", MAX_SUPPORT_CELLS)


def prepare_query(served: ServedModel, req: AdaptRequest | PredictRequest, job: Job) -> None:
    family = served.family
    job.decode = req.decode
    if req.query is not None:  # the task layout is in model units: no unscaling of the predictions
        job.query_x = [_example(served, q.x, None, ("query", i))[0] for i, q in enumerate(req.query)]
        job.scale = None
    elif getattr(req, "history", None) is not None and job.query_x is None:
        if family != "forecast":
            raise RequestError(("history",), f"only for forecasting models; this one is {family!r}")
        job.query_x, job.scale = _history_query(served, req.history)
    elif req.prompts is not None:
        if family != "lm":
            raise RequestError(("prompts",), f"only for language models; this one is {family!r}")
        job.query_x = [_encode(served, "target", t, ("prompts", i), bos=True) for i, t in enumerate(req.prompts)]
    elif req.sources is not None:
        if family != "mt":
            raise RequestError(("sources",), f"only for translation models; this one is {family!r}")
        job.query_x = [_encode(served, "source", t, ("sources", i), eos=True) for i, t in enumerate(req.sources)]
    if job.query_x is not None:
        _cells(job.query_x, "query", MAX_QUERY_CELLS)


def _batch_cost(jobs: list[Job]) -> int:
    return sum(j.cost for j in jobs)


# ----------------------------------------------------------------------------- HTTP app

app = FastAPI(title="MetaLSTM adaptation service", version="1",
              description="Adapt a meta-trained sequence model to a new task from its support set and predict.")


def _replica() -> "AdaptationServer | None":
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # outside a replica (tests of the bare app)
        return None


class GuardMiddleware:
    """Bearer token (when configured) and body-size limit, both checked before the body is parsed."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        server = _replica()
        token = getattr(server, "token", None)
        limit = getattr(server, "max_body_bytes", MAX_BODY_BYTES)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        headers = dict(scope.get("headers") or [])
        if token and path != "/healthz":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
                return await _reply(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                    [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _reply(send, 400, "Content-Length: not an integer")
            if size > limit:
                return await _reply(send, 413, f"request body: {size} bytes exceeds the limit of {limit} bytes")
        if scope.get("method") in ("POST", "PUT", "PATCH"):  # a chunked body has no length: count it as it comes
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await _reply(send, 413, f"request body: more than the limit of {limit} bytes")
            done = False

            async def replay():
                nonlocal done
                if done:
                    return await receive()
                done = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            return await self.inner(scope, replay, send)
        return await self.inner(scope, receive, send)


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


app.add_middleware(GuardMiddleware)


@app.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"detail": [{"loc": ["body", *e.loc], "msg": e.msg,
                                                                  "type": "value_error"}]})


@app.exception_handler(ModelProcessError)
async def _model_process_error(request: Request, e: ModelProcessError) -> JSONResponse:
    """The model process died with this request in it; a new one starts on the next call: retry."""
    return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": "1"})


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
              for err in e.errors()[:20]]
    return JSONResponse(status_code=422, content={"detail": errors})


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, graceful_shutdown_timeout_s=20)
@serve.ingress(app)
class AdaptationServer:
    """One replica: the current model, the adapter cache, and the batched adapt/predict loops."""

    def __init__(self, cache_max_entries: int = 1024, cache_ttl_s: float = 3600.0, cache_max_bytes: int = 256 << 20,
                 max_body_bytes: int = MAX_BODY_BYTES, token_env: str = TOKEN_ENV, torch_threads: int = 0,
                 batching: bool = True, model: dict[str, Any] | None = None) -> None:
        self.compute = ModelProcess(torch_threads)  # every inner loop and forward pass runs there
        self.token = os.environ.get(token_env) or None
        self.max_body_bytes = int(max_body_bytes)
        self.cache = AdapterCache(cache_max_entries, cache_ttl_s, cache_max_bytes)
        self.served: ServedModel | None = None
        self.previous_version: str | None = None
        self.last_switch_error: str | None = None
        self.batched = batching  # False: one request at a time (the benchmark's baseline)
        self._serial = asyncio.Lock()
        self._adapt_runner = Coalescer(self._adapt_and_predict, _batch_cost, MAX_BATCH_CELLS)
        self._predict_runner = Coalescer(self._predict_with_adapters, len, MAX_BATCH_REQUESTS)
        self.batching = {name: {"batches": 0, "requests": 0, "largest": 0} for name in ("adapt", "predict")}
        if model:  # without user_config (a plain Python deployment); reconfigure replaces it later
            served = load_model(model["model_uri"], model.get("tracking_uri"), model.get("alias"))
            self.compute.load(served)
            self.served = served

    def __del__(self) -> None:  # Serve calls this when it stops the replica: stop the model process with it
        self.compute.close()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Load the version ``config`` names; keep serving the current one if that fails."""
        uri = config.get("model_uri")
        if not uri:
            raise ValueError("user_config.model_uri: required (models:/NAME/VERSION)")
        if self.served is not None and self.served.model_uri == uri:
            return
        try:
            served = await asyncio.to_thread(load_model, uri, config.get("tracking_uri"), config.get("alias"))
            await asyncio.to_thread(self.compute.load, served)
        except Exception as e:
            if self.served is None:  # nothing to fall back on: fail the replica start
                raise
            self.last_switch_error = f"{uri}: {type(e).__name__}: {e}"
            log.error("model switch to %s failed; still serving %s version %s: %s", uri, self.served.name,
                      self.served.version, e)
            return
        if self.served is not None:
            self.previous_version = self.served.version
            log.info("switched %s from version %s to %s", served.name, self.served.version, served.version)
        self.served, self.last_switch_error = served, None

    def _model(self) -> ServedModel:
        if self.served is None:
            raise HTTPException(503, "no model loaded yet")
        return self.served

    # --- batched work. serve.batch takes what has arrived without waiting (a lone request should not idle) and
    # hands each batch over at once; the coalescer merges all that wait for the model into its next call, run
    # in a thread so that the event loop keeps accepting requests meanwhile: under load, that is where batches fill

    @serve.batch(max_batch_size=MAX_BATCH_CELLS, batch_wait_timeout_s=0.0, batch_size_fn=_batch_cost,
                 max_concurrent_batches=MAX_BATCH_REQUESTS)
    async def _adapt_batch(self, jobs: list[Job]) -> list[Any]:
        return await self._adapt_runner.submit(jobs)

    def _count(self, name: str, size: int) -> None:
        stats = self.batching[name]
        stats["batches"] += 1
        stats["requests"] += size
        stats["largest"] = max(stats["largest"], size)

    def _adapt_and_predict(self, jobs: list[Job]) -> list[Any]:
        self._count("adapt", len(jobs))
        return self.compute.adapt_and_predict(jobs)

    @serve.batch(max_batch_size=MAX_BATCH_REQUESTS, batch_wait_timeout_s=0.0,
                 max_concurrent_batches=MAX_BATCH_REQUESTS)
    async def _predict_batch(self, jobs: list[Job]) -> list[Any]:
        return await self._predict_runner.submit(jobs)

    def _predict_with_adapters(self, jobs: list[Job]) -> list[Any]:
        self._count("predict", len(jobs))
        return self.compute.predict(jobs)

    async def _adapt(self, job: Job) -> tuple[dict[str, torch.Tensor], float, float, list[Prediction] | None]:
        if self.batched:
            adapted, preds = await self._adapt_batch(job)
        else:
            async with self._serial:
                ((adapted, preds),) = await asyncio.to_thread(self._adapt_and_predict, [job])
        for outcome in (adapted, preds):
            if isinstance(outcome, NonFiniteLossError):
                raise RequestError(("support",), f"adaptation diverged: {outcome}")
            if isinstance(outcome, ValueError):
                raise RequestError(("support",), str(outcome))
            if isinstance(outcome, Exception):
                log.exception("adaptation failed", exc_info=outcome)
                raise HTTPException(500, f"adaptation failed: {type(outcome).__name__}: {outcome}")
        return (*adapted, preds)

    # --- routes

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok" if self.served is not None else "loading",
                "version": None if self.served is None else self.served.version}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> ModelInfo:
        s = self._model()
        return ModelInfo(name=s.name, version=s.version, alias=s.alias, config_digest=s.config_digest,
                         model_uri=s.model_uri, run_id=s.run_id, family=s.family, kind=s.kind,
                         adapt_steps=s.learner.cfg.adapt_steps, loaded_at=s.loaded_at,
                         previous_version=self.previous_version, last_switch_error=self.last_switch_error,
                         cache=self.cache.stats(), batching=self.batching, model_process=self.compute.stats())

    @app.post("/v1/adapt", response_model=AdaptResponse, response_model_exclude_none=True)
    async def adapt(self, req: AdaptRequest) -> AdaptResponse:
        served = self._model()
        job = Job(served)
        prepare_support(served, req, job)
        prepare_query(served, req, job)
        _, before, after, preds = await self._adapt(job)
        return AdaptResponse(model={"name": served.name, "version": served.version}, steps=job.steps,
                             support_loss_before=before, support_loss_after=after, predictions=preds)

    @app.post("/v1/adapters", response_model=AdapterResponse, status_code=201)
    async def create_adapter(self, req: AdapterRequest) -> AdapterResponse:
        served = self._model()
        job = Job(served)
        prepare_support(served, req, job)
        params, before, after, _ = await self._adapt(job)
        nbytes = tensor_bytes(params)
        try:  # the entry keeps its model: adapters made before a version switch keep working
            key = self.cache.put({"params": params, "served": served, "scale": job.scale}, nbytes)
        except AdapterTooLargeError as e:
            raise RequestError(("support",), str(e), status=413) from None
        return AdapterResponse(id=key, model={"name": served.name, "version": served.version}, steps=job.steps,
                               support_loss_before=before, support_loss_after=after, bytes=nbytes,
                               ttl_s=self.cache.ttl_s)

    @app.post("/v1/adapters/{adapter_id}/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(self, adapter_id: str, req: PredictRequest) -> PredictResponse:
        entry = self.cache.get(adapter_id)
        if entry is None:
            raise HTTPException(404, f"adapter {adapter_id!r}: unknown or expired")
        served = entry.value["served"]
        job = Job(served, params=entry.value["params"], scale=entry.value["scale"])
        prepare_query(served, req, job)
        if self.batched:
            preds = await self._predict_batch(job)
        else:
            async with self._serial:
                (preds,) = await asyncio.to_thread(self._predict_with_adapters, [job])
        if isinstance(preds, Exception):
            raise RequestError(("query",), str(preds)) if isinstance(preds, ValueError) else HTTPException(
                500, f"prediction failed: {type(preds).__name__}: {preds}")
        return PredictResponse(id=adapter_id, model={"name": served.name, "version": served.version},
                               predictions=preds)

    @app.delete("/v1/adapters/{adapter_id}", status_code=204)
    async def delete_adapter(self, adapter_id: str) -> None:
        if not self.cache.delete(adapter_id):
            raise HTTPException(404, f"adapter {adapter_id!r}: unknown or expired")


# ----------------------------------------------------------------------------- deployment


def _code_version() -> str:
    """A hash of the code a replica runs: equal hashes let Serve apply a new user_config in place."""
    here = Path(__file__).parent
    files = [here / f for f in ("serve.py", "serve_schema.py", "adaptation.py", "model_process.py", "coalesce.py",
                                "adapter_cache.py", "registry.py")]
    files += sorted((here.parent / "metalstm").glob("*.py"))
    h = hashlib.sha256()
    for path in files:
        if path.exists():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


CODE_VERSION = _code_version()  # fixed at import: a process redeploys with the version it started with


def model_config(model_uri: str, tracking_uri: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """The deployment's ``user_config`` for one concrete registered version."""
    return {"model_uri": model_uri, "tracking_uri": tracking_uri, "alias": alias}


def build_app(user_config: dict[str, Any], *, num_replicas: int = 1, num_cpus: float = 1.0,
              cache_max_entries: int = 1024, cache_ttl_s: float = 3600.0, cache_max_bytes: int = 256 << 20,
              max_body_bytes: int = MAX_BODY_BYTES, token_env: str = TOKEN_ENV, torch_threads: int = 0,
              batching: bool = True, env_vars: dict[str, str] | None = None) -> serve.Application:
    """The Serve application for ``serve.run``.

    The deployment version is pinned to :data:`CODE_VERSION` (Serve would otherwise draw a random one per
    ``serve.run`` and replace every replica), so redeploying with only a new ``user_config`` reconfigures
    the running replicas in place: no restart, the adapter cache survives, and a failed load changes nothing.
    """
    actor_options: dict[str, Any] = {"num_cpus": num_cpus}
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
    deployment = AdaptationServer.options(version=CODE_VERSION, _internal=True, num_replicas=num_replicas,
                                          user_config=user_config, ray_actor_options=actor_options)
    return deployment.bind(cache_max_entries=cache_max_entries, cache_ttl_s=cache_ttl_s,
                           cache_max_bytes=cache_max_bytes, max_body_bytes=max_body_bytes, token_env=token_env,
                           torch_threads=torch_threads, batching=batching)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve deploy``/``serve run`` configs (``import_path: pipeline.serve:app_builder``).

    The model comes from the config's deployment ``user_config``; ``args`` tune the replica.
    """
    known = {"cache_max_entries", "cache_ttl_s", "cache_max_bytes", "max_body_bytes", "token_env", "torch_threads",
             "batching"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"args: unknown keys {unknown}; expected some of {sorted(known)}")
    return AdaptationServer.bind(**args)


# ----------------------------------------------------------------------------- the command


def direct_ingress_urls(app_name: str, host: str, wait_s: float = 10.0) -> list[str]:
    """The HTTP addresses of ``app_name``'s replicas themselves, when Serve runs with direct ingress; else ``[]``.

    With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (set where Serve's controller and replicas start) every ingress
    replica also serves HTTP on a port of its own (30000 and up), under the same route prefix, and a client
    there skips the proxy's hop: on a small node the proxy's per-request CPU is what bounds batched throughput
    (docs/serving.md). The proxy keeps serving either way. Ray has no public call for these addresses; the
    controller's target groups (what its load-balancer integration reads) are asked: with direct ingress off
    they name only the proxies, in groups of no application.
    """
    import ray
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + wait_s
    while True:  # a replica registers its port just after it starts
        try:
            groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name), timeout=10)
        except Exception as e:  # an older or newer Serve without this call: fall back to the proxy
            log.warning("could not look up direct-ingress addresses: %s", e)
            return []
        urls = [f"http://{host if host not in ('0.0.0.0', '::') else target.ip}:{target.port}"
                for group in groups if group.app_name == app_name and str(group.protocol).upper().endswith("HTTP")
                for target in group.targets]
        if urls or time.monotonic() > deadline:
            return sorted(set(urls))
        time.sleep(0.5)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the project's)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--follow", action="store_true", help="re-resolve the alias and switch when it moves")
    parser.add_argument("--poll-s", type=float, default=30.0, help="--follow: seconds between alias look-ups")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (the adapter cache is per replica)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--cache-max-entries", type=int, default=1024,
                        help="adapters (POST /v1/adapters) kept per replica, least recently used evicted first "
                             "(default 1024)")
    parser.add_argument("--cache-ttl-s", type=float, default=3600.0,
                        help="seconds an unused adapter is kept (default 3600)")
    parser.add_argument("--cache-max-mb", type=float, default=256.0,
                        help="memory cap of a replica's adapter weights, in MiB (default 256)")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20),
                        help=f"largest request body, in MiB; larger ones get 413 before parsing "
                             f"(default {MAX_BODY_BYTES / (1 << 20):g})")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="off by default: replicas also answer on ports of their own (printed at start), "
                             "skipping the proxy's hop; a local cluster gets it, a running one must have been "
                             f"started with {DIRECT_INGRESS_ENV}=1")
    parser.add_argument("--once", action="store_true", help="deploy and return (leave Serve running)")


def _tracking_uri(uri: str | None) -> str:
    try:
        from pipeline.tracking import resolve_tracking_uri
    except ImportError:  # pragma: no cover - before the tracking module exists
        return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return resolve_tracking_uri(uri)


def resolve(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """``models:/NAME@ALIAS`` → the user_config for the concrete version it points at now (a cheap look-up)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.cli import UserError
    from pipeline.registry import parse_model_uri
    from pipeline.tracking import not_found_hint, require_store

    name, alias, version = parse_model_uri(model_uri)
    if alias:
        require_store(tracking_uri)  # opening a missing local store would create an empty one
        try:
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            version = client.get_model_version_by_alias(name, alias).version
        except MlflowException as e:
            raise UserError(f"{model_uri}: cannot resolve the alias {not_found_hint(tracking_uri)} "
                            f"({e.message})") from None
    return model_config(f"models:/{name}/{version}", tracking_uri, alias)


def _check_args(args: argparse.Namespace) -> None:
    if not args.model.startswith("models:/"):
        raise ValueError(f"--model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {args.model!r}")
    for name, value, low in (("--port", args.port, 1), ("--replicas", args.replicas, 1),
                             ("--cache-max-entries", args.cache_max_entries, 1)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    for name, value in (("--poll-s", args.poll_s), ("--num-cpus", args.num_cpus), ("--cache-ttl-s", args.cache_ttl_s),
                        ("--cache-max-mb", args.cache_max_mb), ("--max-body-mb", args.max_body_mb)):
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")


def _served_version(host: str, port: int, token: str | None) -> dict[str, Any] | None:
    import requests

    try:
        r = requests.get(f"http://{host}:{port}/v1/model", timeout=10,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        return r.json() if r.ok else None
    except requests.RequestException:
        return None


def _wait(stop: threading.Event, seconds: float) -> bool:
    """Wait in short slices: a signal delivered to another thread only runs its handler when the main thread wakes."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        stop.wait(min(left, 0.5))
    return stop.is_set()


def follow_alias(model_uri: str, tracking_uri: str, current: dict[str, Any], deploy: Callable[[dict], None], *,
                 poll_s: float, stop: threading.Event, served: Callable[[], dict | None] | None = None) -> None:
    """Re-resolve ``model_uri`` every ``poll_s`` and redeploy with the new user_config when the alias moves.

    Only a changed user_config reaches the replicas (``reconfigure``); moving an alias alone changes nothing
    until this loop sees it. ``served`` (optional) reports what the replicas serve after a switch, to log a
    version that failed to load (the replicas keep the previous one).
    """
    while not _wait(stop, poll_s):
        try:
            latest = resolve(model_uri, tracking_uri)
        except Exception as e:  # a registry hiccup must not stop the server
            log.warning("could not re-resolve %s: %s", model_uri, e)
            continue
        if latest["model_uri"] == current["model_uri"]:
            continue
        log.info("%s moved to %s; reconfiguring", model_uri, latest["model_uri"])
        try:
            deploy(latest)
        except Exception as e:
            log.error("redeploying with %s failed: %s", latest["model_uri"], e)
        info = served() if served else None
        if served and not (info and f"models:/{info['name']}/{info['version']}" == latest["model_uri"]):
            log.error("switch to %s did not take; still serving version %s (%s)", latest["model_uri"],
                      info and info.get("version"), info and info.get("last_switch_error"))
        current = latest  # a broken version is not retried every poll; the next move of the alias is


def run(args: argparse.Namespace) -> int:
    import ray

    _check_args(args)
    tracking_uri = _tracking_uri(args.tracking_uri)
    config = resolve(args.model, tracking_uri)
    load_model(config["model_uri"], tracking_uri)  # fail here, with a clear message, rather than in a replica
    token = os.environ.get(TOKEN_ENV)

    def deploy(cfg: dict[str, Any]) -> None:
        serve.run(build_app(cfg, num_replicas=args.replicas, num_cpus=args.num_cpus,
                            cache_max_entries=args.cache_max_entries, cache_ttl_s=args.cache_ttl_s,
                            cache_max_bytes=int(args.cache_max_mb * (1 << 20)),
                            max_body_bytes=int(args.max_body_mb * (1 << 20)),
                            env_vars={TOKEN_ENV: token} if token else None),
                  name=APP_NAME, route_prefix="/")

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if args.direct_ingress and not address:  # the local cluster's Serve processes inherit this environment
            os.environ[DIRECT_INGRESS_ENV] = "1"
        ray.init(address=address)
    serve.start(http_options={"host": args.host, "port": args.port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # also when started in the background (SIGINT ignored there)
        signal.signal(sig, lambda *_: stop.set())
    deploy(config)
    print(f"serving {config['model_uri']} at http://{args.host}:{args.port} (OpenAPI at /docs)", flush=True)
    if args.direct_ingress:
        urls = direct_ingress_urls(APP_NAME, args.host)
        if urls:
            print(f"direct ingress (no proxy hop): {' '.join(urls)}", flush=True)
        else:
            log.warning("--direct-ingress: this cluster's Serve runs without direct ingress (start the cluster with "
                        "%s=1); serving through the proxy only", DIRECT_INGRESS_ENV)
    if args.once:
        return 0
    try:
        if args.follow:
            follow_alias(args.model, tracking_uri, config, deploy, poll_s=args.poll_s, stop=stop,
                         served=lambda: _served_version(args.host, args.port, token))
        else:
            while not _wait(stop, 3600):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
