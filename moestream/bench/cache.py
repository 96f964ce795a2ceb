"""`moestream bench cache`: the hit rate of each eviction policy on routing traces, against
Belady's offline optimum.

The simulator drives the Store's own TierCache objects in the order the Store calls them for
one decode step of one layer (Store.note_routing, Store.fetch, then a slot per miss, evicting
the policy's victim among entries no caller holds: the layer's own experts are held until the
layer is done). So a simulated hit rate is the one a Store gets on the same requests
(tests/bench/test_cache.py replays a trace through both). A layer that asks for more experts
than there are slots (a long prefill) decodes the rest uncached, as the Store does.

Policies:
  lru, lfu            TierCache's own (lfu halves its counts every 1024 accesses)
  pinned+lru          the profile's hottest experts (half the capacity) never evicted, LRU for the rest
  least-stale         the layer sweep alone (SpecMD's Least-Stale, see storage/cache.py)
  next-use            the default: the sweep plus per-expert frequencies
  next-use+predict    next-use told the next-layer predictor's guesses (traces that recorded them)
  frequency-oracle    offline: pins the experts the trace uses most (its own counts, as many as
                      the slots less one layer's top-k), LRU for the rest. It knows how often each
                      expert will be used, not when: the most a policy of frequencies can get
  belady              the offline optimum (evicts the expert used furthest in the future)"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from typing import Any, Iterable, Optional, Sequence

from ..errors import UsageError
from ..formats.profile import build_profile, hot_experts, load_profile
from ..formats.trace import RoutingTrace
from ..storage.cache import TierCache

ONLINE = ("lru", "lfu", "pinned+lru", "least-stale", "next-use", "next-use+predict")
OFFLINE = ("frequency-oracle", "belady")
POLICIES = ONLINE + OFFLINE
Request = tuple[int, list[int], Optional[list[int]]]


def simulate(requests: Sequence[Request], layers: Sequence[int], slots: int, policy: str, *,
             pinned: Iterable[tuple[int, int]] = ()) -> int:
    """Hits of `policy` with `slots` one-expert slots on `requests` (RoutingTrace.requests())."""
    base = {"pinned+lru": "lru", "next-use+predict": "next-use"}.get(policy, policy)
    cache: TierCache = TierCache("device", slots, base, pinned=pinned if policy == "pinned+lru" else (), sweep=layers)
    predict = policy == "next-use+predict"
    hits = 0
    for i, (layer, chosen, _) in enumerate(requests):
        if predict and i + 1 < len(requests) and requests[i + 1][2]:
            # the guess for the next layer is made before this layer's experts run (DecoderLayer)
            nxt_layer, _, guess = requests[i + 1]
            cache.expect([(nxt_layer, e) for e in guess])
        keys = [(layer, e) for e in chosen]
        cache.visit(layer, keys)      # Store.note_routing
        cache.visit(layer)            # Store.fetch
        misses = []
        for k in keys:
            if cache.get(k) is not None:
                hits += 1
            else:
                misses.append((k, cache.next_tick()))   # ranks as used when requested
        held = set(keys)
        for k, tick in misses:        # the dispatcher: a free slot, or the victim no caller holds
            if len(cache) >= slots:
                victim = cache.victim(exclude=held.__contains__)
                if victim is None:
                    continue          # decoded uncached
                cache.pop(victim)
            cache.put(k, True, 1, tick=tick)
    return hits


def most_used(requests: Sequence[Request], n: int) -> list[tuple[int, int]]:
    """The `n` (layer, expert) keys the requests use most, most used first (ties: lowest key)."""
    counts: dict = {}
    for layer, chosen, _ in requests:
        for e in chosen:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))[:max(n, 0)]


def belady(requests: Sequence[Request], slots: int) -> int:
    """Hits of Belady's MIN (evict the key whose next use is furthest) on the same requests:
    no online policy can do better. Heap with lazy deletion: O(n log n)."""
    acc = [(layer, e) for layer, chosen, _ in requests for e in chosen]
    nxt: dict = {}
    future = [0] * len(acc)
    for i in range(len(acc) - 1, -1, -1):
        future[i] = nxt.get(acc[i], 1 << 62)
        nxt[acc[i]] = i
    cached: dict = {}            # key -> its next use
    heap: list = []              # (-next use, key); stale entries skipped
    hits = 0
    for i, k in enumerate(acc):
        if k in cached:
            hits += 1
        elif len(cached) >= slots:
            while True:
                nu, victim = heapq.heappop(heap)
                if cached.get(victim) == -nu:
                    del cached[victim]
                    break
        cached[k] = future[i]
        heapq.heappush(heap, (-future[i], k))
    return hits


def parse_capacities(text: str) -> list[float]:
    """'5%,10%,0.25' -> [0.05, 0.1, 0.25]; UsageError on anything else."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise UsageError(f"--capacity {text!r}: {part!r} is not a fraction (e.g. 10% or 0.1)") from None
        if not 0 < v <= 1:
            raise UsageError(f"--capacity {text!r}: {part!r} must lie in (0, 100%]")
        out.append(v)
    return out


def bench_cache(traces: Sequence[tuple[str, RoutingTrace]], capacities: Sequence[float], *,
                profile: Optional[dict[str, Any]] = None, policies: Sequence[str] = POLICIES,
                progress=None) -> dict[str, Any]:
    """Hit rates per trace, capacity and policy. `profile` picks pinned+lru's hot set; without
    one, each trace's own counts do (an offline profile: flatters pinned+lru)."""
    results = []
    for name, trace in traces:
        requests = list(trace.requests())
        n = sum(len(c) for _, c, _ in requests)
        total = len(trace.layers) * trace.num_experts
        prof = profile if profile is not None else build_profile([trace])
        row: dict[str, Any] = {"trace": name, "layers": len(trace.layers), "experts": trace.num_experts,
                               "top_k": trace.top_k, "tokens": trace.tokens, "requests": n,
                               "profile": "given" if profile is not None else "the trace's own", "capacities": {}}
        for cap in capacities:
            slots = max(1, int(round(cap * total)))
            rates = {}
            for pol in policies:
                if pol == "next-use+predict" and trace.predicted is None:
                    continue
                t0 = time.perf_counter()
                if pol == "belady":
                    h = belady(requests, slots)
                elif pol == "frequency-oracle":
                    h = simulate(requests, trace.layers, slots, "pinned+lru",
                                 pinned=most_used(requests, slots - trace.top_k))
                else:
                    pinned = hot_experts(prof, cap / 2) if pol == "pinned+lru" else ()
                    h = simulate(requests, trace.layers, slots, pol, pinned=pinned)
                rates[pol] = h / n if n else 0.0
                if progress:
                    progress(f"{name}: {cap:.0%} {pol}: {rates[pol]:.1%} ({time.perf_counter() - t0:.1f} s)")
            online = {p: r for p, r in rates.items() if p not in OFFLINE}
            best = max(online, key=online.get) if online else None
            row["capacities"][f"{cap:.0%}"] = {"slots": slots, "hit_rate": rates, "best_online": best,
                                               "best_vs_belady_pp": 100 * (rates["belady"] - rates[best])
                                               if best and "belady" in rates else None}
        results.append(row)
    return {"results": results}


def format_table(d: dict[str, Any]) -> str:
    lines = []
    for row in d["results"]:
        pols = list(next(iter(row["capacities"].values()))["hit_rate"])
        lines.append(f"{row['trace']}: {row['layers']} layers x {row['experts']} experts, top-{row['top_k']}, "
                     f"{row['tokens']} tokens, {row['requests']} expert requests (hot set from {row['profile']} profile)")
        lines.append("| capacity | slots | " + " | ".join(pols) + " | best online vs Belady |")
        lines.append("|---:|---:|" + "---:|" * (len(pols) + 1))
        for cap, c in row["capacities"].items():
            cells = [f"{c['hit_rate'][p]:.1%}" for p in pols]
            gap = f"{c['best_online']} {c['best_vs_belady_pp']:+.1f} pp" if c["best_vs_belady_pp"] is not None else ""
            lines.append(f"| {cap} | {c['slots']} | " + " | ".join(cells) + f" | {gap} |")
        lines.append("")
    return "\n".join(lines)


def plot(d: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = d["results"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        caps = list(row["capacities"])
        x = [float(c.rstrip("%")) for c in caps]
        for pol in next(iter(row["capacities"].values()))["hit_rate"]:
            ax.plot(x, [100 * row["capacities"][c]["hit_rate"][pol] for c in caps], marker="o", label=pol,
                    linestyle="--" if pol == "belady" else "-")
        ax.set_title(f"{row['trace']}\n{row['layers']}L x {row['experts']}E top-{row['top_k']}", fontsize=9)
        ax.set_xlabel("capacity (% of experts)")
        ax.set_ylabel("hit rate (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="*", help="routing traces (moestream generate --trace)")
    p.add_argument("--capacity", default="5%,10%,25%,50%", help="cache sizes, fractions of all experts")
    p.add_argument("--profile", help="PROFILE.json for pinned+lru's hot set (default: each trace's own counts)")
    p.add_argument("--synthetic", action="append", default=[], metavar="LxExK",
                   help="also a synthetic trace of L layers x E experts, top-K (e.g. 48x128x8)")
    p.add_argument("--calibrate", metavar="PROFILE.json",
                   help="fit the synthetic traces' skew, reuse and cross-layer correlation to this profile")
    p.add_argument("--tokens", type=int, default=200, help="tokens per synthetic trace (default 200)")
    p.add_argument("--policy", action="append", choices=POLICIES, help="limit to these (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="hit rate against capacity, one panel per trace")


def run(a: argparse.Namespace) -> int:
    caps = parse_capacities(a.capacity)
    if not a.traces and not a.synthetic:
        raise UsageError("give trace files, --synthetic LxExK, or both")
    log = (lambda m: print(m, file=sys.stderr)) if a.json else (lambda m: None)
    traces = [(t, RoutingTrace.load(t)) for t in a.traces]
    params: dict[str, Any] = {"skew": 1.0, "reuse": 0.3, "cross": 0.0}
    if a.calibrate:
        params = calibrate_from(load_profile(a.calibrate))
        log(f"calibrated to {a.calibrate}: {params}")
    for spec in a.synthetic:
        try:
            layers, experts, k = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise UsageError(f"--synthetic {spec!r}: expected LAYERSxEXPERTSxTOPK, e.g. 48x128x8") from None
        from .traces import synthetic_trace
        tr = synthetic_trace(a.tokens, layers, experts, k, skew=params["skew"], reuse=params["reuse"],
                             cross=params["cross"])
        traces.append((f"synthetic {spec}" + (" (calibrated)" if a.calibrate else ""), tr))
    d = bench_cache(traces, caps, profile=load_profile(a.profile) if a.profile else None,
                    policies=a.policy or POLICIES, progress=log)
    d["synthetic_parameters"] = params if a.synthetic else None
    if a.plot:
        plot(d, a.plot)
    print(json.dumps(d, indent=2) if a.json else format_table(d))
    return 0


def calibrate_from(profile: dict[str, Any]) -> dict[str, float]:
    from .traces import calibrate
    return calibrate(profile)
