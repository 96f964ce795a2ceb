"""One cache tier with a byte budget that is never exceeded, and its eviction policies.

Policies: "lru" (least recently used), "lfu" (least frequently used, with aging: every
`aging_period` accesses all counts are halved, so experts that were hot long ago can leave),
"least-stale" (after SpecMD's Least-Stale: evict first the experts of the layers the current
sweep has just passed, whose next use is a whole sweep away, least recently used first),
and "next-use" for (layer, expert) keys: evict the expert whose next use is estimated to be
furthest away. A decode step sweeps the MoE layers in order, so an expert of the layer just
used is needed no sooner than one sweep later, while one of the next layer may be needed at
once; LRU evicts exactly those (it gets 0 hits on a cyclic sweep smaller than the cache).
next-use scores each key, in tokens, as d / L + (1 - q) / q: d = layers until its layer comes
round again (0 for an expert the current layer asked for and has not been served yet, L for
one it was served or did not ask for), q = the chance its layer asks for it at the next visit.
q mixes the two things routing has: skew (a long-run frequency f, an exponentially weighted
average over the layer's visits, weight NEXT_USE_ALPHA per visit) and temporal locality (r,
the layer's measured share of experts asked for again at the very next visit, averaged with
weight REUSE_ALPHA): q = r + (1 - r) f for an expert its layer asked for last time, f for the
others. The first term is the layer sweep (what SpecMD's least-stale uses), the second Belady's
"furthest next use" under that estimate. Keys a next-layer predictor expects (`expect`) count
as certain (q = 1) until their layer is visited. When guesses are loaded ahead (the Store's prefetch), an
eviction costs a read only if the guesses will not load the key again before it is needed, so
the estimate is divided by the share of the layer's experts the guesses miss (measured per layer,
averaged with weight REUSE_ALPHA; floor MIN_UNCOVERED): experts of well-guessed layers go first,
those of the layers the guesses miss most (or never name) last. Without guesses the share is 0
and nothing changes. Ties go to the least recently used key (a
miss counts as used when it was requested, not when its load finished). A pinned hot set
(keys that are never evicted) can be given, e.g. from a routing profile.

Cost: the sweep policies keep, per layer, its cached keys ranked most evictable first (re-ranked
only when that layer is visited or its keys change), so choosing a victim looks at one key per
layer, not at every cached expert: at 48 layers x 1536 cached experts this is what keeps eviction
off the decode path (`victim_reference` is the plain O(n) definition the tests hold it to)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, Optional, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
POLICIES = ("lru", "lfu", "least-stale", "next-use")
#: The policies that need the layer order (sweep=)
SWEEP_POLICIES = ("least-stale", "next-use")
#: Weight of the latest visit in next-use's long-run frequency of each expert, and in its
#: estimate of the share of a layer's experts asked for again at the next visit. Chosen with
#: `moestream bench cache` on the trained routing model's held-out traces and on synthetic ones
#: (tests of 0.01-0.3 and 0.05-0.3; docs/CACHING.md): frequency over ~50 visits, reuse over ~10.
NEXT_USE_ALPHA = 0.02
REUSE_ALPHA = 0.1
#: floor of the share of a layer's experts the guesses miss, in next-use's eviction cost
MIN_UNCOVERED = 0.05
#: a layer's frequencies are held times a unit that grows by 1 / (1 - NEXT_USE_ALPHA) a visit, and
#: brought back to 1 past this (far from float64's range, whatever the alpha)
_UNIT_RESCALE = 1e9


class TierCache(Generic[K]):
    """Values with sizes in bytes. `put` evicts until the new value fits; a value larger than
    the whole budget is not cached. `used` never exceeds `budget`. Keys are (layer, expert)
    for the sweep policies."""

    def __init__(self, name: str, budget: int, policy: str = "lru", *, pinned: Iterable[K] = (),
                 aging_period: int = 1024, sweep: Sequence[int] = ()):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")
        if budget < 0:
            raise ValueError(f"{name} budget must not be negative")
        self.name, self.budget, self.policy = name, budget, policy
        self.pinned = set(pinned)
        self.aging_period = aging_period
        self._items: "OrderedDict[K, tuple[Any, int]]" = OrderedDict()   # least recently used first
        self._counts: dict[K, float] = {}
        self._accesses = 0
        self._tick = 0
        self._last: dict[K, int] = {}   # key -> tick of its last access (ties go to the oldest)
        # sweep policies: the layer order of a decode step, where the sweep is, per-layer visits
        self._sweep_pos = {layer: i for i, layer in enumerate(sweep)}
        self._current = 0
        # per layer: key -> long-run frequency per visit, times the layer's _chance_unit: every visit
        # decays all of a layer's frequencies, which costs one multiplication of the unit instead
        # of one of each entry (up to the layer's experts, a visit per layer and token)
        self._chance: dict[int, dict[K, float]] = {}
        self._chance_unit: dict[int, float] = {}
        self._reuse: dict[int, float] = {}             # per layer: share asked for again at the next visit
        self._last_asked: dict[int, set] = {}          # per layer: the keys its last visit asked for
        self._wanted: set = set()   # asked for at the current layer and not served yet: needed now
        self._expected: set = set()  # guessed by a next-layer predictor for a layer not visited yet
        self._covered: dict[int, float] = {}    # per layer: share of its experts the guesses named
        self._members: dict[int, set] = {}      # per layer: its cached keys
        self._ranked: dict[int, list] = {}      # per layer: cached keys, most evictable first (lazy)
        if policy in SWEEP_POLICIES and not self._sweep_pos:
            raise ValueError(f"the {policy} policy needs the layer order (sweep=)")
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

    def get_many(self, keys: list[K]) -> list[Any]:
        """get of each of `keys`, which must all be held (peek first: the caller holds the lock
        under which they cannot leave), under one lock."""
        with self._lock:
            out = [self._items[k][0] for k in keys]
            for k in keys:
                self._touch(k)
            return out

    def _touch(self, key: K) -> None:
        self._wanted.discard(key)
        self._items.move_to_end(key)
        self._tick += 1
        self._last[key] = self._tick
        self._dirty(key)
        self._counts[key] = self._counts.get(key, 0.0) + 1.0
        self._accesses += 1
        if self._accesses % self.aging_period == 0:
            for k in self._counts:
                self._counts[k] /= 2.0

    def _dirty(self, key: K) -> None:
        if self._sweep_pos:
            self._ranked.pop(key[0], None)

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
            for k in self._wanted:
                self._ranked.pop(k[0], None)
            self._wanted = set(keys)
            if self._covered or self._expected:     # a predictor guesses: how much of this layer it names
                guessed = {k for k in self._expected if k[0] == layer}
                share = len(guessed & self._wanted) / max(len(self._wanted), 1)
                self._covered[layer] = self._covered.get(layer, share) * (1.0 - REUSE_ALPHA) + REUSE_ALPHA * share
            self._expected = {k for k in self._expected if k[0] != layer}
            self._ranked.pop(layer, None)
            chance = self._chance.setdefault(layer, {})
            unit = self._chance_unit.get(layer, 1.0) / (1.0 - NEXT_USE_ALPHA)
            if unit > _UNIT_RESCALE:      # every ~1000 visits: back to 1, dropping what has faded
                for k in list(chance):
                    chance[k] /= unit
                    if chance[k] < 1e-4:
                        del chance[k]
                unit = 1.0
            self._chance_unit[layer] = unit
            for k in keys:
                chance[k] = chance.get(k, 0.0) + NEXT_USE_ALPHA * unit
            now = set(keys)
            before = self._last_asked.get(layer)
            if before:
                share = len(before & now) / len(before)
                self._reuse[layer] = share if layer not in self._reuse else \
                    self._reuse[layer] * (1.0 - REUSE_ALPHA) + REUSE_ALPHA * share
            self._last_asked[layer] = now

    def expect(self, keys: Iterable[K]) -> None:
        """A next-layer predictor guesses `keys` for a layer about to run: next-use keeps them
        as if certain until that layer is visited. A no-op for the other policies."""
        if self.policy == "next-use":
            with self._lock:
                for k in keys:
                    self._expected.add(k)
                    self._dirty(k)

    def _layers_until(self, key: K) -> int:
        """Layers from the current one until `key`'s layer is visited again (1..L)."""
        n = len(self._sweep_pos)
        return (self._sweep_pos.get(key[0], 0) - self._current) % n or n

    def next_use(self, key: K) -> float:
        """Estimated tokens until `key` is asked for again (next-use policy)."""
        if key in self._wanted:
            return 0.0
        d = self._layers_until(key) / len(self._sweep_pos)
        if key in self._expected:
            return d
        layer = key[0]
        f = self._chance.get(layer, {}).get(key, 0.0) / self._chance_unit.get(layer, 1.0)
        if key in self._last_asked.get(layer, ()):
            r = self._reuse.get(layer, 0.0)
            f = r + (1.0 - r) * f
        q = min(1.0, f + 1e-3)
        # what an eviction costs is a read only when the guesses will not load the key again
        # first: a layer whose experts the prefetcher names 90 % of the time is 10x cheaper to
        # evict from than one it never guesses
        return (d + (1.0 - q) / q) / max(1.0 - self._covered.get(layer, 0.0), MIN_UNCOVERED)

    def staleness(self, key: K) -> float:
        """least-stale's order: layers until the key's layer comes round (current layer: 0 for
        an expert it still needs, a full sweep for one it has used)."""
        return 0.0 if key in self._wanted else float(self._layers_until(key))

    def _score(self, key: K) -> float:
        return self.next_use(key) if self.policy == "next-use" else self.staleness(key)

    def victim(self, exclude: Optional[Callable[[K], bool]] = None) -> Optional[K]:
        """The key the policy would evict next (never a pinned one, nor one `exclude` names)."""
        with self._lock:
            return self._victim(exclude)

    def victim_reference(self, exclude: Optional[Callable[[K], bool]] = None) -> Optional[K]:
        """The policy's victim by its plain definition, looking at every key (O(n); for tests)."""
        candidates = [k for k in self._items if k not in self.pinned and not (exclude and exclude(k))]
        if self.policy == "lru":
            return candidates[0] if candidates else None
        if self.policy == "lfu":
            return min(candidates, key=lambda k: self._counts.get(k, 0.0), default=None)
        return max(candidates, key=lambda k: (self._score(k), -self._last[k]), default=None)

    def _victim(self, exclude: Optional[Callable[[K], bool]] = None) -> Optional[K]:
        if self.policy == "lru":
            return next((k for k in self._items if k not in self.pinned and not (exclude and exclude(k))), None)
        if self.policy == "lfu":   # O(n) in the cached keys
            return self.victim_reference(exclude)
        # sweep policies: the best candidate of each layer, then the best of those. Within a
        # layer the order of the scores does not change until the layer is visited or one of its
        # keys changes (d is the same for all of them), and those events drop its ranking.
        best, best_rank = None, None
        for layer, members in self._members.items():
            ranked = self._ranked.get(layer)
            if ranked is None:
                ranked = sorted(members, key=lambda k: (-self._score(k), self._last[k]))
                self._ranked[layer] = ranked
            for k in ranked:
                if k in self.pinned or (exclude is not None and exclude(k)):
                    continue
                rank = (self._score(k), -self._last[k])
                if best_rank is None or rank > best_rank:
                    best, best_rank = k, rank
                break
        return best

    def _remove(self, key: K) -> tuple[Any, int]:
        value, size = self._items.pop(key)
        self.used -= size
        if self._sweep_pos:
            self._members[key[0]].discard(key)
            ranked = self._ranked.get(key[0])
            if ranked is not None:
                ranked.remove(key)
        return value, size

    def pop(self, key: K) -> Optional[Any]:
        """Remove `key` as an eviction (counted); returns its value or None."""
        with self._lock:
            if key not in self._items:
                return None
            self.evictions += 1
            return self._remove(key)[0]

    def next_tick(self) -> int:
        """A recency stamp for a miss being requested now, to give `put` when it lands: the
        key then ranks as used at request time, whatever order concurrent loads finish in."""
        with self._lock:
            self._tick += 1
            return self._tick

    def put(self, key: K, value: Any, nbytes: int, tick: Optional[int] = None) -> list[K]:
        """Insert (or refresh) `key`; returns the evicted keys. Not cached when it cannot fit.
        tick: its recency stamp (next_tick() at request time); default now."""
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
                self._remove(victim)
                self.evictions += 1
                evicted.append(victim)
            self._wanted.discard(key)
            self._items[key] = (value, nbytes)
            if tick is None:
                self._tick += 1
                tick = self._tick
            self._last[key] = tick
            # keys used after `tick` stay more recent than this one (a few: those touched while it loaded)
            later = []
            for k in reversed(self._items):
                if k != key and self._last.get(k, 0) > tick:
                    later.append(k)
                elif k != key:
                    break
            for k in sorted(later, key=self._last.__getitem__):
                self._items.move_to_end(k)
            if self._sweep_pos:
                self._members.setdefault(key[0], set()).add(key)
                self._dirty(key)
            self._counts[key] = self._counts.get(key, 0.0) + 1.0
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            assert self.used <= self.budget
            return evicted

    def discard(self, key: K) -> None:
        with self._lock:
            if key in self._items:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._members.clear()
            self._ranked.clear()
            self.used = 0
