"""The adaptation service: a FastAPI app on a Ray Serve deployment, and how to build it (``app_builder``).

A client sends a new task's support set; the replica adapts θ on it (``MetaLearner.adapt``, the code path
training evaluates with) and predicts the query. Concurrent requests are batched with ``serve.batch`` into
ONE task-batched inner loop: their support sets are collated into a single ``TaskBatch`` (one task per
request, grouped by step count), so a batch of 16 costs one adaptation of 16 tasks, not 16 adaptations.
While one batch computes, the batches ``serve.batch`` closes meanwhile are merged into the next one
(``pipeline.serving.coalesce``): under load each inner loop takes every request that waited for it. The maths
(``pipeline.serving.jobs``) runs in the replica's model process (``pipeline.serving.model_process``), so HTTP
handling and the inner loop do not share a GIL. Requests become jobs in ``pipeline.serving.request_jobs``; the
token and body limit are checked in ``pipeline.serving.middleware``; ``metalstm serve`` is
``pipeline.serving.command``.

The model is a registered MLflow version, given to the deployment as ``user_config``
(``{"model_uri": "models:/NAME/V", "tracking_uri": ..., "alias": ...}``). ``reconfigure`` loads a new version
in a thread while the old one keeps serving and swaps only when loading succeeded, so switching versions needs
no restart and a broken version never replaces a working one.

Routes: ``GET /healthz``, ``GET /v1/model``, ``POST /v1/adapt``, ``POST /v1/adapters``,
``POST /v1/adapters/{id}/predict``, ``DELETE /v1/adapters/{id}`` (see docs/serving.md).
"""

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from metalstm import NonFiniteLossError
from pipeline.serving.adapter_cache import (
    AdapterTooLargeError,
    StoreUnavailableError,
    adapter_store_deployment,
    replica_adapters,
)
from pipeline.serving.coalesce import Coalescer
from pipeline.serving.jobs import MAX_BATCH_CELLS, MAX_BATCH_REQUESTS, Job, ServedModel, load_model
from pipeline.serving.middleware import (
    TOKEN_ENV,
    GuardMiddleware,
    read_token,
    replica_token,
    require_token,
    serve_http_host,
)
from pipeline.serving.model_process import ModelProcess, ModelProcessError
from pipeline.serving.request_jobs import prepare_query, prepare_support
from pipeline.serving.schema import (
    MAX_BODY_BYTES,
    AdapterRequest,
    AdapterResponse,
    AdaptRequest,
    AdaptResponse,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
    RequestError,
)

log = logging.getLogger(__name__)

APP_NAME = "metalstm"
DEPLOYMENT_NAME = "MetaLSTMAdapter"
REQUEST_TIMEOUT_S = 60.0  # a request not answered by then gets 504 (the largest legitimate ones take seconds)
FAILED_CHECKS_TO_RESTART = 6  # Serve's health checks (10 s apart) the model process may fail in a row


# ----------------------------------------------------------------------------- HTTP app

app = FastAPI(title="MetaLSTM adaptation service", version="1",
              description="Adapt a meta-trained sequence model to a new task from its support set and predict.")
app.add_middleware(GuardMiddleware)


@app.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"detail": [{"loc": ["body", *e.loc], "msg": e.msg,
                                                                  "type": "value_error"}]})


@app.exception_handler(ModelProcessError)
async def _model_process_error(request: Request, e: ModelProcessError) -> JSONResponse:
    """The model process died with this request in it, or stopped answering and was killed; a new one is
    starting: retry."""
    return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": "1"})


@app.exception_handler(StoreUnavailableError)
async def _store_unavailable(request: Request, e: StoreUnavailableError) -> JSONResponse:
    """The shared adapter store did not answer (it restarts by itself): retry."""
    return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": "1"})


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
              for err in e.errors()[:20]]
    return JSONResponse(status_code=422, content={"detail": errors})


def _batch_cost(jobs: list[Job]) -> int:
    return sum(j.cost for j in jobs)


def _raise_failure(outcome: Any, loc: str, what: str) -> None:
    """An exception the model process returned for this request, as the HTTP error it means."""
    if isinstance(outcome, NonFiniteLossError):
        raise RequestError((loc,), f"adaptation diverged: {outcome}")
    if isinstance(outcome, ValueError):
        raise RequestError((loc,), str(outcome))
    if isinstance(outcome, Exception):
        log.error("%s failed", what, exc_info=outcome)
        raise HTTPException(500, f"{what} failed: {type(outcome).__name__}: {outcome}")


# ----------------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, graceful_shutdown_timeout_s=20)
@serve.ingress(app)
class AdaptationServer:
    """One replica: the current model, its access to the adapters, and the batched adapt/predict loops.

    ``adapter_store`` is a handle to the application's shared ``AdapterStore`` deployment (several replicas);
    without one the adapters live in this replica (``cache_*`` bound them either way).
    """

    def __init__(self, cache_max_entries: int = 1024, cache_ttl_s: float = 3600.0, cache_max_bytes: int = 256 << 20,
                 max_body_bytes: int = MAX_BODY_BYTES, token_env: str = TOKEN_ENV, torch_threads: int = 0,
                 batching: bool = True, model: dict[str, Any] | None = None, adapter_store: Any = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {request_timeout_s}")
        self.request_timeout_s = float(request_timeout_s)
        # every inner loop and forward pass runs there; a call past the request timeout stops it (nobody waits)
        self.compute = ModelProcess(torch_threads, call_timeout_s=self.request_timeout_s)
        self._probing: asyncio.Future | None = None  # the probe of the model process in flight, shared
        self._failed_checks = 0
        # read by GuardMiddleware, as is max_body_bytes; no token on a non-loopback host stops the replica here
        self.token = replica_token(token_env, DEPLOYMENT_NAME)
        self.max_body_bytes = int(max_body_bytes)
        self.adapters = replica_adapters(adapter_store, cache_max_entries, cache_ttl_s, cache_max_bytes)
        self.served: ServedModel | None = None
        self.previous_version: str | None = None
        self.last_switch_error: str | None = None
        self.batched = batching  # False: one request at a time (the benchmark's baseline)
        self._serial = asyncio.Lock()
        self._adapt_runner = Coalescer(self._adapt_and_predict, _batch_cost, MAX_BATCH_CELLS)
        self._predict_runner = Coalescer(self._predict_with_adapters, _batch_cost, MAX_BATCH_CELLS)
        self.batching = {name: {"batches": 0, "requests": 0, "largest": 0} for name in ("adapt", "predict")}
        if model:  # without user_config (a plain Python deployment); reconfigure replaces it later
            served = load_model(model["model_uri"], model.get("tracking_uri"), model.get("alias"))
            self.compute.load(served)
            self.served = served

    def __del__(self) -> None:  # Serve calls this when it stops the replica: stop the model process with it
        self.compute.close()

    async def _load(self, config: dict[str, Any]) -> ServedModel:
        """The version ``config`` names, loaded here and in the model process (bounded there)."""
        uri = config.get("model_uri")
        served = await asyncio.to_thread(load_model, uri, config.get("tracking_uri"), config.get("alias"))
        await asyncio.to_thread(self.compute.load, served)
        return served

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Load the version ``config`` names; keep serving the current one if that fails.

        A replica that starts (or restarts) with nothing loaded yet, on a version that does not load, serves
        ``config["fallback"]`` instead (the last version that did, which ``metalstm serve --follow`` adds):
        the user_config may still name a broken version when Serve replaces a replica.
        """
        uri = config.get("model_uri")
        if not uri:
            raise ValueError("user_config.model_uri: required (models:/NAME/VERSION)")
        if self.served is not None and self.served.model_uri == uri:
            return
        try:
            served = await self._load(config)
        except Exception as e:
            self.last_switch_error = f"{uri}: {type(e).__name__}: {e}"
            if self.served is None:  # starting: the fallback, or fail the replica start
                self.served = await self._load_fallback(config, e)
                return
            log.error("model switch to %s failed; still serving %s version %s: %s", uri, self.served.name,
                      self.served.version, e)
            return
        if self.served is not None:
            self.previous_version = self.served.version
            log.info("switched %s from version %s to %s", served.name, self.served.version, served.version)
        self.served, self.last_switch_error = served, None

    async def _load_fallback(self, config: dict[str, Any], error: Exception) -> ServedModel:
        fallback = config.get("fallback")
        if not fallback:
            raise error
        log.error("%s did not load (%s); starting on the fallback %s", config.get("model_uri"), error,
                  fallback.get("model_uri"))
        try:
            return await self._load(fallback)
        except Exception as e:
            raise RuntimeError(f"neither user_config.model_uri {config.get('model_uri')} ({error}) nor "
                               f"user_config.fallback {fallback.get('model_uri')} ({e}) loaded") from e

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

    @serve.batch(max_batch_size=MAX_BATCH_CELLS, batch_wait_timeout_s=0.0, batch_size_fn=_batch_cost,
                 max_concurrent_batches=MAX_BATCH_REQUESTS)
    async def _predict_batch(self, jobs: list[Job]) -> list[Any]:
        return await self._predict_runner.submit(jobs)

    def _count(self, name: str, size: int) -> None:
        stats = self.batching[name]
        stats["batches"] += 1
        stats["requests"] += size
        stats["largest"] = max(stats["largest"], size)

    def _adapt_and_predict(self, jobs: list[Job]) -> list[Any]:
        self._count("adapt", len(jobs))
        return self.compute.adapt_and_predict(jobs)

    def _predict_with_adapters(self, jobs: list[Job]) -> list[Any]:
        self._count("predict", len(jobs))
        return self.compute.predict(jobs)

    async def _in_time(self, work: Awaitable[Any]) -> Any:
        """``work``'s result, or 504 after ``request_timeout_s``. The replica keeps serving: the model process
        stops a call that outlives the same bound, since nobody waits for it any longer."""
        try:
            return await asyncio.wait_for(work, self.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"the request took longer than the request timeout of "
                                     f"{self.request_timeout_s:g} s (request_timeout_s) and was abandoned; the "
                                     f"service keeps serving: send less work (fewer or shorter examples, fewer "
                                     f"steps or decoded tokens) or retry") from None

    async def _serially(self, work: Callable[[list[Job]], list[Any]], job: Job) -> list[Any]:
        async with self._serial:
            return await asyncio.to_thread(work, [job])

    async def _adapt(self, job: Job) -> tuple[dict[str, torch.Tensor], float, float, list[Prediction] | None]:
        if self.batched:
            adapted, preds = await self._in_time(self._adapt_batch(job))
        else:
            ((adapted, preds),) = await self._in_time(self._serially(self._adapt_and_predict, job))
        for outcome in (adapted, preds):
            _raise_failure(outcome, "support", "adaptation")
        return (*adapted, preds)

    async def _predict(self, job: Job) -> list[Prediction]:
        if self.batched:
            preds = await self._in_time(self._predict_batch(job))
        else:
            (preds,) = await self._in_time(self._serially(self._predict_with_adapters, job))
        _raise_failure(preds, "query", "prediction")
        return preds

    async def _probe(self) -> str | None:
        """Why the model process cannot take work (``ModelProcess.probe``), or None; concurrent callers share
        one probe, so that health checks never fill the threads that run the batches."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(asyncio.to_thread(self.compute.probe))
        return await asyncio.shield(self._probing)

    async def check_health(self) -> None:
        """Serve's periodic check. A model process that does not answer is killed and replaced by the probe, so
        one failed probe leaves the replica healthy; a run of them (no child could be started or kept answering
        for a minute) fails the check, and Serve replaces the whole replica."""
        why = await self._probe() if self.served is not None else None
        self._failed_checks = self._failed_checks + 1 if why else 0
        if why:
            log.warning("health check %d/%d failed: %s", self._failed_checks, FAILED_CHECKS_TO_RESTART, why)
        if self._failed_checks >= FAILED_CHECKS_TO_RESTART:
            raise RuntimeError(f"the model process failed {self._failed_checks} health checks in a row: {why}")

    # --- routes

    @app.get("/healthz")
    async def healthz(self) -> Any:
        """200 when the model process answers a probe (or is busy within its bounds); 503 with the reason when
        not (a hung one has then been killed, and a new one is starting)."""
        if self.served is None:
            return {"status": "loading", "version": None}
        why = await self._probe()
        if why:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "detail": why,
                                                          "version": self.served.version})
        return {"status": "ok", "version": self.served.version}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> ModelInfo:
        s = self._model()
        return ModelInfo(name=s.name, version=s.version, alias=s.alias, config_digest=s.config_digest,
                         model_uri=s.model_uri, run_id=s.run_id, family=s.family, kind=s.kind,
                         adapt_steps=s.learner.cfg.adapt_steps, loaded_at=s.loaded_at,
                         previous_version=self.previous_version, last_switch_error=self.last_switch_error,
                         cache=await self.adapters.stats(), batching=self.batching, model_process=self.compute.stats())

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
        try:  # the entry names its model: adapters made before a version switch keep working
            kept = await self.adapters.put(params, served, job.scale)
        except AdapterTooLargeError as e:
            raise RequestError(("support",), str(e), status=413) from None
        return AdapterResponse(id=kept["id"], model={"name": served.name, "version": served.version},
                               steps=job.steps, support_loss_before=before, support_loss_after=after,
                               bytes=kept["bytes"], ttl_s=kept["ttl_s"])

    @app.post("/v1/adapters/{adapter_id}/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(self, adapter_id: str, req: PredictRequest) -> PredictResponse:
        found = await self.adapters.get(adapter_id, self.served)
        if found is None:
            raise HTTPException(404, f"adapter {adapter_id!r}: unknown or expired")
        params, served, scale = found
        job = Job(served, params=params, scale=scale)
        prepare_query(served, req, job)
        preds = await self._predict(job)
        return PredictResponse(id=adapter_id, model={"name": served.name, "version": served.version},
                               predictions=preds)

    @app.delete("/v1/adapters/{adapter_id}", status_code=204)
    async def delete_adapter(self, adapter_id: str) -> None:
        if not await self.adapters.delete(adapter_id):
            raise HTTPException(404, f"adapter {adapter_id!r}: unknown or expired")


# ----------------------------------------------------------------------------- building the application


def _code_version() -> str:
    """A hash of the code a replica runs: equal hashes let Serve apply a new user_config in place.

    That is this package, the registry code that loads a version (``pipeline.tracking``) and the core with its
    C++ kernels; a file outside these that changes what a replica does must be added here.
    """
    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("pipeline/serving/*.py"), *root.glob("pipeline/tracking/*.py"), root / "pipeline/errors.py",
             *root.glob("metalstm/*.py"), *root.glob("metalstm/csrc/*")]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:16]


CODE_VERSION = _code_version()  # fixed at import: a process redeploys with the version it started with


def model_config(model_uri: str, tracking_uri: str | None = None, alias: str | None = None,
                 fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The deployment's ``user_config`` for one concrete registered version.

    ``fallback`` (a config of the version served until now) is what a replica that starts while ``model_uri``
    does not load serves instead (``AdaptationServer.reconfigure``).
    """
    config = {"model_uri": model_uri, "tracking_uri": tracking_uri, "alias": alias}
    if fallback and fallback.get("model_uri") not in (None, model_uri):
        config["fallback"] = {key: fallback.get(key) for key in ("model_uri", "tracking_uri", "alias")}
    return config


def resolve(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """``models:/NAME@ALIAS`` → the user_config for the concrete version it points at now (a cheap look-up)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.errors import UserError
    from pipeline.tracking.registry import parse_model_uri
    from pipeline.tracking.runs import not_found_hint, require_store

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


def build_app(user_config: dict[str, Any], *, num_replicas: int = 1, num_cpus: float = 1.0,
              cache_max_entries: int = 1024, cache_ttl_s: float = 3600.0, cache_max_bytes: int = 256 << 20,
              max_body_bytes: int = MAX_BODY_BYTES, token_env: str = TOKEN_ENV, torch_threads: int = 0,
              batching: bool = True, env_vars: dict[str, str] | None = None,
              request_timeout_s: float = REQUEST_TIMEOUT_S) -> serve.Application:
    """The Serve application for ``serve.run``.

    The deployment version is pinned to :data:`CODE_VERSION` (Serve would otherwise draw a random one per
    ``serve.run`` and replace every replica), so redeploying with only a new ``user_config`` reconfigures
    the running replicas in place: no restart, the adapters survive, and a failed load changes nothing. With
    more than one replica the adapters live in the shared ``AdapterStore`` deployment (pinned the same way).
    ``env_vars`` go into the replicas' runtime_env, which the dashboard shows: tests only, never a real token.
    Refuses (ValueError) a deployment without a token when the running Serve binds a non-loopback host.
    """
    token = (env_vars or {}).get(token_env) or read_token(token_env)
    host = serve_http_host()
    if host is not None:  # unknown here (Serve not started yet): each replica checks at its start
        require_token(host, token, token_env, "build_app")
    actor_options: dict[str, Any] = {"num_cpus": num_cpus}
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
    bounds = {"cache_max_entries": cache_max_entries, "cache_ttl_s": cache_ttl_s, "cache_max_bytes": cache_max_bytes}
    store = None
    if num_replicas > 1:
        store = adapter_store_deployment.options(version=CODE_VERSION, _internal=True).bind(
            max_entries=cache_max_entries, ttl_s=cache_ttl_s, max_bytes=cache_max_bytes)
    deployment = AdaptationServer.options(version=CODE_VERSION, _internal=True, num_replicas=num_replicas,
                                          user_config=user_config, ray_actor_options=actor_options)
    return deployment.bind(**bounds, max_body_bytes=max_body_bytes, token_env=token_env,
                           torch_threads=torch_threads, batching=batching, adapter_store=store,
                           request_timeout_s=request_timeout_s)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve deploy``/``serve run`` configs (``import_path: pipeline.serving.app:app_builder``).

    The model comes from the config's deployment ``user_config``; ``args`` tune the replica. The adapters live
    in the shared ``AdapterStore`` deployment, so any ``num_replicas`` (or autoscaling) works. Refuses
    (ValueError) when the token is missing from this environment and Serve binds a non-loopback host.
    """
    known = {"cache_max_entries", "cache_ttl_s", "cache_max_bytes", "max_body_bytes", "token_env", "torch_threads",
             "batching", "request_timeout_s"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"args: unknown keys {unknown}; expected some of {sorted(known)}")
    token_env = args.get("token_env", TOKEN_ENV)
    host = serve_http_host()
    if host is not None:  # unknown (no Serve to ask): each replica checks at its start
        require_token(host, read_token(token_env), token_env, "app_builder")
    store = adapter_store_deployment.bind(max_entries=args.get("cache_max_entries", 1024),
                                          ttl_s=args.get("cache_ttl_s", 3600.0),
                                          max_bytes=args.get("cache_max_bytes", 256 << 20))
    return AdaptationServer.bind(**args, adapter_store=store)
