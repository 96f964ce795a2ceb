"""The cache simulator drives the Store's own policy objects: a trace replayed through a real
Store and through the simulator gives the same hits; Belady bounds every policy; the CLI."""
import json
import subprocess
import sys
import time

import pytest

import moestream
from moestream.bench.cache import ONLINE, belady, bench_cache, most_used, parse_capacities, simulate
from moestream.bench.traces import synthetic_trace
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


def replay_through_store(path, trace, slots, policy, pinned=()):
    """The Store asked as the forward asks it: note the routing, fetch the layer's experts, hold
    them until the layer is done. One read and one decode at a time, so puts happen in order."""
    with moestream.open(path, device_budget=slots * EXPERT_BYTES, host_budget=0, policy=policy, io="posix",
                        queue_depth=1, decode_threads=1, pinned_experts=pinned) as s:
        assert s.expert_slots == slots
        for layer, chosen, _ in trace.requests():
            s.note_routing(layer, chosen)
            futures = s.fetch(layer, chosen)
            results = [f.result() for f in futures]
            del futures, results
            # a decode thread drops its own reference to a result just after handing it over:
            # wait for that, so no slot of this layer still counts as held at the next one
            deadline = time.monotonic() + 10
            while any(s.arena.pinned(s.l1.peek(k)) for k in s.l1.keys()) and time.monotonic() < deadline:
                time.sleep(0.0005)
        return s.stats()["hits_l1"]


@pytest.mark.parametrize("policy", ["lru", "lfu", "least-stale", "next-use", "pinned+lru"])
def test_a_simulated_hit_rate_is_the_one_a_store_gets(store4, policy):
    trace = synthetic_trace(40, 4, 16, 2, skew=1.0, reuse=0.3, cross=0.2, seed=3)
    requests = list(trace.requests())
    slots = 12
    pinned = hot_experts(build_profile([trace]), 6 / 64) if policy == "pinned+lru" else ()
    simulated = simulate(requests, trace.layers, slots, policy, pinned=pinned)
    real = replay_through_store(store4, trace, slots, "lru" if policy == "pinned+lru" else policy, pinned)
    assert real == simulated
    assert 0 < simulated < sum(len(c) for _, c, _ in requests)


def test_belady_bounds_every_online_policy_and_lru_fails_the_sweep():
    trace = synthetic_trace(150, 6, 32, 4, skew=1.0, reuse=0.3, cross=0.2, seed=1)
    requests = list(trace.requests())
    for slots in (10, 48, 96):
        best = belady(requests, slots)
        for pol in ONLINE[:-1]:
            assert simulate(requests, trace.layers, slots, pol,
                            pinned=hot_experts(build_profile([trace]), slots / 2 / 192)) <= best
    # a cache smaller than one sweep's working set: LRU evicts each expert just before its reuse
    assert simulate(requests, trace.layers, 10, "lru") < simulate(requests, trace.layers, 10, "next-use")


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
        assert all(0 <= r <= rates["belady"] for r in rates.values())
        # the best *online* policy: the frequency oracle is offline, like Belady
        assert c["best_online"] not in ("frequency-oracle", "belady")
        assert c["best_vs_belady_pp"] == pytest.approx(100 * (rates["belady"] - max(
            v for k, v in rates.items() if k not in ("belady", "frequency-oracle"))))


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
    r = run("profile", str(tmp_path / "t.npz"), "-o", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p.json").read_text())["tokens"] == 50
    r = run("bench", "cache", str(tmp_path / "t.npz"), "--capacity", "10%,50%", "--json", "--plot",
            str(tmp_path / "c.png"), "--synthetic", "3x8x2", "--tokens", "30")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [row["trace"] for row in d["results"]] == [str(tmp_path / "t.npz"), "synthetic 3x8x2"]
    assert (tmp_path / "c.png").stat().st_size > 0
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
