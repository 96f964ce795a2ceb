"""Where a decode token of a resident store goes: the time inside each module and kernel call of
the native forward (forward hooks and timed wrappers around the layer kernel and SDPA), and with
--stub-kernels, what a token costs with every Numba kernel replaced by a no-op (the Python and
torch work around the kernels, which no faster kernel removes).

Every expert is fetched into L1 first (a budget that holds them all); then `--runs` generations of
64 tokens after an 8-token prompt, as `bench decode` decodes. The hooks themselves cost a few
microseconds a call, so the parts add up to a little more than a token without them (and they
include each run's 8-token prompt).

    .venv/bin/python bench/decode_breakdown.py STORE [--runs 10] [--dense-quant auto|int8|int4|none]
    .venv/bin/python bench/decode_breakdown.py STORE --stub-kernels"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from moestream.bench.decode import load_every_expert
from moestream.compute import quant_kernels
from moestream.compute.loader import load_model
from moestream.compute.models import common

#: module classes timed as a whole (the linears by their name inside a layer)
TIMED = ("Attention", "StreamingMoE", "RMSNorm", "QuantLinear", "Linear", "Bf16DecodeLinear", "Embedding")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--dense-quant", default="auto")
    p.add_argument("--stub-kernels", action="store_true", help="replace the layer and dense kernels by no-ops")
    a = p.parse_args()
    if a.stub_kernels:
        quant_kernels._moe_layer = lambda *args: None

        def linear(x, kind, c, s, m, rows, group, out, pf):
            out.fill(0.01)           # finite: the routers' softmax and top-k see numbers
        quant_kernels._linear = linear
    model = load_model(a.store, host_budget=0, device_budget="8GiB",
                       dense_quant=None if a.dense_quant == "none" else a.dense_quant)
    load_every_expert(model.store)
    spent: collections.Counter = collections.Counter()
    started: dict[int, float] = {}
    if not a.stub_kernels:
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            if cls in TIMED or name == "lm_head":
                key = name if not name.startswith("layers.") else (
                    cls + ("." + name.rsplit(".", 1)[-1] if "Linear" in cls else ""))
                mod.register_forward_pre_hook(lambda m, args: started.__setitem__(id(m), time.perf_counter()))
                mod.register_forward_hook(lambda m, args, out, key=key: spent.update(
                    {key: time.perf_counter() - started[id(m)]}))
        for owner, attr, key in ((common.F, "scaled_dot_product_attention", "sdpa (inside Attention: prefill)"),
                                 (common.decode_ops, "attend_one", "attend_one (inside Attention: decode)"),
                                 (common, "moe_layer", "layer kernel (inside StreamingMoE)")):
            inner = getattr(owner, attr)

            def timed(*args, inner=inner, key=key, **kw):
                t0 = time.perf_counter()
                try:
                    return inner(*args, **kw)
                finally:
                    spent[key] += time.perf_counter() - t0
            setattr(owner, attr, timed)
    ids = torch.arange(3, 11).reshape(1, 8)
    model.generate(ids, 16)                 # compile and warm
    spent.clear()
    per_token = []
    for _ in range(a.runs):
        t: dict = {}
        model.generate(ids, 64, timings=t)
        per_token.append(t["decode_seconds"] / t["decode_tokens"])
    tokens = a.runs * 64
    per_token.sort()
    print(f"{a.store}: {per_token[len(per_token) // 2] * 1e3:.2f} ms a decode token (median of {a.runs} runs; "
          f"{'kernels stubbed' if a.stub_kernels else 'hooks on'})")
    for key, seconds in spent.most_common():
        print(f"{seconds / tokens * 1e3:8.3f} ms  {key}")
    model.store.close()


if __name__ == "__main__":
    main()
