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
validated before they become jobs). If the child dies (killed, out of memory), the calls in flight raise
``ModelProcessError`` and the next call starts a new child: no request can take the replica down.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from pipeline.adaptation import Job, ServedModel, adapt_and_predict, predict_jobs, served_model

log = logging.getLogger(__name__)

MAX_MODELS = 4  # versions the child keeps (the current one, and those that cached adapters still use)


class ModelProcessError(RuntimeError):
    """The model process stopped while it held this call's work (the next call starts a new one)."""


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


class ModelProcess:
    """The replica's handle on its model process; every method blocks (call them from a thread)."""

    def __init__(self, torch_threads: int = 0) -> None:
        self.torch_threads = torch_threads
        self.pid: int | None = None
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = None
        self._loaded: OrderedDict[str, ServedModel] = OrderedDict()  # what the child holds, most recent last
        self._lock = threading.Lock()

    def load(self, served: ServedModel) -> None:
        """Make ``served`` available in the child (raises if it cannot be built there)."""
        self._submit([served])

    def adapt_and_predict(self, jobs: list[Job]) -> list[tuple[Any, Any]]:
        """``pipeline.adaptation.adapt_and_predict`` in the child; fast weights come back only without a query."""
        out = self._call("adapt", jobs)
        return [(adapted if isinstance(adapted, Exception) else (_tensors(adapted[0]), *adapted[1:]), preds)
                for adapted, preds in out]

    def predict(self, jobs: list[Job]) -> list[Any]:
        """``pipeline.adaptation.predict_jobs`` in the child, each job with its cached fast weights."""
        return self._call("predict", jobs)

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "restarts": self.restarts, "models": list(self._loaded)}

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self.pid = self._pool, None, None
            self._loaded.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _running(self) -> ProcessPoolExecutor:
        if self._pool is None:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            try:
                self.pid = pool.submit(_start_child, self.torch_threads).result()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            self._pool = pool
            self._loaded.clear()
        return self._pool

    def _ensure(self, pool: ProcessPoolExecutor, served: ServedModel) -> None:
        uri = served.model_uri
        if self._loaded.get(uri) is served:
            self._loaded.move_to_end(uri)
            return
        keep = [u for u in self._loaded if u != uri][-(MAX_MODELS - 1):]
        pool.submit(_load_in_child, served.checkpoint, served.metadata(), keep).result()
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
        try:
            return future.result()
        except BrokenProcessPool as e:  # it died with this work: the caller answers 503, the next call restarts
            with self._lock:
                self._stopped(pool, e)
            raise ModelProcessError(f"the model process stopped while adapting or predicting: {e}") from e

    def _submit(self, models: Iterable[ServedModel], fn: Callable | None = None,
                *args: Any) -> tuple[ProcessPoolExecutor, Future | None]:
        """Send ``models`` the child lacks, then submit ``fn(*args)``; a child found dead before it got this
        work is replaced, once."""
        retried = False
        with self._lock:
            while True:
                pool = self._running()
                try:
                    for served in models:
                        self._ensure(pool, served)
                    return pool, None if fn is None else pool.submit(fn, *args)
                except BrokenProcessPool as e:
                    self._stopped(pool, e)
                    if retried:
                        raise ModelProcessError(f"the model process stopped: {e}") from e
                    retried = True

    def _stopped(self, pool: ProcessPoolExecutor, error: BaseException) -> None:
        """Forget a child that died (the lock is held); the next call starts a new one."""
        if pool is not self._pool:
            return  # another call saw it first
        log.error("model process %s stopped (%s); the next call starts a new one", self.pid, error)
        self._pool, self.pid = None, None
        self._loaded.clear()
        self.restarts += 1
        pool.shutdown(wait=False, cancel_futures=True)
