"""A bounded store of adapted fast weights: least-recently-used eviction, a time-to-live and a memory cap.

An adapter is the result of one adaptation (a few MB of fast weights for a realistic LSTM), so a replica
could be exhausted by clients that adapt and never come back. Every bound is enforced on insert and the
TTL on every access, so memory use is at most ``max_bytes`` plus the one entry being inserted.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes held by a dict of tensors (what an adapter costs in the cache)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Entry:
    value: Any
    nbytes: int
    created: float
    last_used: float
    meta: dict[str, Any] = field(default_factory=dict)


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

    def put(self, value: Any, nbytes: int, meta: dict[str, Any] | None = None) -> str:
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
            self._entries[key] = Entry(value, nbytes, now, now, dict(meta or {}))
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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire(self._clock())
            return {"entries": len(self._entries), "bytes": self._bytes, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes, "ttl_s": self.ttl_s, "evictions": dict(self.evictions)}
