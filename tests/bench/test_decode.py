"""`moestream bench decode` end to end on a tiny model of the same layout: every system runs in
its child process (in a memory cgroup where this machine allows), with the same forced routing."""
import json

from moestream.bench.decode import (BOUNDS, SYSTEMS, bench_decode, coverage, format_table, plot,
                                    synthetic_trace)

TINY = dict(hidden=64, inter=32, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=16, vocab=128)


def test_trace_is_skewed_and_valid():
    t = synthetic_trace(300, 3, experts=16, top_k=4, seed=3)
    assert t.shape == (300, 3, 4) and t.min() >= 0 and t.max() < 16
    assert all(len(set(row)) == 4 for row in t.reshape(-1, 4).tolist())      # top-k distinct experts
    cov = coverage(t)
    assert cov["top_20%"] > 0.35                                              # uniform routing would give 0.2


def test_bench_decode_runs_every_system(tmp_path):
    d = bench_decode(workdir=str(tmp_path), budgets=[0.5], tokens=4, layers=2, shape=TINY, prompt=4, repeat=1,
                     log=lambda m: None)
    rows = {r["system"]: r for r in d["results"] if "error" not in r}
    assert set(SYSTEMS + BOUNDS) <= set(rows), [r for r in d["results"] if "error" in r]
    streamed = [rows[s] for s in ("naive", "lru", "best-no-prefetch", "best", "resident")]
    for r in streamed:   # forced routing: every system asked for the same experts
        assert r["tokens"] == 3 and r["requests"] == 3 * 2 * 4 and r["tokens_per_s"] > 0
    assert rows["resident"]["hits_l1"] == rows["resident"]["requests"] and rows["resident"]["bytes_read"] == 0
    assert rows["naive"]["hits_l1"] <= rows["lru"]["hits_l1"]
    assert rows["naive"]["bytes_read"] == rows["naive"]["misses"] * d["model"]["extent_bytes"]
    assert rows["best"]["prefetch_issued"] > 0
    # accelerate streams from its own offload folder: at half the expert bytes, one layer's
    # experts fit the budget and the other's are read from disk at every forward
    acc = rows["accelerate"]
    assert acc["experts_on_disk"] == 1 and acc["device_map"]["disk"] == 1, acc
    assert (tmp_path / "moestream-bench-decode" / "qwen3moe-2L-h64-e16.accelerate-offload" / "index.json").exists()
    for key in ("best_vs_naive", "best_vs_accelerate", "best_vs_io_ceiling", "resident_vs_inmemory",
                "store_fetch_vs_raw"):
        assert d[key] is not None and d[key] > 0, key
    json.dumps(d)
    table = format_table(d)
    for system in SYSTEMS + BOUNDS:
        assert f"| {system} |" in table
    plot(d, str(tmp_path / "decode.png"))
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_budgets(capsys):
    from moestream.cli import main
    assert main(["bench", "decode", "--budget", "1.5"]) == 2
    assert "--budget 1.5" in capsys.readouterr().err
