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
  least-stale+prefetch, next-use+prefetch
                      the same policies loading the guesses ahead, as Store.prefetch does: a
                      prefetched expert that is then asked for is a hit (SpecMD counts hits so);
                      what it costs shows as reads per token (demand reads + prefetch loads)
  frequency-oracle    offline: pins the experts the trace uses most (its own counts, as many as
                      the slots less one layer's top-k), LRU for the rest. It knows how often each
                      expert will be used, not when: the most a policy of frequencies can get
  belady              the offline optimum (evicts the expert used furthest in the future)
  belady+prefetch     the same, offered the same guesses to load: the bound for the prefetching
                      policies (with them an online policy can beat plain belady, which only
                      bounds policies that load on demand)

Guesses cover every layer, the first layer's made from the token's embedding (CausalLM.forward),
and name the top-k experts and `--extra-guesses` more (recorded guesses are cut to that width).
Synthetic traces get theirs from a simulated predictor (traces.with_simulated_guesses)."""
from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from ..errors import UsageError
from ..formats.profile import build_profile, hot_experts, load_profile
from ..formats.trace import RoutingTrace
from ..storage.cache import TierCache
from .traces import PREFETCH_ACCURACY, synthetic_trace, with_simulated_guesses

ONLINE = ("lru", "lfu", "pinned+lru", "least-stale", "next-use")
#: online policies that also load the predictor's guesses ahead (the Store's `prefetch`)
PREFETCHING = ("least-stale+prefetch", "next-use+prefetch")
OFFLINE = ("frequency-oracle", "belady", "belady+prefetch")
POLICIES = ONLINE + PREFETCHING + OFFLINE
#: the policies that need a trace's next-layer guesses
GUESSING = ("least-stale+prefetch", "next-use+prefetch", "belady+prefetch")
Request = tuple[int, list[int], Optional[list[int]]]


@dataclass(frozen=True)
class Replay:
    """What one replay of a trace did, in expert requests and loads."""
    hits: int              # requests served from the cache (a prefetched expert counts once it is used)
    misses: int            # requests that read from storage (demand reads)
    prefetched: int = 0    # prefetch loads: extra reads, right or wrong
    prefetch_used: int = 0  # of those, asked for before they were evicted
    prefetch_skipped: int = 0  # guesses not loaded: no slot a prefetch may take


def replay(requests: Sequence[Request], layers: Sequence[int], slots: int, policy: str, *,
           pinned: Iterable[tuple[int, int]] = ()) -> Replay:
    """Replay `requests` (RoutingTrace.requests()) through a TierCache of `slots` one-expert slots
    under `policy`, as the Store calls it. "+prefetch": after each layer's own experts, the next
    request's guesses are loaded as Store.prefetch loads them (never evicting an expert of the
    guessed layer, nor one the current layer asked for; dropped when no other slot can be had),
    each landing before that layer asks: the cache's view, with the time a read takes left to
    `bench decode`."""
    base = policy.split("+")[0] if policy != "pinned+lru" else "lru"
    cache: TierCache = TierCache("device", slots, base, pinned=pinned if policy == "pinned+lru" else (), sweep=layers)
    prefetch = policy.endswith("+prefetch")
    hits = misses = prefetched = used = skipped = 0
    unused: set = set()          # prefetched, not asked for yet

    def make_room(exclude) -> bool:
        """A free slot, or evict the policy's victim among keys `exclude` spares (Store._claim_slot)."""
        if len(cache) < slots:
            return True
        victim = cache.victim(exclude=exclude)
        if victim is None:
            return False
        cache.pop(victim)
        unused.discard(victim)
        return True

    for i, (layer, chosen, _) in enumerate(requests):
        guess = requests[i + 1][2] if prefetch and i + 1 < len(requests) else None
        keys = [(layer, e) for e in chosen]
        cache.visit(layer, keys)      # Store.note_routing
        cache.visit(layer)            # Store.fetch
        pending = []
        for k in keys:
            if cache.get(k) is not None:
                hits += 1
                if k in unused:
                    unused.discard(k)
                    used += 1
            else:
                pending.append((k, cache.next_tick()))   # ranks as used when requested
        misses += len(pending)
        held = set(keys)
        for k, tick in pending:       # the dispatcher: a free slot, or the victim no caller holds
            if make_room(held.__contains__):
                cache.put(k, True, 1, tick=tick)   # else decoded uncached
        if guess:                     # Store.prefetch, queued behind this layer's reads
            nxt = requests[i + 1][0]
            wanted = [(nxt, e) for e in guess]
            cache.expect(wanted)
            for k in wanted:
                if k in cache:
                    continue
                if not make_room(lambda v: v[0] == nxt or v in held):
                    skipped += 1
                    continue
                cache.put(k, True, 1)
                unused.add(k)
                prefetched += 1
    return Replay(hits, misses, prefetched, used, skipped)


def simulate(requests: Sequence[Request], layers: Sequence[int], slots: int, policy: str, *,
             pinned: Iterable[tuple[int, int]] = ()) -> int:
    """Hits of `policy` with `slots` one-expert slots on `requests` (see `replay`)."""
    return replay(requests, layers, slots, policy, pinned=pinned).hits


def most_used(requests: Sequence[Request], n: int) -> list[tuple[int, int]]:
    """The `n` (layer, expert) keys the requests use most, most used first (ties: lowest key)."""
    counts: dict = {}
    for layer, chosen, _ in requests:
        for e in chosen:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))[:max(n, 0)]


def belady(requests: Sequence[Request], slots: int, *, prefetch: bool = False) -> int:
    """Hits of Belady's MIN (evict the key whose next use is furthest) on the same requests, every
    miss cached: no online policy that caches its misses can do better. prefetch=True: also
    offered, after each layer, the next request's guesses, as the "+prefetch" policies are; it
    loads one only when a cached key (or no key: a free slot) is needed later than the guess, and
    counts a key as not needed when a guess of it comes before its next use (it can be loaded
    again for free). No policy fed the same guesses can do better (tests/bench/test_cache.py
    checks this against a search over every schedule). Heap with lazy deletion: O(n log n)."""
    events: list[tuple[bool, tuple[int, int]]] = []     # (demand?, key) in replay order
    for i, (layer, chosen, _) in enumerate(requests):
        events += [(True, (layer, e)) for e in chosen]
        if prefetch and i + 1 < len(requests) and requests[i + 1][2]:
            nxt, _, guess = requests[i + 1]
            events += [(False, (nxt, e)) for e in guess]
    never = 1 << 62
    nxt_event: dict = {}
    # per event: when its key is next needed, as an eviction sees it: its next demand use, or
    # never when a guess of it comes first (dropping it then costs nothing: the guess reloads it)
    future = [never] * len(events)
    for i in range(len(events) - 1, -1, -1):
        demand, k = events[i]
        future[i] = nxt_event.get(k, never)
        nxt_event[k] = i if demand else never
    cached: dict = {}            # key -> its next use
    heap: list = []              # (-next use, key); stale entries skipped

    def furthest() -> tuple[int, tuple[int, int]]:
        while True:
            nu, k = heap[0]
            if cached.get(k) == -nu:
                return -nu, k
            heapq.heappop(heap)

    hits = 0
    for i, (demand, k) in enumerate(events):
        if k in cached:
            hits += demand
        elif not demand and len(cached) >= slots and furthest()[0] <= future[i]:
            continue                       # every cached key is needed before the guess: skip it
        elif len(cached) >= slots:
            del cached[furthest()[1]]
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
                threshold: float = 0.0, progress=None) -> dict[str, Any]:
    """Hit rates per trace, capacity and policy. `profile` picks pinned+lru's hot set; without
    one, each trace's own counts do (an offline profile: flatters pinned+lru). The policies of
    GUESSING run on traces that recorded next-layer guesses, with those of confidence >=
    `threshold`. Per capacity: the best demand-only online policy against belady, and the best
    prefetching one against belady+prefetch (the bound for any policy given the same guesses);
    `reads_per_token`: demand reads plus prefetch loads."""
    results = []
    for name, trace in traces:
        requests = list(trace.requests(threshold))
        n = sum(len(c) for _, c, _ in requests)
        total = len(trace.layers) * trace.num_experts
        prof = profile if profile is not None else build_profile([trace])
        guessed = trace.predicted is not None
        row: dict[str, Any] = {"trace": name, "layers": len(trace.layers), "experts": trace.num_experts,
                               "top_k": trace.top_k, "tokens": trace.tokens, "requests": n,
                               "profile": "given" if profile is not None else "the trace's own",
                               "guesses": trace.meta.get("simulated_guesses", "recorded") if guessed else None,
                               "guess_width": trace.guess_width if guessed else None,
                               "threshold": threshold if guessed else None, "capacities": {}}
        for cap in capacities:
            slots = max(1, int(round(cap * total)))
            rates, reads, extra = {}, {}, {}
            for pol in policies:
                if pol in GUESSING and not guessed:
                    continue
                t0 = time.perf_counter()
                if pol.startswith("belady"):
                    h, r = belady(requests, slots, prefetch=pol == "belady+prefetch"), None
                else:
                    if pol == "frequency-oracle":
                        rp = replay(requests, trace.layers, slots, "pinned+lru",
                                    pinned=most_used(requests, slots - trace.top_k))
                    else:
                        rp = replay(requests, trace.layers, slots, pol,
                                    pinned=hot_experts(prof, cap / 2) if pol == "pinned+lru" else ())
                    h, r = rp.hits, rp.misses + rp.prefetched
                    if pol in PREFETCHING:
                        extra[pol] = {"prefetched": rp.prefetched, "prefetch_used": rp.prefetch_used,
                                      "prefetch_skipped": rp.prefetch_skipped}
                rates[pol] = h / n if n else 0.0
                reads[pol] = r / trace.tokens if r is not None and trace.tokens else None
                if progress:
                    progress(f"{name}: {cap:.0%} {pol}: {rates[pol]:.1%} ({time.perf_counter() - t0:.1f} s)")
            c: dict[str, Any] = {"slots": slots, "hit_rate": rates, "reads_per_token": reads, "prefetch": extra}
            for label, group, bound in (("online", ONLINE, "belady"), ("prefetching", PREFETCHING, "belady+prefetch")):
                mine = {p: rates[p] for p in group if p in rates}
                best = max(mine, key=mine.get) if mine else None
                c[f"best_{label}"] = best
                c[f"best_{label}_vs_{bound}_pp"] = 100 * (rates[bound] - rates[best]) \
                    if best and bound in rates else None
            c["best_vs_belady_pp"] = c.pop("best_online_vs_belady_pp")   # the name earlier results used
            row["capacities"][f"{cap:.0%}"] = c
        results.append(row)
    return {"results": results}


def _shortfall(pp: float) -> str:
    return f"{pp:.1f} pp" if pp >= 0 else f"none ({-pp:.1f} pp ahead)"


#: the policies the default table shows (--wide: every one): the simplest, the default, its
#: prefetching form and the two optima they are measured against; the best online and best
#: prefetching policies are named in the gap columns whichever they are
NARROW = ("lru", "next-use", "next-use+prefetch", "belady", "belady+prefetch")


def format_table(d: dict[str, Any], wide: bool = False) -> str:
    """Markdown tables, one per trace: every policy with `wide`, else the NARROW ones."""
    lines = []
    for row in d["results"]:
        pols = list(next(iter(row["capacities"].values()))["hit_rate"])
        if not wide:
            pols = [p for p in pols if p in NARROW]
        guesses = ""
        if row.get("guesses") is not None:
            g = row["guesses"]
            guesses = (f", guesses {'recorded' if g == 'recorded' else 'simulated, top-k accuracy ' + str(g['accuracy'])}"
                       f" of {row.get('guess_width')} experts (confidence >= {row['threshold']})")
        lines.append(f"{row['trace']}: {row['layers']} layers x {row['experts']} experts, top-{row['top_k']}, "
                     f"{row['tokens']} tokens, {row['requests']} expert requests (hot set from {row['profile']} "
                     f"profile{guesses})")
        prefetching = [p for p in PREFETCHING if p in pols]
        gaps = " | best online, short of Belady by" + (" | best prefetching, short of belady+prefetch by"
                                                       if prefetching else "")
        lines.append("| capacity | slots | " + " | ".join(pols) + gaps + " |")
        lines.append("|---:|---:|" + "---:|" * (len(pols) + 1 + bool(prefetching)))
        for cap, c in row["capacities"].items():
            cells = [f"{c['hit_rate'][p]:.1%}" for p in pols]
            # the bound minus the best policy: a shortfall, printed as one (a signed "+4.1 pp" read as
            # beating the optimum)
            gap = f"{c['best_online']} {_shortfall(c['best_vs_belady_pp'])}" if c["best_vs_belady_pp"] is not None else ""
            if prefetching:
                pp = c["best_prefetching_vs_belady+prefetch_pp"]
                gap += f" | {c['best_prefetching']} {_shortfall(pp)}" if pp is not None else " | "
            lines.append(f"| {cap} | {c['slots']} | " + " | ".join(cells) + f" | {gap} |")
        if prefetching:
            lines.append("reads per token (demand reads + prefetch loads): " + "; ".join(
                f"{cap}: " + ", ".join(f"{p} {c['reads_per_token'][p]:.1f}" for p in ("next-use", *prefetching)
                                       if c["reads_per_token"].get(p) is not None)
                for cap, c in row["capacities"].items()))
        lines.append("")
    if not wide:
        lines.append("(--wide: every policy's hit rate; --json: every figure)")
    return "\n".join(lines)


def plot(d: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = d["results"]
    cols = min(len(rows), 3)              # panels wrap into rows of three: readable at any count
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows):
        caps = list(row["capacities"])
        x = [float(c.rstrip("%")) for c in caps]
        for pol in next(iter(row["capacities"].values()))["hit_rate"]:
            ax.plot(x, [100 * row["capacities"][c]["hit_rate"][pol] for c in caps], marker="o", label=pol,
                    linestyle="--" if pol.startswith("belady") else "-")
        width = f", guesses of {row['guess_width']}" if row.get("guess_width") else ""
        ax.set_title(f"{row['trace']}\n{row['layers']}L x {row['experts']}E top-{row['top_k']}{width}", fontsize=9)
        ax.set_xlabel("capacity (% of experts)")
        ax.set_ylabel("hit rate (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
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
    p.add_argument("--threshold", type=float, default=0.0,
                   help="confidence a recorded guess needs to be used (default 0: every guess)")
    p.add_argument("--guess-accuracy", type=float, default=PREFETCH_ACCURACY,
                   help=f"accuracy of the top-k of the simulated predictor that guesses synthetic traces' "
                        f"experts (default {PREFETCH_ACCURACY}; 0 for none)")
    p.add_argument("--extra-guesses", type=int, default=0, metavar="N",
                   help="guesses name the top-k experts and N more (default 0, as generate's): synthetic traces' "
                        "simulated ones; recorded ones are cut to that width (record wider ones with generate "
                        "--extra-guesses)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--wide", action="store_true", help=f"a column for every policy (default: {', '.join(NARROW)})")
    p.add_argument("--plot", metavar="FILE.png", help="hit rate against capacity, one panel per trace")


def run(a: argparse.Namespace) -> int:
    caps = parse_capacities(a.capacity)
    if not 0 <= a.guess_accuracy <= 1:
        raise UsageError(f"--guess-accuracy {a.guess_accuracy}: must lie in [0, 1]")
    if not a.traces and not a.synthetic:
        raise UsageError("give trace files, --synthetic LxExK, or both")
    if a.extra_guesses < 0:
        raise UsageError(f"--extra-guesses {a.extra_guesses}: must not be negative")
    if a.plot:   # before the replay, not after it: a missing plotter must not cost the results
        from ..extras import require
        require("matplotlib", "--plot")
    log = (lambda m: print(m, file=sys.stderr)) if a.json else (lambda m: None)
    traces = []
    for t in a.traces:
        tr = RoutingTrace.load(t)
        width = min(tr.top_k + a.extra_guesses, tr.num_experts)
        if tr.predicted is not None and width > tr.guess_width:
            raise UsageError(f"--extra-guesses {a.extra_guesses}: {t} recorded guesses of {tr.guess_width} experts "
                             f"(top-{tr.top_k}), and recorded guesses can be cut, not widened (record them with "
                             f"generate --extra-guesses)")
        traces.append((t, tr.narrowed(width)))
    params: dict[str, Any] = {"skew": 1.0, "reuse": 0.3, "cross": 0.0}
    if a.calibrate:
        params = calibrate_from(load_profile(a.calibrate))
        log(f"calibrated to {a.calibrate}: {params}")
    for spec in a.synthetic:
        try:
            layers, experts, k = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise UsageError(f"--synthetic {spec!r}: expected LAYERSxEXPERTSxTOPK, e.g. 48x128x8") from None
        tr = synthetic_trace(a.tokens, layers, experts, k, skew=params["skew"], reuse=params["reuse"],
                             cross=params["cross"])
        if a.guess_accuracy > 0:
            tr = with_simulated_guesses(tr, a.guess_accuracy, width=min(k + a.extra_guesses, experts))
        traces.append((f"synthetic {spec}" + (" (calibrated)" if a.calibrate else ""), tr))
    d = bench_cache(traces, caps, profile=load_profile(a.profile) if a.profile else None,
                    policies=a.policy or POLICIES, threshold=a.threshold, progress=log)
    d["synthetic_parameters"] = params if a.synthetic else None
    if a.plot:
        plot(d, a.plot)
    print(json.dumps(d, indent=2) if a.json else format_table(d, wide=a.wide))
    return 0


def calibrate_from(profile: dict[str, Any]) -> dict[str, float]:
    from .traces import calibrate
    return calibrate(profile)
