"""The transformers engine's two ways of computing a layer's routed experts, in one process,
taking turns: plain SwiGLU experts through moestream's layer kernel (one call a layer, what
`from_pretrained` binds for them: integrations/transformers.py, plain_swiglu) against the
per-expert path (three kernel calls and the module's own gating per expert, what every other
experts module takes).

    .venv/bin/python bench/transformers_engine_decode.py STORE [--dtype bfloat16] [--rounds 4] [--tokens 33]

STORE is any store of a family whose experts are a plain SwiGLU (e.g. the 2-layer store
`moestream bench decode --quick` builds: WORKDIR/moestream-bench-decode/qwen3moe-2L-int4.moe).
Every expert is loaded first (resident), then `model.generate` decodes greedily; tokens/s per
round, the median of each path printed."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import moestream
from moestream.bench.decode import load_every_expert


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--dtype", default="bfloat16", help="the model's compute dtype (the CPU default is float32)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=33)
    a = p.parse_args()
    model = moestream.from_pretrained(a.store, device_budget="90%", host_budget=0, dtype=getattr(torch, a.dtype))
    store = model.moestream_store
    try:
        load_every_expert(store)
        moes = [m for m in model.modules() if getattr(m, "_moestream", None)]
        bound = [m._moestream for m in moes]
        if not any(b[4] for b in bound):
            raise SystemExit(f"{a.store}: its experts are not a plain SwiGLU: both paths would be the per-expert one")
        ids = torch.arange(3, 11).reshape(1, 8)
        kw = dict(max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, pad_token_id=0)

        def run(one_call: bool) -> float:
            for m, b in zip(moes, bound):
                m._moestream = b[:4] + (one_call and b[4],)
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            return a.tokens / (time.perf_counter() - t0)
        run(True), run(False)                                        # compile, warm
        got: dict[bool, list[float]] = {True: [], False: []}
        for r in range(a.rounds):
            for one_call in ((True, False) if r % 2 == 0 else (False, True)):
                got[one_call].append(run(one_call))
        print(f"{a.store} ({a.dtype}, {a.tokens} tokens, {a.rounds} alternating rounds, every expert resident)")
        for one_call, name in ((True, "one layer-kernel call a layer"), (False, "per expert")):
            v = sorted(got[one_call])
            print(f"  {name:30s} median {statistics.median(v):6.1f} tok/s of {', '.join(f'{x:.1f}' for x in v)}")
        print(f"  ratio {statistics.median(got[True]) / statistics.median(got[False]):.2f}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
