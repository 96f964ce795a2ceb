"""Decode stall seconds with and without next-layer prefetch, in one sitting, on the trained
routing model (moestream.bench.routing_model) reading held-out text (teacher-forced decode, so
every run sees the same tokens). Guesses come from the next layer's router, or from next-layer
probes fitted on the training text (compute/predictor.py), and name the top-k experts and
--extra-guesses more per token and layer (the first layer's guessed from the token's embedding).
Runs alternate; medians of --repeat.

    .venv/bin/python bench/predictor_prefetch.py [--budget 25%] [--tokens 300] [--repeat 3] [--extra-guesses 0,1]"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import moestream
from moestream.bench import routing_model
from moestream.bench.traces import fit_text_probes, held_out_texts
from moestream.compute import load_model
from moestream.compute.generation import load_tokenizer
from moestream.compute.models.common import KVCache


def run(store: Path, ids: list[int], budget: int, prefetch: bool, threshold: float, predictor=None,
        extra: int = 0) -> dict:
    model = load_model(store, device_budget=budget, host_budget=0, prefetch=prefetch, prefetch_threshold=threshold,
                       predictor=predictor, extra_guesses=extra)
    try:
        cache = KVCache(model.cfg.num_layers, 1, model.cfg.num_kv_heads, len(ids), model.cfg.head_dim,
                        model.embed_tokens.weight.dtype, "cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            for pos, i in enumerate(ids):
                model(torch.tensor([[i]]), cache, pos)
        dt = time.perf_counter() - t0
        st = model.store.stats()
        return {"tok_s": len(ids) / dt, "stall_s": st["stall_seconds"], "hits": st["hits_l1"], "reads": st["misses"],
                "prefetched": st["prefetch_issued"], "prefetch_used": st["prefetch_used"],
                "wasted_MB": st["prefetch_wasted_bytes"] / 1e6, "cancelled": st["prefetch_cancelled"]}
    finally:
        model.store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="25%", help="device budget, share of all experts' decoded bytes")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--thresholds", default="0", help="prefetch confidence thresholds to compare (default 0: all)")
    p.add_argument("--extra-guesses", default="0,1", help="experts guessed beyond the top-k, to compare")
    a = p.parse_args()
    store, total = routing_model.ensure_store()
    with moestream.open(store, device_budget="64MiB") as s:
        ids = load_tokenizer(s).encode(held_out_texts(1)[0]).ids[:a.tokens]
    budget = int(total * float(a.budget.rstrip("%")) / 100)
    probes = fit_text_probes(store)
    systems = [("no prefetch", False, 0.0, None, 0)]
    for guesser, pred in (("router", None), ("probes", probes)):
        systems += [(f"prefetch ({guesser}), top-k + {x} guesses, confidence >= {t}", True, float(t), pred, int(x))
                    for x in a.extra_guesses.split(",") for t in a.thresholds.split(",")]
    runs: dict = {name: [] for name, *_ in systems}
    for _ in range(a.repeat):
        for name, pf, thr, pred, extra in systems:
            runs[name].append(run(store, ids, budget, pf, thr, pred, extra))
    print(f"trained routing model, {len(ids)} held-out tokens teacher-forced, device budget {a.budget} of "
          f"{total / 2**20:.1f} MiB experts, CPU, page cache warm; medians of {a.repeat} alternating runs")
    keys = list(runs[systems[0][0]][0])
    print("| system | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, rs in runs.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[k] for r in rs):.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
