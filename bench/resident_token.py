"""The time of one decode token of a resident store, its own router choosing the experts: every
expert fetched into L1 first, then `--runs` greedy generations of 64 tokens after an 8-token
prompt; prints the median ms a decode token. Only APIs every tree since 2026-12-06 has, so that
two source trees can take turns in fresh processes (before/after in one sitting):

    git worktree add /tmp/oldtree COMMIT
    for i in 1 2 3 4 5; do
      PYTHONPATH=/tmp/oldtree .venv/bin/python bench/resident_token.py STORE
      PYTHONPATH=. .venv/bin/python bench/resident_token.py STORE
    done

(bench decode's resident systems replay a recorded routing instead of running the router, and
compare_trees runs those.) With --fused-ab, one process alternates the fused decode calls
(compute/decode_layer.py) on and off generation by generation, ABBA, and prints both medians:
paired under the same load, which drifts on a shared machine more than the difference.

    .venv/bin/python bench/resident_token.py STORE --runs 20 --fused-ab"""
from __future__ import annotations

import argparse
import statistics

import torch

from moestream.bench.decode import load_every_expert
from moestream.compute.loader import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--fused-ab", action="store_true", help="alternate the fused decode calls on and off")
    a = p.parse_args()
    model = load_model(a.store, host_budget=0, device_budget="8GiB")
    try:
        load_every_expert(model.store)
        ids = torch.arange(3, 11).reshape(1, 8)
        model.generate(ids, 16)                 # compile and warm
        if not a.fused_ab:
            ms = [token_ms(model, ids) for _ in range(a.runs)]
            print(f"{statistics.median(ms):.3f} ms a decode token (median of {a.runs}; {min(ms):.3f}-{max(ms):.3f})")
            return
        from moestream.compute.models.common import CausalLM, DecoderLayer
        fused = DecoderLayer.attention_half, CausalLM._fused_head
        ms = {"fused": [], "modules": []}
        try:
            for r in range(a.runs):
                for mode in ("fused", "modules") if r % 2 == 0 else ("modules", "fused"):
                    on = mode == "fused"
                    DecoderLayer.attention_half = fused[0] if on else (lambda *args: None)
                    CausalLM._fused_head = fused[1] if on else (lambda *args: None)
                    ms[mode].append(token_ms(model, ids))
        finally:
            DecoderLayer.attention_half, CausalLM._fused_head = fused
        for mode, v in ms.items():
            print(f"{mode:8s} {statistics.median(v):.3f} ms a decode token (median of {a.runs}; {min(v):.3f}-{max(v):.3f})")
        wins = sum(f < m for f, m in zip(ms["fused"], ms["modules"]))
        print(f"modules / fused: {statistics.median(ms['modules']) / statistics.median(ms['fused']):.3f} "
              f"(fused faster in {wins} of {a.runs} pairs)")
    finally:
        model.store.close()


def token_ms(model, ids: torch.Tensor) -> float:
    """ms a decode token of a 64-token greedy generate after `ids`."""
    t: dict = {}
    model.generate(ids, 65, timings=t)
    return t["decode_seconds"] / t["decode_tokens"] * 1e3


if __name__ == "__main__":
    main()
