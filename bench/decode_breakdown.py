"""Where a decode token of a resident store goes: the time inside each kernel call and each block
of the native forward, and with --stub-kernels, what a token costs with every Numba kernel of the
dense and MoE matmuls replaced by a no-op (the Python and torch work around the kernels, which no
faster kernel removes).

The blocks are timed by wrappers around their methods and the kernels' entry points, not by
forward hooks: a hook makes a layer run its modules one by one (DecoderLayer.attention_half
leaves a hooked layer to them), which is not what a token runs. `--modules` times that module
path instead (the fused attention and head calls off), for comparison. Each line is per decode token: the
time spent in it, the prefill taken out (a 1-token generate's share subtracted).

Every expert is fetched into L1 first (a budget that holds them all); then `--runs` generations of
64 tokens after an 8-token prompt, as `bench decode` decodes. The wrappers cost ~1 us a call.

    .venv/bin/python bench/decode_breakdown.py STORE [--runs 10] [--dense-quant auto|int8|int4|none] [--modules]
    .venv/bin/python bench/decode_breakdown.py STORE --stub-kernels"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np
import torch

from moestream.bench.decode import load_every_expert
from moestream.compute import decode_layer, decode_moe, decode_ops, quant_kernels
from moestream.compute.loader import load_model
from moestream.compute.models import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--dense-quant", default="auto")
    p.add_argument("--stub-kernels", action="store_true", help="replace the layer and dense kernels by no-ops")
    p.add_argument("--modules", action="store_true", help="run the modules (the fused attention and head calls off)")
    a = p.parse_args()
    spent: collections.Counter = collections.Counter()

    def timed(owner, attr: str, key) -> None:
        inner = getattr(owner, attr)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                spent[key(args) if callable(key) else key] += time.perf_counter() - t0
        setattr(owner, attr, wrapper)
    if a.stub_kernels:
        quant_kernels._moe_layer = lambda *args: None
        decode_moe._moe_decode = lambda x_addr, x_bf16, hidden, *args: np.zeros((1, hidden), np.float32)
        decode_moe.LeasedLayer.output = lambda *args: None      # the general path's Python, kernels stubbed

        def linear(x, kind, c, s, m, rows, group, out, pf):
            out.fill(0.01)           # finite: the routers' softmax and top-k see numbers
        quant_kernels._linear = linear
        # the fused call runs _linear inside Numba, where no stub reaches
        common.DecoderLayer.attention_half = lambda *args: None
        common.CausalLM._fused_head = lambda *args: None
    elif a.modules:
        common.DecoderLayer.attention_half = lambda *args: None
        common.CausalLM._fused_head = lambda *args: None
    if not a.stub_kernels:
        # the bench model's matrices by [rows, cols] (others by their shape only)
        names = {(5120, 2048): "q/k/v ", (2048, 4096): "o ", (4096, 2048): "lm_head ", (128, 2048): "router "}

        def linear_key(args) -> str:
            shape = (args[5], args[0].shape[1])
            return f"kernel: linear {names.get(shape, '')}{list(shape)} (quant_kernels._linear)"
        timed(quant_kernels, "_moe_layer", "kernel: MoE layer (quant_kernels._moe_layer)")
        timed(decode_moe, "_moe_decode", "kernel: MoE layer, decode (decode_moe._moe_decode)")
        timed(decode_moe, "_moe_leased", "kernel: router top-k + MoE layer, leased (decode_moe._moe_leased)")
        timed(quant_kernels, "_linear", linear_key)
        timed(decode_ops, "_attend_one_bf16", "kernel: attention (decode_ops._attend_one_bf16)")
        timed(decode_ops, "_rms_norm_bf16", "kernel: RMSNorm (decode_ops._rms_norm_bf16)")
        timed(decode_layer, "_attention_block", "kernel: attention half, fused (decode_layer._attention_block)")
        timed(decode_layer, "_head", "kernel: final norm + lm_head, fused (decode_layer._head)")
    for owner, attr, key in ((common.CausalLM, "forward", "CausalLM.forward (a token)"),
                             (common.DecoderLayer, "forward", "DecoderLayer.forward"),
                             (common.DecoderLayer, "attention_half", "DecoderLayer.attention_half (fused call)"),
                             (common.CausalLM, "_fused_head", "CausalLM._fused_head (fused call)"),
                             (common.Attention, "forward", "Attention.forward (modules)"),
                             (common.RMSNorm, "forward", "RMSNorm.forward (modules)"),
                             (common.StreamingMoE, "forward", "StreamingMoE.forward"),
                             (common.StreamingMoE, "route", "StreamingMoE.route"),
                             (common, "held_decode_output", "held_decode_output (decode, all in L1)"),
                             (decode_moe.LeasedLayer, "output", "LeasedLayer.output (decode, a resident store)")):
        timed(owner, attr, key)
    model = load_model(a.store, host_budget=0, device_budget="8GiB",
                       dense_quant=None if a.dense_quant == "none" else a.dense_quant)
    load_every_expert(model.store)
    ids = torch.arange(3, 11).reshape(1, 8)
    model.generate(ids, 16)                 # compile and warm
    rows, per_token = [], []
    for _ in range(a.runs):
        spent.clear()
        model.generate(ids, 1)              # the prefill alone: its share is taken out below
        prefill = dict(spent)
        spent.clear()
        t: dict = {}
        model.generate(ids, 65, timings=t)
        n = t["decode_tokens"] - 1          # the first token comes from the prefill
        rows.append({k: (v - prefill.get(k, 0.0)) / n for k, v in spent.items()})
        per_token.append(t["decode_seconds"] / t["decode_tokens"])
    mode = "kernels stubbed" if a.stub_kernels else "modules" if a.modules else "fused calls"
    print(f"{a.store}: {statistics.median(per_token) * 1e3:.2f} ms a decode token (median of {a.runs} runs; {mode})")
    keys = sorted({k for r in rows for k in r}, key=lambda k: -statistics.median(r.get(k, 0.0) for r in rows))
    for key in keys:
        ms = statistics.median(r.get(key, 0.0) for r in rows) * 1e3
        if ms >= 0.0005:
            print(f"{ms:8.3f} ms  {key}")
    model.store.close()


if __name__ == "__main__":
    main()
