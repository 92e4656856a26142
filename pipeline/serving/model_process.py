"""A replica's inner loops and forward passes, run in a child process of their own.

Why: a replica's one Python process also receives, validates and answers every HTTP request, and that work
shares a GIL with the inner loop's per-op Python. Under load a batch of 16 adaptations that takes 96 ms
alone took 140–170 ms in the replica while the second core sat half idle (measured: a Python thread busy
20 % of the time slows the inner loop by 30 %). In a child process the inner loop has a GIL of its own;
on the 2-core development machine this raised batched adaptation at concurrency 32 by 15–20 %.

The child is a ``concurrent.futures.ProcessPoolExecutor`` of one process (``spawn``: no fork of a process
with Ray's threads). It holds up to ``MAX_MODELS`` model versions, rebuilt from the checkpoint bytes each
``ServedModel`` keeps (read with ``weights_only=True``): the replica sends a version the first time a job
needs it, so adapters cached before a version switch keep working. Jobs cross as numpy arrays and plain
values, pickled between these two processes only; a client's bytes never are (requests are parsed JSON,
validated before they become jobs).

No request can take the replica down or stall it for good. If the child dies (killed, out of memory), the
calls in flight raise ``ModelProcessError``. Every wait on the child is bounded (``call_timeout_s``,
``load_timeout_s``, ``start_timeout_s``): a child that stops answering (stuck in a job, stopped, swapped out)
is killed when a wait runs out and those calls raise ``ModelProcessTimeout``; either way a new child starts
at once, in the background. ``probe`` asks an idle child to answer within a bound (``/healthz`` and Serve's
health check), and kills one that does not.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from pipeline.serving.jobs import Job, ServedModel, adapt_and_predict, predict_jobs, served_model

log = logging.getLogger(__name__)

MAX_MODELS = 4  # versions the child keeps (the current one, and those that cached adapters still use)
CALL_TIMEOUT_S = 60.0  # one batch of adaptations or predictions (the replica passes its request timeout)
LOAD_TIMEOUT_S = 120.0  # rebuilding one version from its checkpoint bytes (well under a second for ours)
START_TIMEOUT_S = 300.0  # spawn, import torch, load the fused kernels (build them, on a machine without a cache)
PROBE_TIMEOUT_S = 5.0  # an idle child answers a ping in milliseconds
CLOSE_TIMEOUT_S = 5.0  # a stopping child that takes longer is killed


class ModelProcessError(RuntimeError):
    """The model process stopped while it held this call's work (a new one is starting)."""


class ModelProcessTimeout(ModelProcessError):
    """The model process did not answer within its bound; it was killed and a new one is starting."""


# ----------------------------------------------------------------------------- the child's side

_MODELS: dict[str, ServedModel] = {}  # in the child: model URI -> model


def _start_child(torch_threads: int) -> int:
    from metalstm import kernels
    from metalstm.runtime import retain_freed_memory

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    retain_freed_memory()
    kernels.warm_up()  # before the replica takes requests: no request pays for a first build
    return os.getpid()


def _load_in_child(checkpoint: bytes, metadata: dict[str, Any], keep: list[str]) -> None:
    served = served_model(checkpoint, **metadata)  # first: a version that fails to build changes nothing
    for uri in [u for u in _MODELS if u not in keep]:
        del _MODELS[uri]
    _MODELS[metadata["model_uri"]] = served


def _tensors(params: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor] | None:
    return None if params is None else {n: torch.from_numpy(p) for n, p in params.items()}


def _arrays(params: dict[str, torch.Tensor] | None) -> dict[str, np.ndarray] | None:
    return None if params is None else {n: p.detach().numpy() for n, p in params.items()}


def _run_in_child(kind: str, portable: list[tuple[str, Job]]) -> list[Any]:
    jobs = [dataclasses.replace(job, served=_MODELS[uri], params=_tensors(job.params)) for uri, job in portable]
    if kind == "predict":
        return predict_jobs(jobs, [job.params for job in jobs])
    out = []
    for job, (adapted, preds) in zip(jobs, adapt_and_predict(jobs)):
        if not isinstance(adapted, Exception):  # fast weights go back only for an adapter to cache
            params, before, after = adapted
            adapted = (_arrays(params) if job.query_x is None else None, before, after)
        out.append((adapted, preds))
    return out


# ----------------------------------------------------------------------------- the replica's side


def _ping() -> int:
    return os.getpid()


def _workers(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """The pool's worker processes. CPython keeps them in ``_processes`` and has no public accessor; a hung
    worker must be killed by hand, since ``shutdown`` (and the pool's own clean-up) would wait for it forever."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for proc in _workers(pool):
        proc.kill()  # a no-op for one that has exited


class ModelProcess:
    """The replica's handle on its model process; every method blocks (call them from a thread), each for a
    bounded time."""

    def __init__(self, torch_threads: int = 0, *, call_timeout_s: float = CALL_TIMEOUT_S,
                 load_timeout_s: float = LOAD_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.torch_threads = torch_threads
        self.call_timeout_s, self.load_timeout_s, self.start_timeout_s = call_timeout_s, load_timeout_s, start_timeout_s
        self.pid: int | None = None
        self.restarts = 0  # children that stopped (died, or were killed for not answering)
        self.timeouts = 0  # of those, the ones killed for not answering within a bound
        self._pool: ProcessPoolExecutor | None = None
        self._loaded: OrderedDict[str, ServedModel] = OrderedDict()  # what the child holds, most recent last
        self._lock = threading.RLock()  # reentrant: a wait that runs out under it stops the child under it
        self._waits: dict[Future, float] = {}  # work the child holds -> when its bound runs out (monotonic)
        self._waits_lock = threading.Lock()
        self._starting: threading.Thread | None = None
        self._closed = False

    def load(self, served: ServedModel) -> None:
        """Make ``served`` available in the child (raises if it cannot be built there)."""
        self._submit([served])

    def adapt_and_predict(self, jobs: list[Job]) -> list[tuple[Any, Any]]:
        """``pipeline.serving.jobs.adapt_and_predict`` in the child; fast weights come back only without a query."""
        out = self._call("adapt", jobs)
        return [(adapted if isinstance(adapted, Exception) else (_tensors(adapted[0]), *adapted[1:]), preds)
                for adapted, preds in out]

    def predict(self, jobs: list[Job]) -> list[Any]:
        """``pipeline.serving.jobs.predict_jobs`` in the child, each job with its cached fast weights."""
        return self._call("predict", jobs)

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "restarts": self.restarts, "timeouts": self.timeouts, "models": list(self._loaded)}

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """Why the child cannot take work now, or None when it can.

        An idle child must answer a ping within ``timeout_s``; one that does not is killed (and replaced). A
        busy one is trusted until its work's own bound runs out: a ping would only wait behind that work.
        """
        pool = self._pool
        if self._closed:
            return "the model process is closed (the replica is stopping)"
        if pool is None:
            self._restart_soon()
            return "the model process is starting (the previous one stopped)"
        if self._busy():
            return None
        try:
            pool.submit(_ping).result(timeout=timeout_s)
            return None
        except TimeoutError:
            if self._busy():  # work arrived meanwhile, and the ping waited behind it
                return None
            self._kill(pool, f"did not answer a probe within {timeout_s:g} s")
            return (f"the model process did not answer a probe within {timeout_s:g} s; it was stopped and a new "
                    f"one is starting")
        except (BrokenProcessPool, CancelledError, RuntimeError) as e:  # it died, or was just replaced
            with self._lock:
                self._stopped(pool, e)
            return f"the model process stopped ({e}); a new one is starting"

    def close(self) -> None:
        """Stop the child; one that does not stop within ``CLOSE_TIMEOUT_S`` is killed (a hung one never would)."""
        self._closed = True
        locked = self._lock.acquire(timeout=CLOSE_TIMEOUT_S)  # a load may hold it: close regardless
        try:
            pool, self._pool, self.pid = self._pool, None, None
            self._loaded.clear()
        finally:
            if locked:
                self._lock.release()
        if pool is None:
            return
        workers = _workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.join(CLOSE_TIMEOUT_S)
            if proc.is_alive():
                log.warning("model process %s did not stop within %g s; killing it", proc.pid, CLOSE_TIMEOUT_S)
                proc.kill()
                proc.join(CLOSE_TIMEOUT_S)

    # --- the child's lifecycle

    def _running(self) -> ProcessPoolExecutor:
        """The child, started if there is none (the lock is held)."""
        if self._closed:
            raise ModelProcessError("the model process is closed (the replica is stopping)")
        if self._pool is None:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            try:
                pid = pool.submit(_start_child, self.torch_threads).result(timeout=self.start_timeout_s)
                if self._closed:
                    raise ModelProcessError("the model process is closed (the replica is stopping)")
            except BaseException as e:
                _kill_workers(pool)
                pool.shutdown(wait=False, cancel_futures=True)
                if isinstance(e, TimeoutError):
                    raise ModelProcessTimeout(f"the model process did not start within {self.start_timeout_s:g} s "
                                              f"(start_timeout_s)") from None
                raise
            self._pool, self.pid = pool, pid
            self._loaded.clear()
        return self._pool

    def _stopped(self, pool: ProcessPoolExecutor, error: BaseException | str) -> None:
        """Forget a child that died or was killed (the lock is held), and start a new one in the background."""
        if pool is not self._pool:
            return  # another call saw it first
        log.error("model process %s stopped (%s); starting a new one", self.pid, error)
        self._pool, self.pid = None, None
        self._loaded.clear()
        self.restarts += 1
        pool.shutdown(wait=False, cancel_futures=True)
        self._restart_soon()

    def _kill(self, pool: ProcessPoolExecutor, why: str) -> None:
        """Kill a child that does not answer. Outside the lock first: a load may hold the lock while it waits
        behind this very child, and only the child's death frees it."""
        if pool is self._pool:
            log.error("model process %s %s; killing it", self.pid, why)
        _kill_workers(pool)
        with self._lock:
            if pool is self._pool:
                self.timeouts += 1
                self._stopped(pool, why)

    def _restart_soon(self) -> None:
        """Start a new child in the background, so that the next request does not wait for one to start."""
        if self._closed or (self._starting is not None and self._starting.is_alive()):
            return
        self._starting = threading.Thread(target=self._start_quietly, name="model-process-start", daemon=True)
        self._starting.start()

    def _start_quietly(self) -> None:
        try:
            with self._lock:
                if not self._closed:
                    self._running()
        except Exception as e:  # noqa: BLE001 - the next call tries again, and reports it
            log.error("could not start a new model process: %s", e)

    # --- work

    def _busy(self) -> bool:
        """Whether the child holds work whose bound has not run out."""
        now = time.monotonic()
        with self._waits_lock:
            return any(not f.done() and deadline > now for f, deadline in self._waits.items())

    def _wait(self, pool: ProcessPoolExecutor, future: Future, timeout_s: float, what: str) -> Any:
        """``future``'s result within ``timeout_s``. Past it the child is killed: it holds work that nobody waits
        for any longer, and everything queued behind that work would wait too."""
        with self._waits_lock:
            self._waits[future] = time.monotonic() + timeout_s
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            if future.done():  # the work itself raised TimeoutError
                raise
            self._kill(pool, f"did not finish {what} within {timeout_s:g} s")
            raise ModelProcessTimeout(f"the model process did not finish {what} within {timeout_s:g} s; it was "
                                      f"stopped and a new one is starting: retry") from None
        except (BrokenProcessPool, CancelledError) as e:  # it died with this work (or was killed for another's)
            with self._lock:
                self._stopped(pool, e)
            raise ModelProcessError(f"the model process stopped while {what}: {e or type(e).__name__}") from e
        finally:
            with self._waits_lock:
                self._waits.pop(future, None)

    def _ensure(self, pool: ProcessPoolExecutor, served: ServedModel) -> None:
        uri = served.model_uri
        if self._loaded.get(uri) is served:
            self._loaded.move_to_end(uri)
            return
        keep = [u for u in self._loaded if u != uri][-(MAX_MODELS - 1):]
        future = pool.submit(_load_in_child, served.checkpoint, served.metadata(), keep)
        self._wait(pool, future, self.load_timeout_s, f"loading {uri}")
        for u in [u for u in self._loaded if u not in keep]:
            del self._loaded[u]
        self._loaded[uri] = served

    def _call(self, kind: str, jobs: list[Job]) -> list[Any]:
        models = list({id(j.served): j.served for j in jobs}.values())
        if len(models) > MAX_MODELS:  # more versions than the child holds at once: one call per version
            by_model = {id(m): [i for i, j in enumerate(jobs) if j.served is m] for m in models}
            out: list[Any] = [None] * len(jobs)
            for idx in by_model.values():
                for i, result in zip(idx, self._call(kind, [jobs[i] for i in idx])):
                    out[i] = result
            return out
        portable = [(j.served.model_uri, dataclasses.replace(j, served=None, params=_arrays(j.params))) for j in jobs]
        pool, future = self._submit(models, _run_in_child, kind, portable)
        return self._wait(pool, future, self.call_timeout_s, "adapting or predicting")

    def _submit(self, models: Iterable[ServedModel], fn: Callable | None = None,
                *args: Any) -> tuple[ProcessPoolExecutor, Future | None]:
        """Send ``models`` the child lacks, then submit ``fn(*args)``; a child found dead before it got this
        work is replaced, once. The lock is held for bounded waits only (a start, loads)."""
        retried = False
        with self._lock:
            while True:
                pool = self._running()
                try:
                    for served in models:
                        self._ensure(pool, served)
                    return pool, None if fn is None else pool.submit(fn, *args)
                except ModelProcessTimeout:
                    raise
                except (BrokenProcessPool, ModelProcessError) as e:
                    self._stopped(pool, e)
                    if retried:
                        raise ModelProcessError(f"the model process stopped: {e}") from e
                    retried = True
