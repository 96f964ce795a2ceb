"""Resident memory over a long streaming generate: RSS after token 200 and after the last token,
and the peak, against the device budget and the process's fixed cost (measured after the model
is loaded, before any expert is read).

    .venv/bin/python bench/rss_long_run.py --tokens 2000 --workdir /work

Builds a random Mixtral-style checkpoint (the demo's shape, 4 layers, 64 MiB of fp32 experts,
max_position_embeddings 4096) once, converts it, and generates greedily with a device budget
of a quarter of the experts. Memory from /proc/self/status (VmRSS, VmHWM)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--fraction", type=float, default=0.25, help="device budget, a fraction of the experts")
    a = p.parse_args()
    import moestream
    from moestream.demo import build_checkpoint
    from moestream.formats import StoreReader
    work = Path(a.workdir) / "moestream-rss-long-run"
    ckpt, store = work / "ckpt", work / "store"
    if not (ckpt / "config.json").exists():
        build_checkpoint("mixtral", ckpt, hidden_size=256, moe_intermediate_size=512, num_hidden_layers=4,
                         vocab_size=512, max_position_embeddings=4096)
    if not store.exists():
        moestream.convert(ckpt, store, progress=False)
    with StoreReader(store) as r:
        expert_bytes = sum(x.decoded_length for x in r.index.extents.values())
    budget = int(expert_bytes * a.fraction)
    from moestream.compute import load_model
    model = load_model(store, device_budget=budget, host_budget=0)
    fixed = status("VmRSS")
    seen: dict[str, float] = {}
    count = {"n": 0}
    t0 = time.perf_counter()

    def on_token(_):
        count["n"] += 1
        if count["n"] == 200:
            seen["rss_200"] = status("VmRSS")
            seen["t_200"] = time.perf_counter()
    timings: dict = {}
    model.generate(torch.tensor([[1, 5, 9, 13]]), a.tokens, on_token=on_token, timings=timings)
    end = time.perf_counter()
    out = {"tokens": count["n"], "expert_bytes": expert_bytes, "device_budget": budget, "fixed_rss": fixed,
           "rss_200": seen.get("rss_200"), "rss_end": status("VmRSS"), "peak_rss": status("VmHWM"),
           "decode_tokens_per_s": (count["n"] - 200) / (end - seen["t_200"]) if "t_200" in seen else None,
           "total_seconds": end - t0}
    out["rss_end_vs_200"] = out["rss_end"] / out["rss_200"] if out["rss_200"] else None
    # what the run holds beyond the fixed cost, by owner: the device tier, the KV cache, the I/O
    # slabs, the layers' delta bases (decoded once); the rest is the allocator and temporaries
    cfg = model.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * (4 + a.tokens) * cfg.head_dim * model.embed_tokens.weight.element_size()
    with StoreReader(store) as r:
        bases = sum(x.decoded_length for x in r.index.bases.values())
    held = {"device_budget": budget, "kv_cache": kv, "io_slabs": getattr(model.store, "pool").nbytes, "delta_bases": bases}
    out["held"] = held
    out["peak_over_fixed"] = out["peak_rss"] - fixed
    out["unaccounted"] = out["peak_over_fixed"] - sum(held.values())
    st = model.store.stats()
    out.update(hits_l1=st["hits_l1"], misses=st["misses"])
    model.store.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
