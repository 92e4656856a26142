"""Where adapters live: a bounded cache (LRU, TTL, memory cap) in ONE store per application, shared by its replicas.

An adapter is the result of one adaptation (a few MB of fast weights for a realistic LSTM), so a server
could be exhausted by clients that adapt and never come back. Every bound is enforced on insert and the
TTL on every access, so memory use is at most ``max_bytes`` plus the one entry being inserted.

Why one store: a client's ``POST /v1/adapters`` and its later predict or delete reach whichever replica
Serve picks, so with a cache per replica an id was unknown (404) on every other replica. With more than one
replica the adapters live in the ``AdapterStore`` Serve deployment (one replica, no CPU reserved) that every
``AdaptationServer`` replica calls; with one replica an in-process ``AdapterStore`` does the same without the
hop. An entry holds its fast weights as numpy arrays plus the URI of the model version that made it; the
store also keeps that version's checkpoint bytes while any entry needs them, so a replica that never loaded
the version (started after a switch, or not yet switched) rebuilds it and predicts with the right model.
This module imports neither torch nor the model code at import time: the store's process stays small.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve

if TYPE_CHECKING:
    import torch

    from pipeline.serving.jobs import ServedModel

log = logging.getLogger(__name__)

STORE_DEPLOYMENT = "AdapterStore"
MAX_REPLICA_MODELS = 4  # versions a replica keeps for adapters made on other versions than the one it serves
STORE_TIMEOUT_S = 30.0  # a store call slower than this answers 503: the client retries


def tensor_bytes(tensors: dict[str, Any]) -> int:
    """Bytes held by a dict of tensors or arrays (what an adapter costs in the cache)."""
    return sum(int(t.nbytes) if hasattr(t, "nbytes") else t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Entry:
    value: Any
    nbytes: int
    last_used: float


class AdapterTooLargeError(ValueError):
    """One adapter is larger than the whole cache may hold."""


class AdapterCache:
    """Thread-safe LRU cache keyed by random ids, with a TTL (since last use) and a byte budget.

    ``clock`` is injectable so that the TTL can be tested without sleeping.
    """

    def __init__(self, max_entries: int = 256, ttl_s: float = 3600.0, max_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"cache.max_entries: must be >= 1, got {max_entries}")
        if not ttl_s > 0:
            raise ValueError(f"cache.ttl_s: must be > 0, got {ttl_s}")
        if max_bytes < 1:
            raise ValueError(f"cache.max_bytes: must be >= 1, got {max_bytes}")
        self.max_entries, self.ttl_s, self.max_bytes = max_entries, float(ttl_s), max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = {"lru": 0, "ttl": 0, "bytes": 0}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _drop(self, key: str, reason: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self.evictions[reason] += 1

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if now - e.last_used > self.ttl_s]:
            self._drop(key, "ttl")

    def put(self, value: Any, nbytes: int) -> str:
        """Store ``value`` (costing ``nbytes``) under a new random id, evicting what the bounds require."""
        if nbytes > self.max_bytes:
            raise AdapterTooLargeError(f"adapter: {nbytes} bytes exceeds the cache's max_bytes={self.max_bytes}")
        key = secrets.token_hex(16)
        with self._lock:
            now = self._clock()
            self._expire(now)
            while self._entries and len(self._entries) >= self.max_entries:
                self._drop(next(iter(self._entries)), "lru")
            while self._entries and self._bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)), "bytes")
            self._entries[key] = Entry(value, nbytes, now)
            self._bytes += nbytes
        return key

    def get(self, key: str) -> Entry | None:
        """The entry (marked as just used) or None when unknown or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            now = self._clock()
            if now - entry.last_used > self.ttl_s:
                self._drop(key, "ttl")
                return None
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            entry = self._entries.pop(key)
            self._bytes -= entry.nbytes
            return True

    def values(self) -> list[Any]:
        """The stored values (expired ones included until the next access drops them)."""
        with self._lock:
            return [e.value for e in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire(self._clock())
            return {"entries": len(self._entries), "bytes": self._bytes, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes, "ttl_s": self.ttl_s, "evictions": dict(self.evictions)}


# ----------------------------------------------------------------------------- one application's adapters


class AdapterStore:
    """The adapters of one application, and the checkpoints of the model versions they were made with.

    An entry is ``{"params": {name: ndarray}, "model_uri", "name", "version", "scale"}``. Methods return plain
    values rather than raising, so that the answer crosses a Serve handle unchanged.
    """

    def __init__(self, max_entries: int = 1024, ttl_s: float = 3600.0, max_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = AdapterCache(max_entries, ttl_s, max_bytes, clock)
        self._models: dict[str, tuple[bytes, dict[str, Any]]] = {}  # model URI -> (checkpoint, metadata)
        self._lock = threading.RLock()  # Serve runs a deployment's sync methods in a thread pool

    def put(self, value: dict[str, Any], nbytes: int, model: tuple[bytes, dict[str, Any]] | None = None) -> dict:
        """Store an adapter: ``{"id", "ttl_s"}``, ``{"error"}`` when too large, or ``{"missing_model": uri}``
        when the store lacks the checkpoint of the adapter's version (call again with ``model``)."""
        uri = value["model_uri"]
        with self._lock:
            if model is not None:
                self._models[uri] = model
            elif uri not in self._models:
                return {"missing_model": uri}
            try:
                key = self.cache.put(value, nbytes)
            except AdapterTooLargeError as e:
                return {"error": str(e)}
            finally:
                self._prune()
            return {"id": key, "ttl_s": self.cache.ttl_s}

    def get(self, key: str) -> dict[str, Any] | None:
        """The adapter (marked as just used), or None when unknown or expired."""
        with self._lock:
            entry = self.cache.get(key)
            return None if entry is None else entry.value

    def model(self, uri: str) -> tuple[bytes, dict[str, Any]] | None:
        """The checkpoint bytes and registry metadata of a version that stored adapters were made with."""
        with self._lock:
            return self._models.get(uri)

    def delete(self, key: str) -> bool:
        with self._lock:
            deleted = self.cache.delete(key)
            self._prune()
            return deleted

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = self.cache.stats()
            self._prune()
            return {**stats, "model_versions": sorted(self._models)}

    def _prune(self) -> None:
        """Forget the checkpoints that no stored adapter needs any more (the lock is held)."""
        needed = {value["model_uri"] for value in self.cache.values()}
        for uri in [u for u in self._models if u not in needed]:
            del self._models[uri]


class SharedAdapterStore(AdapterStore):
    """The store as a Serve deployment (``STORE_DEPLOYMENT``): one replica that every server replica calls."""

    def __init__(self, max_entries: int = 1024, ttl_s: float = 3600.0, max_bytes: int = 256 << 20) -> None:
        replicas = getattr(serve.get_replica_context(), "world_size", 1)
        if replicas > 1:  # two stores would split the adapters again
            raise ValueError(f"deployment {STORE_DEPLOYMENT}: num_replicas must be 1, got {replicas}")
        super().__init__(max_entries, ttl_s, max_bytes)


adapter_store_deployment = serve.deployment(
    name=STORE_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},
    health_check_period_s=10, graceful_shutdown_timeout_s=5)(SharedAdapterStore)


# ----------------------------------------------------------------------------- a replica's side


class StoreUnavailableError(RuntimeError):
    """The shared adapter store did not answer (restarting, overloaded): the request may be retried."""


def _arrays(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {n: p.detach().cpu().numpy() for n, p in params.items()}


def _tensors(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    import torch

    # arrays that crossed from the store may be read-only views of Ray's object store: copy those
    return {n: torch.from_numpy(a if a.flags.writeable else a.copy()) for n, a in params.items()}


def replica_adapters(store: Any, max_entries: int, ttl_s: float, max_bytes: int) -> Adapters:
    """A replica's ``Adapters``: the shared store's handle, else a store of its own, which only a deployment of
    one replica may have (several would each know only their own ids: 404 on the others)."""
    if store is not None:
        return Adapters(store)
    try:
        replicas = serve.get_replica_context().world_size
    except Exception:  # noqa: BLE001 - outside a replica (a plain Python object): one process, one store
        replicas = 1
    if replicas != 1:  # None: an autoscaling deployment, which may grow
        raise ValueError(f"adapter_store: a deployment of {replicas or 'autoscaled'} replicas needs the shared "
                         f"{STORE_DEPLOYMENT} (build it with build_app or app_builder, which add it)")
    return Adapters(AdapterStore(max_entries, ttl_s, max_bytes))


class Adapters:
    """A replica's access to its application's adapters: an in-process ``AdapterStore`` (one replica) or a Serve
    handle to the shared one. Every method is async; a shared store that fails answers ``StoreUnavailableError``.
    """

    def __init__(self, store: Any, timeout_s: float = STORE_TIMEOUT_S) -> None:
        self.store, self.timeout_s = store, timeout_s
        self.shared = not isinstance(store, AdapterStore)
        self._models: OrderedDict[str, ServedModel] = OrderedDict()  # versions built for adapters, LRU

    async def _call(self, method: str, *args: Any) -> Any:
        if not self.shared:
            return getattr(self.store, method)(*args)

        async def answer() -> Any:
            return await getattr(self.store, method).remote(*args)

        try:
            return await asyncio.wait_for(answer(), self.timeout_s)
        except Exception as e:  # the store's replica died, restarts or is unreachable: no answer to give
            log.warning("adapter store: %s failed: %s: %s", method, type(e).__name__, e)
            raise StoreUnavailableError(f"the adapter store did not answer ({type(e).__name__}); retry") from e

    async def put(self, params: dict[str, torch.Tensor], served: ServedModel,
                  scale: tuple[float, float] | None) -> dict[str, Any]:
        """Store new fast weights made by ``served``: ``{"id", "bytes", "ttl_s"}``; AdapterTooLargeError."""
        value = {"params": _arrays(params), "model_uri": served.model_uri, "name": served.name,
                 "version": served.version, "scale": scale}
        nbytes = tensor_bytes(value["params"])
        answer = await self._call("put", value, nbytes)
        if "missing_model" in answer:  # the first adapter of this version: the store keeps its checkpoint too
            answer = await self._call("put", value, nbytes, (served.checkpoint, served.metadata()))
        if "error" in answer:
            raise AdapterTooLargeError(answer["error"])
        self._remember(served)
        return {"id": answer["id"], "bytes": nbytes, "ttl_s": answer["ttl_s"]}

    async def get(self, key: str, current: ServedModel | None) -> tuple[dict[str, torch.Tensor], ServedModel,
                                                                         tuple[float, float] | None] | None:
        """``(fast weights, the model that made them, scale)``, or None when the id is unknown or expired."""
        value = await self._call("get", key)
        if value is None:
            return None
        served = await self._served(value["model_uri"], current)
        if served is None:  # its last adapter went between the two calls
            return None
        return _tensors(value["params"]), served, value["scale"]

    async def delete(self, key: str) -> bool:
        return bool(await self._call("delete", key))

    async def stats(self) -> dict[str, Any]:
        """The store's counters; for a shared store that does not answer, what is known and why not more."""
        try:
            return {**await self._call("stats"), "shared": self.shared}
        except StoreUnavailableError as e:
            return {"shared": True, "error": str(e)}

    def _remember(self, served: ServedModel) -> None:
        self._models[served.model_uri] = served
        self._models.move_to_end(served.model_uri)
        while len(self._models) > MAX_REPLICA_MODELS:
            self._models.popitem(last=False)

    async def _served(self, uri: str, current: ServedModel | None) -> ServedModel | None:
        """The version ``uri``: the one served now, one kept here, or rebuilt from the store's checkpoint."""
        if current is not None and current.model_uri == uri:
            return current
        if uri in self._models:
            self._models.move_to_end(uri)
            return self._models[uri]
        found = await self._call("model", uri)
        if found is None:
            return None
        from pipeline.serving.jobs import served_model

        checkpoint, metadata = found
        served = await asyncio.to_thread(served_model, checkpoint, **metadata)  # weights_only=True
        log.info("rebuilt %s from the adapter store's checkpoint for an adapter made with it", uri)
        self._remember(served)
        return served
