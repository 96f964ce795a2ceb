"""One cache tier with a byte budget that is never exceeded, and its eviction policies.

Policies: "lru" (least recently used) and "lfu" (least frequently used, with aging: every
`aging_period` accesses all counts are halved, so experts that were hot long ago can leave).
A pinned hot set (keys that are never evicted) can be given, e.g. from a routing profile."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Generic, Hashable, Iterable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
POLICIES = ("lru", "lfu")


class TierCache(Generic[K]):
    """Values with sizes in bytes. `put` evicts until the new value fits; a value larger than
    the whole budget is not cached. `used` never exceeds `budget`."""

    def __init__(self, name: str, budget: int, policy: str = "lru", *, pinned: Iterable[K] = (),
                 aging_period: int = 1024):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")
        if budget < 0:
            raise ValueError(f"{name} budget must not be negative")
        self.name, self.budget, self.policy = name, budget, policy
        self.pinned = set(pinned)
        self.aging_period = aging_period
        self._items: "OrderedDict[K, tuple[Any, int]]" = OrderedDict()
        self._counts: dict[K, float] = {}
        self._accesses = 0
        self._lock = threading.Lock()
        self.used = 0
        self.peak = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def get(self, key: K) -> Optional[Any]:
        """The value, counting an access, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._touch(key)
            return item[0]

    def _touch(self, key: K) -> None:
        self._items.move_to_end(key)
        self._counts[key] = self._counts.get(key, 0.0) + 1.0
        self._accesses += 1
        if self._accesses % self.aging_period == 0:
            for k in self._counts:
                self._counts[k] /= 2.0

    def _victim(self) -> Optional[K]:
        candidates = (k for k in self._items if k not in self.pinned)
        if self.policy == "lru":
            return next(candidates, None)
        best, best_count = None, None
        for k in candidates:  # O(n); n is the number of cached experts (hundreds to thousands)
            c = self._counts.get(k, 0.0)
            if best_count is None or c < best_count:
                best, best_count = k, c
        return best

    def put(self, key: K, value: Any, nbytes: int) -> list[K]:
        """Insert (or refresh) `key`; returns the evicted keys. Not cached when it cannot fit."""
        evicted: list[K] = []
        with self._lock:
            if key in self._items:
                self._touch(key)
                return evicted
            if nbytes > self.budget:
                return evicted
            while self.used + nbytes > self.budget:
                victim = self._victim()
                if victim is None:  # everything left is pinned
                    return evicted
                _, size = self._items.pop(victim)
                self.used -= size
                self.evictions += 1
                evicted.append(victim)
            self._items[key] = (value, nbytes)
            self._counts[key] = self._counts.get(key, 0.0) + 1.0
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            assert self.used <= self.budget
            return evicted

    def discard(self, key: K) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.used -= item[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0
