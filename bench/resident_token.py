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

    .venv/bin/python bench/resident_token.py STORE --runs 20 --fused-ab

--moe-ab does the same for a decode token's routed experts: on, the one native call of
compute/decode_moe.py (every routed expert in L1) and the router's top-k in one call
(decode_ops.softmax_topk); off, the general path (stream_experts) and torch's softmax and top-k
(and no lease). --lease-ab: on, generate leases the resident store's experts and each layer's
router and experts are one call with no store call (decode_moe.LeasedLayer); off, the per-step
one call above (Store.hold_routed and the router's own call).

--server-ab: one process alternates generate with the server's decode of one request
(serving.BatchScheduler, one stream of 64 tokens after the same prompt, greedy; its steps'
decode seconds): what a single-stream client of `moestream serve` gets against generate.

    .venv/bin/python bench/resident_token.py STORE --runs 12 --server-ab

--first-steps N times, right after load_model and an 8-token prefill, the first N decode steps
one by one (ms each): what loading the kernels' machine code costs the first token where
load_model does not warm them (two trees taking turns, as above)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moestream.bench.decode import load_every_expert
from moestream.compute.loader import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--fused-ab", action="store_true", help="alternate the fused decode calls on and off")
    p.add_argument("--moe-ab", action="store_true", help="alternate the one-call decode MoE on and off")
    p.add_argument("--lease-ab", action="store_true", help="alternate generate's lease of the experts on and off")
    p.add_argument("--server-ab", action="store_true", help="alternate generate and the server's one-stream decode")
    p.add_argument("--first-steps", type=int, default=0, help="time the first N decode steps after load instead")
    a = p.parse_args()
    model = load_model(a.store, host_budget=0, device_budget="8GiB")
    try:
        load_every_expert(model.store)
        ids = torch.arange(3, 11).reshape(1, 8)
        if a.first_steps:
            print(first_steps(model, ids, a.first_steps))
            return
        model.generate(ids, 16)                 # compile and warm
        if a.server_ab:
            print(server_ab(model, ids, a.runs))
            return
        if not (a.fused_ab or a.moe_ab or a.lease_ab):
            ms = [token_ms(model, ids) for _ in range(a.runs)]
            print(f"{statistics.median(ms):.3f} ms a decode token (median of {a.runs}; {min(ms):.3f}-{max(ms):.3f})")
            return
        from moestream.compute import decode_ops
        from moestream.compute.models import common
        # (owner, attribute) switched off by a stand-in that declines, as each does where it does not apply
        switched = ([(common.DecoderLayer, "attention_half"), (common.CausalLM, "_fused_head")] if a.fused_ab else
                    [(common.CausalLM, "lease_experts")] if a.lease_ab else
                    [(common, "held_decode_output"), (decode_ops, "softmax_topk"), (common.CausalLM, "lease_experts")])
        on_name, off_name = ("fused", "modules") if a.fused_ab else ("leased", "per step") if a.lease_ab else \
            ("one call", "general")
        real = [getattr(owner, attr) for owner, attr in switched]
        ms = {on_name: [], off_name: []}
        try:
            for r in range(a.runs):
                for mode in (on_name, off_name) if r % 2 == 0 else (off_name, on_name):
                    for (owner, attr), f in zip(switched, real):
                        setattr(owner, attr, f if mode == on_name else (lambda *args, **kw: None))
                    ms[mode].append(token_ms(model, ids))
        finally:
            for (owner, attr), f in zip(switched, real):
                setattr(owner, attr, f)
        for mode, v in ms.items():
            print(f"{mode:8s} {statistics.median(v):.3f} ms a decode token (median of {a.runs}; {min(v):.3f}-{max(v):.3f})")
        wins = sum(f < m for f, m in zip(ms[on_name], ms[off_name]))
        print(f"{off_name} / {on_name}: {statistics.median(ms[off_name]) / statistics.median(ms[on_name]):.3f} "
              f"({on_name} faster in {wins} of {a.runs} pairs)")
    finally:
        model.store.close()


def first_steps(model, ids: torch.Tensor, n: int) -> str:
    """The prefill of `ids` and then n single-token decode steps, each timed, in a fresh model."""
    cache = model.new_cache(ids.shape[1] + n)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, cache, 0)
        prefill, steps = time.perf_counter() - t0, []
        for pos in range(ids.shape[1], ids.shape[1] + n):
            t0 = time.perf_counter()
            model(ids[:, :1], cache, pos)
            steps.append(time.perf_counter() - t0)
    return f"prefill {prefill * 1e3:.1f} ms; decode steps " + " ".join(f"{s * 1e3:.1f}" for s in steps)


def server_ab(model, ids: torch.Tensor, runs: int) -> str:
    """generate's ms a decode token against the server scheduler's, one stream, taking turns (ABBA)."""
    import threading

    from moestream.serving.scheduler import BatchScheduler, GenerationRequest

    class Tokens:              # the text is not what is timed: a stand-in for the tokenizer
        def decode(self, ids):
            return " ".join(map(str, ids))
    ms: dict[str, list[float]] = {"generate": [], "server": []}
    sched = BatchScheduler(model, Tokens(), max_batch=8)
    try:
        for r in range(runs):
            for mode in ("generate", "server") if r % 2 == 0 else ("server", "generate"):
                if mode == "generate":
                    ms[mode].append(token_ms(model, ids))
                    continue
                done, ended = threading.Event(), []

                def emit(kind, value):
                    if kind != "delta":
                        ended.append((kind, value))
                        done.set()
                sched.decode_seconds, sched.steps = 0.0, 0
                sched.submit(GenerationRequest(ids[0].tolist(), 65, emit))
                done.wait()
                if ended[0][0] == "error":
                    raise RuntimeError(f"the scheduler's request failed: {ended[0][1]}")
                ms[mode].append(sched.decode_seconds / sched.steps * 1e3)
    finally:
        sched.close()
    lines = [f"{mode:8s} {statistics.median(v):.3f} ms a decode token (median of {runs}; {min(v):.3f}-{max(v):.3f})"
             for mode, v in ms.items()]
    wins = sum(g < s for g, s in zip(ms["generate"], ms["server"]))
    lines.append(f"server / generate: {statistics.median(ms['server']) / statistics.median(ms['generate']):.3f} "
                 f"(generate faster in {wins} of {runs} pairs)")
    return "\n".join(lines)


def token_ms(model, ids: torch.Tensor) -> float:
    """ms a decode token of a 64-token greedy generate after `ids`."""
    t: dict = {}
    model.generate(ids, 65, timings=t)
    return t["decode_seconds"] / t["decode_tokens"] * 1e3


if __name__ == "__main__":
    main()
