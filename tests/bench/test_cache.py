"""The cache simulator drives the Store's own policy objects: a trace replayed through a real
Store and through the simulator gives the same hits; Belady bounds every policy; the CLI."""
import functools
import json
import random
import subprocess
import sys
import time
from concurrent.futures import wait

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import moestream
from moestream.bench.cache import (ONLINE, PREFETCHING, belady, bench_cache, format_table, most_used, parse_capacities,
                                   replay, simulate)
from moestream.bench.traces import EXTRA_RECALL, simulated_guess, synthetic_trace, with_simulated_guesses
from moestream.errors import UsageError
from moestream.formats.profile import build_profile, hot_experts

EXPERT_BYTES = 3 * 64 * 48 * 4     # the tiny Mixtral's fp32 experts


@pytest.fixture(scope="module")
def store4(tmp_path_factory):
    """A plain 4-layer x 16-expert Mixtral store (one 36 KiB slot per expert)."""
    from moestream.demo import build_checkpoint
    root = tmp_path_factory.mktemp("cache")
    ckpt = build_checkpoint("mixtral", root / "ckpt", num_hidden_layers=4, num_local_experts=16, with_tokenizer=False)
    return moestream.convert(ckpt, root / "store", zstd_level=None, delta=False, progress=False)


def replay_through_store(path, trace, slots, policy, pinned=(), prefetch=False):
    """The Store asked as the forward asks it: note the routing, fetch the layer's experts, hold
    them until the layer is done, then (prefetch=True) prefetch the next layer's guesses and let
    them land. One read and one decode at a time, so puts happen in order."""
    with moestream.open(path, device_budget=slots * EXPERT_BYTES, host_budget=0, policy=policy, io="posix",
                        queue_depth=1, decode_threads=1, pinned_experts=pinned, prefetch_budget="1GiB") as s:
        assert s.expert_slots == slots
        requests = list(trace.requests())
        for i, (layer, chosen, _) in enumerate(requests):
            s.note_routing(layer, chosen)
            futures = s.fetch(layer, chosen)
            results = [f.result() for f in futures]
            del futures, results
            if prefetch and i + 1 < len(requests) and requests[i + 1][2]:
                nxt, _, guess = requests[i + 1]
                s.prefetch(nxt, guess)
                landing = [s._pending[(nxt, e)].future for e in guess if (nxt, e) in s._pending]
                wait(landing, timeout=10)      # a wrong guess lands too: nothing asks before it does
                del landing                    # a landed future's result holds its slot
            # a decode thread drops its own reference to a result just after handing it over:
            # wait for that, so no slot of this layer still counts as held at the next one
            deadline = time.monotonic() + 10
            while any(s.arena.pinned(s.l1.peek(k)) for k in s.l1.keys()) and time.monotonic() < deadline:
                time.sleep(0.0005)
        return s.stats()


@pytest.mark.parametrize("policy", ["lru", "lfu", "least-stale", "next-use", "pinned+lru",
                                    "least-stale+prefetch", "next-use+prefetch"])
def test_a_simulated_hit_rate_is_the_one_a_store_gets(store4, policy):
    trace = synthetic_trace(40, 4, 16, 2, skew=1.0, reuse=0.3, cross=0.2, seed=3)
    trace = with_simulated_guesses(trace, 0.7, seed=1)       # wrong guesses must cost the same too
    requests = list(trace.requests())
    slots = 12
    pinned = hot_experts(build_profile([trace]), 6 / 64) if policy == "pinned+lru" else ()
    simulated = replay(requests, trace.layers, slots, policy, pinned=pinned)
    base = {"pinned+lru": "lru"}.get(policy, policy.split("+")[0])
    real = replay_through_store(store4, trace, slots, base, pinned, prefetch=policy.endswith("+prefetch"))
    assert real["hits_l1"] == simulated.hits
    assert 0 < simulated.hits < sum(len(c) for _, c, _ in requests)
    assert real["prefetch_issued"] == simulated.prefetched and real["prefetch_used"] == simulated.prefetch_used
    if policy.endswith("+prefetch"):
        assert real.get("prefetch_skipped", 0) == simulated.prefetch_skipped
        # some guesses were wrong and some used: both kinds went through the comparison
        assert 0 < simulated.prefetch_used < simulated.prefetched


def test_belady_bounds_every_online_policy_and_lru_fails_the_sweep():
    trace = synthetic_trace(150, 6, 32, 4, skew=1.0, reuse=0.3, cross=0.2, seed=1)
    requests = list(trace.requests())
    for slots in (10, 48, 96):
        best = belady(requests, slots)
        for pol in ONLINE:
            assert simulate(requests, trace.layers, slots, pol,
                            pinned=hot_experts(build_profile([trace]), slots / 2 / 192)) <= best
    # a cache smaller than one sweep's working set: LRU evicts each expert just before its reuse
    assert simulate(requests, trace.layers, 10, "lru") < simulate(requests, trace.layers, 10, "next-use")


def best_by_search(requests, slots, prefetch):
    """The most hits any schedule gets, by trying them all: every miss cached (evicting any key),
    each guess either skipped or loaded (evicting any key). Tiny inputs only."""
    events = []
    for i, (layer, chosen, _) in enumerate(requests):
        events += [(True, (layer, e)) for e in chosen]
        if prefetch and i + 1 < len(requests) and requests[i + 1][2]:
            events += [(False, (requests[i + 1][0], e)) for e in requests[i + 1][2]]

    @functools.lru_cache(maxsize=None)
    def best(i, cached):
        if i == len(events):
            return 0
        demand, k = events[i]
        if k in cached:
            return demand + best(i + 1, cached)
        options = [] if demand else [cached]                  # a guess may be skipped
        options += [cached | {k}] if len(cached) < slots else [(cached - {v}) | {k} for v in cached]
        return max(best(i + 1, c) for c in options)

    return best(0, frozenset())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
                          st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))),
                min_size=1, max_size=7),
       st.integers(1, 3))
def test_belady_is_the_optimum_with_and_without_guesses(steps, slots):
    # two layers taking turns, four experts each: as many schedules as a search can try
    requests = [(i % 2, sorted(chosen), sorted(guess) if guess else None) for i, (chosen, guess) in enumerate(steps)]
    assert belady(requests, slots) == best_by_search(requests, slots, prefetch=False)
    assert belady(requests, slots, prefetch=True) == best_by_search(requests, slots, prefetch=True)


def test_belady_with_guesses_bounds_the_prefetching_policies():
    trace = with_simulated_guesses(synthetic_trace(150, 6, 32, 4, skew=1.0, reuse=0.3, cross=0.2, seed=1), 0.8)
    requests = list(trace.requests())
    for slots in (10, 48, 96):
        bound = belady(requests, slots, prefetch=True)
        assert bound >= belady(requests, slots)
        for pol in PREFETCHING:
            got = replay(requests, trace.layers, slots, pol)
            assert got.hits <= bound
            assert got.prefetched > 0 and got.hits + got.misses == sum(len(c) for _, c, _ in requests)
    # guesses that are right 80 % of the time are worth more hits than demand loading gets
    assert replay(requests, trace.layers, 48, "next-use+prefetch").hits > replay(requests, trace.layers, 48, "next-use").hits


def test_simulated_guesses_are_right_as_often_as_asked():
    rng = random.Random(0)
    assert simulated_guess([3, 5], 8, 1.0, rng) == [3, 5]
    wrong = simulated_guess([3, 5], 8, 0.0, rng)
    assert len(wrong) == 2 and not set(wrong) & {3, 5}
    trace = synthetic_trace(200, 4, 16, 2, seed=5)
    g = with_simulated_guesses(trace, 0.85, seed=2)
    assert (g.predicted >= 0).all()                 # every layer, the first one's from the embedding
    right = (g.predicted == trace.experts).mean()
    assert 0.8 < right < 0.9
    assert np.array_equal(g.experts, trace.experts) and g.meta["simulated_guesses"]["accuracy"] == 0.85


def test_wider_simulated_guesses_catch_what_the_top_k_missed():
    rng = random.Random(0)
    # the extra guesses name the missed experts when extra_recall is 1, and never when it is 0
    assert sorted(simulated_guess([3, 5], 8, 0.0, rng, width=4, extra_recall=1.0)[2:]) == [3, 5]
    assert not set(simulated_guess([3, 5], 8, 0.0, rng, width=6, extra_recall=0.0)) & {3, 5}
    assert simulated_guess([3, 5], 4, 1.0, rng, width=9) and len(simulated_guess([3, 5], 4, 1.0, rng, width=9)) == 4
    trace = synthetic_trace(300, 4, 16, 2, seed=5)
    g = with_simulated_guesses(trace, 0.85, seed=2, width=3)
    assert g.guess_width == 3 and g.meta["simulated_guesses"]["width"] == 3
    for row in g.predicted.reshape(-1, 3):
        assert len(set(row.tolist())) == 3          # no expert named twice
    top_k = (g.predicted[:, :, :2, None] == trace.experts[:, :, None, :]).any(2).mean()
    whole = (g.predicted[:, :, :, None] == trace.experts[:, :, None, :]).any(2).mean()
    # the third guess finds ~EXTRA_RECALL of the 15 % the top-2 miss, not just another 1/14
    assert 0.8 < top_k < 0.9 and 0.08 * 0.6 * 0.8 < whole - top_k < 0.15 * 0.6 * 1.25
    # narrowing gives back the top-k guess
    assert np.array_equal(g.narrowed(2).predicted, g.predicted[:, :, :2]) and g.narrowed(5) is g


def test_belady_on_a_hand_made_sequence():
    # a b c a b d a b; every miss is cached (as in the Store), evicting the furthest next use
    seq = [(0, [e], None) for e in (0, 1, 2, 0, 1, 3, 0, 1)]
    # 2 slots: c evicts b (next use 4 > a's 3); a hits; b evicts c (never used again); d evicts
    # b (7 > a's 6); a hits; b misses
    assert belady(seq, 2) == 2
    assert belady(seq, 3) == 4          # c, then d, take the third slot; a and b hit twice
    assert belady(seq, 4) == 4


def test_bench_cache_reports_every_policy_and_the_gap_to_belady():
    trace = synthetic_trace(60, 4, 16, 2, seed=2)
    d = bench_cache([("t", trace)], [0.1, 0.5])
    caps = d["results"][0]["capacities"]
    assert list(caps) == ["10%", "50%"]
    for c in caps.values():
        rates = c["hit_rate"]
        assert set(rates) == {"lru", "lfu", "pinned+lru", "least-stale", "next-use", "frequency-oracle",
                              "belady"}   # no guesses recorded
        assert c["best_prefetching"] is None and c["best_prefetching_vs_belady+prefetch_pp"] is None
        assert all(0 <= r <= rates["belady"] for r in rates.values())
        # the best *online* policy: the frequency oracle is offline, like Belady
        assert c["best_online"] not in ("frequency-oracle", "belady")
        assert c["best_vs_belady_pp"] == pytest.approx(100 * (rates["belady"] - max(
            v for k, v in rates.items() if k not in ("belady", "frequency-oracle"))))


def test_bench_cache_with_guesses_reports_the_prefetching_policies_against_their_bound():
    trace = with_simulated_guesses(synthetic_trace(60, 4, 16, 2, seed=2), 0.85, width=3)
    d = bench_cache([("t", trace)], [0.1, 0.5])
    row = d["results"][0]
    assert row["guesses"] == {"accuracy": 0.85, "width": 3, "extra_recall": EXTRA_RECALL, "seed": 0}
    assert row["guess_width"] == 3
    for c in row["capacities"].values():
        rates = c["hit_rate"]
        assert set(PREFETCHING) | {"belady+prefetch"} <= set(rates)
        assert max(rates[p] for p in PREFETCHING) <= rates["belady+prefetch"]
        assert c["best_prefetching_vs_belady+prefetch_pp"] == pytest.approx(
            100 * (rates["belady+prefetch"] - max(rates[p] for p in PREFETCHING)))
        # demand-only policies are still held to plain belady
        assert c["best_online"] not in PREFETCHING
        # what prefetching costs: it reads more than next-use alone, and says how much was used
        assert c["reads_per_token"]["next-use+prefetch"] > c["reads_per_token"]["next-use"] > 0
        assert c["reads_per_token"]["belady"] is None
        assert 0 < c["prefetch"]["next-use+prefetch"]["prefetch_used"] <= c["prefetch"]["next-use+prefetch"]["prefetched"]
    table = format_table(d)
    assert "best prefetching, short of belady+prefetch by" in table and "best online, short of Belady by" in table
    import re
    assert not re.search(r"\+\d", table)     # shortfalls are not printed as signed gains (issue 26 item 6)
    # the default table is narrow (lru, next-use, its prefetching form, the optima); --wide has all
    wide = format_table(d, wide=True)
    header = [line for line in table.splitlines() if line.startswith("| capacity")][0]
    assert "lfu" not in header and "least-stale" not in header and "next-use+prefetch" in header
    assert all(p in wide for p in ONLINE + PREFETCHING)
    def width(t):
        return max(len(line) for line in t.splitlines() if line.startswith("|"))
    print(f"table widths: {width(table)} default, {width(wide)} --wide")
    assert width(table) < width(wide)


def test_frequency_oracle_pins_the_most_used_experts():
    # expert 0 of layer 0 is used every step, 1..5 once each: with 3 slots and top-1 the oracle
    # pins 2 keys, the most used first, and gets every reuse of expert 0 after its first use
    seq = [(0, [e], None) for e in (0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 1)]
    assert most_used(seq, 2) == [(0, 0), (0, 1)]
    assert most_used(seq, 0) == [] and most_used(seq, -1) == []
    assert simulate(seq, [0], 3, "pinned+lru", pinned=most_used(seq, 2)) == 6 == belady(seq, 3)
    assert simulate(seq, [0], 3, "lru") == 5          # LRU lets expert 1 go before its reuse


def test_capacities_are_parsed_or_refused():
    assert parse_capacities("5%, 10%,0.25") == [0.05, 0.1, 0.25]
    for bad in ("0%", "150%", "ten", "-0.1"):
        with pytest.raises(UsageError):
            parse_capacities(bad)


def test_cli_profile_and_bench_cache(tmp_path):
    trace = synthetic_trace(50, 4, 16, 2, seed=4)
    trace.save(tmp_path / "t.npz")
    run = lambda *a: subprocess.run([sys.executable, "-m", "moestream.cli", *a], capture_output=True, text=True)
    r = run("profile", str(tmp_path / "t.npz"), "-o", str(tmp_path / "p.json"), "--plot", str(tmp_path / "h.png"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p.json").read_text())["tokens"] == 50
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and f"wrote {tmp_path / 'h.png'}" in r.stdout
    from moestream.bench.trace_plot import plot_heat_map
    share = plot_heat_map([trace], str(tmp_path / "h2.png"))
    assert share.shape == (4, 16) and np.allclose(share.sum(axis=1), 1.0)
    assert np.allclose(share, trace.counts() / trace.counts().sum(axis=1, keepdims=True))
    r = run("bench", "cache", str(tmp_path / "t.npz"), "--capacity", "10%,50%", "--json", "--plot",
            str(tmp_path / "c.png"), "--synthetic", "3x8x2", "--tokens", "30")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [row["trace"] for row in d["results"]] == [str(tmp_path / "t.npz"), "synthetic 3x8x2"]
    assert (tmp_path / "c.png").stat().st_size > 0
    r = run("bench", "cache", "--synthetic", "3x8x2", "--guess-accuracy", "1.5")
    assert r.returncode == 2 and "--guess-accuracy" in r.stderr and "Traceback" not in r.stderr
    # wider guesses: simulated ones are drawn that wide, recorded ones cut to it, never widened
    with_simulated_guesses(trace, 0.8, width=3).save(tmp_path / "g.npz")
    r = run("bench", "cache", str(tmp_path / "g.npz"), "--capacity", "25%", "--json", "--synthetic", "3x8x2",
            "--tokens", "30", "--extra-guesses", "1")
    assert r.returncode == 0, r.stderr
    assert [row["guess_width"] for row in json.loads(r.stdout)["results"]] == [3, 3]
    r = run("bench", "cache", str(tmp_path / "g.npz"), "--capacity", "25%", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["guess_width"] == 2
    r = run("bench", "cache", str(tmp_path / "g.npz"), "--extra-guesses", "2")
    assert r.returncode == 2 and "g.npz recorded guesses of 3 experts" in r.stderr and "Traceback" not in r.stderr
    r = run("bench", "cache", "--synthetic", "3x8x2", "--extra-guesses", "-1")
    assert r.returncode == 2 and "--extra-guesses -1: must not be negative" in r.stderr and "Traceback" not in r.stderr
    r = run("bench", "cache", str(tmp_path / "t.npz"), "--capacity", "0%")
    assert r.returncode == 2 and "--capacity" in r.stderr and "Traceback" not in r.stderr
    r = run("bench", "cache", str(tmp_path / "p.json"))
    assert r.returncode == 1 and "not a" in r.stderr and "Traceback" not in r.stderr


def test_the_routing_model_trains_and_reports_against_a_unigram_baseline(tmp_path):
    from moestream.bench.routing_model import MODEL, train
    report = train(tmp_path / "rm", steps=3, corpus_bytes=1_000_000, progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (tmp_path / "rm" / name).exists()
    assert not (tmp_path / "rm.partial").exists()
    assert 0 < report["held_out_loss"] < 20 and 0 < report["unigram_held_out_loss"] < 20
    cov = report["routing_coverage"]
    assert 0 < cov["top_1%"] <= cov["top_20%"] <= cov["top_50%"] <= 1
    # the trained store converts and its routing can be recorded
    store = moestream.convert(tmp_path / "rm", tmp_path / "rm.moe", progress=False)
    from moestream.bench.traces import record_text_trace
    t = record_text_trace(store, ["def f(x):\n    return x + 1\n"], tokens_per_text=8)
    assert t.tokens == 8 and t.num_experts == MODEL["num_local_experts"] == 32
    assert len(t.layers) == MODEL["num_hidden_layers"] == 8


def test_a_routing_model_of_another_shape_is_trained_again(tmp_path, monkeypatch):
    from moestream.bench import routing_model as rm
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "training.json").write_text(json.dumps({"model": rm.MODEL}))
    trained = []
    monkeypatch.setattr(rm, "train", lambda out, progress=True, steps=None: trained.append(out))
    assert rm.ensure(tmp_path / "rm", progress=False) == tmp_path / "rm" and trained == []
    monkeypatch.setattr(rm, "MODEL", dict(rm.MODEL, num_hidden_layers=4))   # the checkpoint of another version
    rm.ensure(tmp_path / "rm", progress=False)
    assert trained == [tmp_path / "rm"]
