"""`moestream bench decode` end to end on a tiny model of the same layout: every system runs in
its child process (in a memory cgroup where this machine allows), with the same forced routing."""
import json

import pytest

from moestream.bench.decode import (BOUNDS, CUDA_SYSTEMS, QUANT_BOUNDS, QUANT_SYSTEMS, REPETITIONS, SYSTEMS, bench_decode, coverage,
                                    format_table, plot, synthetic_trace, system_spec, warm_up_systems)

TINY = dict(hidden=64, inter=32, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=16, vocab=128)


def test_trace_is_skewed_and_valid():
    t = synthetic_trace(300, 3, experts=16, top_k=4, seed=3)
    assert t.shape == (300, 3, 4) and t.min() >= 0 and t.max() < 16
    assert all(len(set(row)) == 4 for row in t.reshape(-1, 4).tolist())      # top-k distinct experts
    cov = coverage(t)
    assert cov["top_20%"] > 0.35                                              # uniform routing would give 0.2


def test_bench_decode_runs_every_system(tmp_path):
    # every system but llama.cpp's, which would be built from source here (bench/llama_cpp.py)
    d = bench_decode(workdir=str(tmp_path), budgets=[0.5], tokens=4, layers=2, shape=TINY, prompt=4, repeat=1,
                     systems=SYSTEMS + QUANT_SYSTEMS + BOUNDS + QUANT_BOUNDS, log=lambda m: None)
    rows = {r["system"]: r for r in d["results"] if "error" not in r}
    assert set(SYSTEMS + BOUNDS + QUANT_SYSTEMS + QUANT_BOUNDS) <= set(rows), [r for r in d["results"] if "error" in r]
    for s in QUANT_SYSTEMS + QUANT_BOUNDS:   # the int stores of the same checkpoint, the same routing
        # the resident ones timed as llama-bench times: after a warm-up token, REPETITIONS generations
        reps = REPETITIONS if s.startswith("resident") else 1
        assert rows[s]["store_quant"] in ("int8", "int4") and rows[s]["requests"] == reps * 3 * 2 * 4
        assert rows[s]["repetitions"] == reps and rows[s]["tokens"] == reps * 3
    for s in QUANT_BOUNDS:                   # warmed: every expert in L1 before the first token
        assert rows[s]["hits_l1"] == rows[s]["requests"] and rows[s]["bytes_read"] == 0
    assert d["int4_l1_experts_vs_bf16"] > 1
    assert d["warm_up"]["systems"] == ["resident", "resident-int4", "resident-int8", "resident-int4-dense-int4"]
    # the dense layers as each system asked: int8 by default, int4 for the all-4-bit bound
    assert rows["resident-int4"]["dense_quant"] == "int8" and rows["resident-int4-dense-int4"]["dense_quant"] == "int4"
    # 4 tokens a system on a shared machine: a ratio whose rounds look noisy is withheld, with the reason
    assert (d["int4_resident_vs_bf16_resident"] or 0) > 0 or "int4_resident_vs_bf16_resident" in d["ratios_withheld"]
    assert d["int4_vs_llama_cpp_q4_0_limited"] is None   # llama.cpp did not run
    streamed = [rows[s] for s in ("naive", "lru", "best-no-prefetch", "best", "resident")]
    for r in streamed:   # forced routing: every system asked for the same experts
        reps = r["repetitions"]
        assert reps == (REPETITIONS if r["system"] == "resident" else 1)
        assert r["tokens"] == reps * 3 and r["requests"] == reps * 3 * 2 * 4 and r["tokens_per_s"] > 0
    assert rows["resident"]["hits_l1"] == rows["resident"]["requests"] and rows["resident"]["bytes_read"] == 0
    assert rows["naive"]["hits_l1"] <= rows["lru"]["hits_l1"]
    assert rows["naive"]["bytes_read"] == rows["naive"]["misses"] * d["model"]["extent_bytes"]
    assert rows["best"]["prefetch_issued"] > 0 and rows["best-int4"]["prefetch_issued"] > 0
    assert rows["best-no-prefetch-int4"]["prefetch_issued"] == 0
    # accelerate streams from its own offload folder: half the expert bytes is one layer's,
    # kept free for the layer loaded at each forward, so both layers' experts stay on disk
    acc = rows["accelerate"]
    assert acc["experts_on_disk"] == 2 and acc["disk_bytes_read"] is not None, acc
    assert (tmp_path / "moestream-bench-decode" / "qwen3moe-2L-h64-e16.accelerate-offload" / "index.json").exists()
    for key in ("best_vs_naive", "best_vs_accelerate", "best_vs_io_ceiling", "inmemory_vs_io_ceiling", "resident_vs_inmemory",
                "store_fetch_vs_raw"):
        # on a model this small a limited system can run as fast as the in-memory bound, and a
        # noisy machine then makes it faster: the ratio is withheld, and says so
        assert (d[key] is not None and d[key] > 0) or key in d["ratios_withheld"], key
    # B is sampled before and after the systems; the faster sample is every ceiling's B
    samples = d["bandwidth_samples_gbps"]["raw_uring_cold"]
    assert len(samples) == 2 and d["raw_uring_cold_gbps"] == max(samples)
    for r in streamed[:4]:
        assert r["io_ceiling_tokens_per_s"] == pytest.approx(r["tokens"] * d["raw_uring_cold_gbps"] * 1e9 / r["bytes_read"])
    assert d["ceiling_exceeded_by"] == sorted({r["system"] for r in d["results"] if r.get("vs_io_ceiling", 0) > 1})
    json.dumps(d)
    table = format_table(d)
    for system in SYSTEMS + BOUNDS:
        assert f"| {system} |" in table
    assert ("WARNING" in table) == bool(d["ceiling_exceeded_by"] or d["warnings"] or d["ratios_withheld"])
    assert "machine load: loadavg" in table and 0 <= d["machine_load"].get("steal_share", 0) <= 1
    assert "WARNING: naive ran above the I/O ceiling" in format_table(dict(d, ceiling_exceeded_by=["naive"]))
    plot(d, str(tmp_path / "decode.png"))
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accelerate_device_map_keeps_room_for_the_streamed_layer():
    import torch
    import transformers
    from accelerate import init_empty_weights
    from moestream.bench.decode import accelerate_device_map, qwen3_moe_config
    config = transformers.Qwen3MoeConfig(**{k: v for k, v in qwen3_moe_config(3, TINY).items()
                                            if k not in ("model_type", "architectures")})
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].mlp.experts.parameters())
    for budget, on_cpu in ((layer - 1, 0), (2 * layer, 1), (3 * layer, 2), (4 * layer, 3)):
        m = accelerate_device_map(model, budget)
        assert [m[f"model.layers.{l}.mlp.experts"] for l in range(3)].count("cpu") == on_cpu, (budget, m)
        assert m["model.embed_tokens"] == m["lm_head"] == m["model.layers.2.self_attn"] == "cpu"
        assert not any(k.startswith("model.layers.0.mlp.experts.") for k in m)   # one unit per experts module
    names = {n for n, _ in model.named_parameters()}   # every weight is placed exactly once
    assert all(sum(n == k or n.startswith(k + ".") for k in m) == 1 for n in names)
    on_gpu = accelerate_device_map(model, 2 * layer, 0)  # CUDA: accelerate names the device by its index
    assert set(on_gpu.values()) == {0, "disk"} and on_gpu["lm_head"] == 0
    assert [on_gpu[f"model.layers.{l}.mlp.experts"] for l in range(3)].count(0) == 1


def test_cuda_systems_pick_their_io_path():
    base = dict(shape=TINY, extent_bytes=4096, device="cuda")
    specs = {s: system_spec(base, s, 1 << 20) for s in SYSTEMS + CUDA_SYSTEMS}
    assert specs["best-kvikio"]["io"] == "kvikio" and specs["best-kvikio"]["verify"] is False
    assert specs["best-uring-unverified"]["io"] == "uring" and specs["best-uring-unverified"]["verify"] is False
    for s in CUDA_SYSTEMS:     # the same policy and simulated predictor as best: only the path differs
        assert specs[s]["policy"] == specs["best"]["policy"]
        assert specs[s]["prefetch_accuracy"] == specs["best"]["prefetch_accuracy"]
    for s in SYSTEMS:          # never "auto", which takes kvikio where it is installed
        assert specs[s]["io"] == "uring" and specs[s].get("verify", True) is True, s
    assert "io" not in system_spec(dict(base, device="cpu"), "best", 1 << 20)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error where there is no CUDA")
def test_cli_device_errors(capsys):
    from moestream.cli import main
    assert main(["bench", "decode", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert main(["bench", "decode", "--device", "tpu"]) == 2
    assert "--device tpu" in capsys.readouterr().err
    assert main(["bench", "decode", "--system", "best-kvikio", "--workdir", "/nonexistent"]) == 2
    assert "--system best-kvikio: not a system on cpu" in capsys.readouterr().err
    assert main(["bench", "decode", "--allowance", "lots"]) == 2
    assert "--allowance: cannot parse 'lots'" in capsys.readouterr().err


def test_cli_rejects_bad_budgets(capsys):
    from moestream.cli import main
    assert main(["bench", "decode", "--budget", "1.5"]) == 2
    assert "--budget 1.5" in capsys.readouterr().err


def test_noise_is_said_loudly_and_its_ratios_withheld():
    """Issue 26 item 1: a system whose rounds spread beyond SPREAD_LIMIT, or one under a limit that
    beats its store's all-in-memory bound, is named in the warnings and flagged (so the ratios that
    use it are withheld)."""
    from moestream.bench.decode import SPREAD_LIMIT, noise_warnings

    def r(system, frac, *xs):
        return {"system": system, "budget_fraction": frac, "tokens_per_s": sorted(xs)[len(xs) // 2],
                "samples_tokens_per_s": list(xs)}
    results = [r("inmemory", None, 5.0, 53.5), r("resident", None, 40.0, 41.0), r("best", 0.25, 24.8, 24.0),
               r("naive", 0.25, 4.0, 4.2), r("resident-int4", None, 60.0, 62.0), r("best-no-prefetch-int4", 0.25, 58, 59)]
    warnings, flagged = noise_warnings(results)
    assert ("inmemory", None) in flagged and any("inmemory" in w and f"{SPREAD_LIMIT}x" in w for w in warnings)
    assert ("naive", 0.25) not in flagged and ("best-no-prefetch-int4", 0.25) not in flagged
    results[2] = r("best", 0.25, 60.0, 61.0)          # above max(inmemory, resident) = 41 x 1.10
    warnings, flagged = noise_warnings(results)
    assert ("best", 0.25) in flagged and any("above its all-in-memory bound" in w for w in warnings)


def test_each_kind_of_store_is_warmed_once_before_the_timed_rounds():
    """A kernel's first call after a source change compiles it inside whichever system runs first:
    one uncounted resident run per kind of store our systems use, none for the peers."""
    assert warm_up_systems(["naive", "best", "resident", "llama.cpp-q4_0", "accelerate"]) == ["resident"]
    assert warm_up_systems(["best-no-prefetch-int4", "resident-int8", "best-int4", "resident-int4-dense-int4"]) == [
        "resident-int4", "resident-int8", "resident-int4-dense-int4"]
    assert warm_up_systems(["llama.cpp-bf16", "accelerate"]) == []
