"""One cache tier with a byte budget that is never exceeded, and its eviction policies.

Policies: "lru" (least recently used), "lfu" (least frequently used, with aging: every
`aging_period` accesses all counts are halved, so experts that were hot long ago can leave),
and "next-use" for (layer, expert) keys: evict the expert whose next use is estimated to be
furthest away. A decode step sweeps the MoE layers in order, so an expert of the layer just
used is needed no sooner than one sweep later, while one of the next layer may be needed at
once; LRU evicts exactly those (it gets 0 hits on a cyclic sweep smaller than the cache).
next-use scores each key, in tokens, as d / L + (1 - q) / q: d = layers until its layer comes
round again (0 for an expert the current layer asked for and has not been served yet, L for
one it was served or did not ask for), q = the chance its layer asks for it at the next visit,
estimated by an exponentially weighted average over the layer's visits (weight NEXT_USE_ALPHA
per visit, so recent use counts most: routing has temporal locality). The first term is the
layer sweep (what SpecMD's least-stale uses), the second Belady's "furthest next use" under
that estimate. A pinned hot set (keys that are never evicted) can be given,
e.g. from a routing profile."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, Optional, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
POLICIES = ("lru", "lfu", "next-use")
#: Weight of the latest visit in next-use's estimate of each expert's chance of being asked for.
#: Replayed through the policy alone (routing of a greedy run of a random Mixtral-style model,
#: 4 layers x 8 experts, 8 slots; synthetic Zipf traces of 2 and 4 layers x 128 experts, 64 and
#: 51 slots), 0.3 was best or within 1 % of the best of 0.05-0.8, and beat LRU on all three.
NEXT_USE_ALPHA = 0.3


class TierCache(Generic[K]):
    """Values with sizes in bytes. `put` evicts until the new value fits; a value larger than
    the whole budget is not cached. `used` never exceeds `budget`."""

    def __init__(self, name: str, budget: int, policy: str = "lru", *, pinned: Iterable[K] = (),
                 aging_period: int = 1024, sweep: Sequence[int] = ()):
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
        # next-use: the layer order of a decode step, where the sweep is, and per-layer visits
        self._sweep_pos = {layer: i for i, layer in enumerate(sweep)}
        self._current = 0
        self._chance: dict[int, dict[K, float]] = {}   # per layer: key -> estimated chance of use next visit
        self._wanted: set = set()   # asked for at the current layer and not served yet: needed now
        if policy == "next-use" and not self._sweep_pos:
            raise ValueError("the next-use policy needs the layer order (sweep=)")
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

    def peek(self, key: K) -> Optional[Any]:
        """The value without counting an access (for eviction filters), or None."""
        item = self._items.get(key)
        return item[0] if item is not None else None

    def get(self, key: K) -> Optional[Any]:
        """The value, counting an access, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._touch(key)
            return item[0]

    def _touch(self, key: K) -> None:
        self._wanted.discard(key)
        self._items.move_to_end(key)
        self._counts[key] = self._counts.get(key, 0.0) + 1.0
        self._accesses += 1
        if self._accesses % self.aging_period == 0:
            for k in self._counts:
                self._counts[k] /= 2.0

    def visit(self, layer: int, keys: Optional[Iterable[K]] = None) -> None:
        """A decode step is at `layer`; with `keys`, its router asked for them (one visit of
        the layer, counted for next-use's frequencies). A no-op for the other policies."""
        if not self._sweep_pos:
            return
        with self._lock:
            self._current = self._sweep_pos.get(layer, self._current)
            if keys is None:
                return
            keys = list(keys)
            self._wanted = set(keys)
            chance = self._chance.setdefault(layer, {})
            for k in list(chance):
                chance[k] *= 1.0 - NEXT_USE_ALPHA
                if chance[k] < 1e-4:
                    del chance[k]
            for k in keys:
                chance[k] = chance.get(k, 0.0) + NEXT_USE_ALPHA

    def next_use(self, key: K) -> float:
        """Estimated tokens until `key` is asked for again (next-use policy)."""
        if key in self._wanted:
            return 0.0
        layer = key[0]
        n = len(self._sweep_pos)
        d = (self._sweep_pos.get(layer, 0) - self._current) % n or n
        q = min(1.0, self._chance.get(layer, {}).get(key, 0.0) + 1e-3)
        return d / n + (1.0 - q) / q

    def victim(self, exclude: Optional[Callable[[K], bool]] = None) -> Optional[K]:
        """The key the policy would evict next (never a pinned one, nor one `exclude` names)."""
        with self._lock:
            return self._victim(exclude)

    def _victim(self, exclude: Optional[Callable[[K], bool]] = None) -> Optional[K]:
        candidates = (k for k in self._items if k not in self.pinned and not (exclude and exclude(k)))
        if self.policy == "lru":
            return next(candidates, None)
        # O(n); n is the number of cached experts (hundreds to thousands)
        if self.policy == "next-use":
            return max(candidates, key=self.next_use, default=None)
        return min(candidates, key=lambda k: self._counts.get(k, 0.0), default=None)

    def pop(self, key: K) -> Optional[Any]:
        """Remove `key` as an eviction (counted); returns its value or None."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.used -= item[1]
            self.evictions += 1
            return item[0]

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
            self._wanted.discard(key)
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
