"""Mixed precision on the trained routing model: expert bytes, held-out loss, logit KL and top-1
agreement against the bf16 store, for uniform int4, uniform int8 and mixed (the profile's most
used `--hot-fraction` of (layer, expert) pairs at int8, the rest at int4); each int store
dequantized to bf16 on load (the path before 2026-12-01) and multiplied by the quantized kernels
with its dense layers in bf16, int8 (load_model's default) and int4.

The profile comes from the model's own routing on `--profile-texts` held-out files
(bench/heldout_traces.py writes build/profile-heldout.json from the first 4); the scores come
from `--texts` other held-out files, so the hot set is never chosen on the text it is scored on.
Every store is read by moestream's forward (prefill of each file, `--tokens` tokens).

    .venv/bin/python bench/mixed_precision.py [--profile build/profile-heldout.json] [--profile-texts 4]
        [--texts 8] [--tokens 256] [--hot-fraction 0.2]"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import moestream
from moestream.bench import routing_model
from moestream.bench.traces import held_out_texts
from moestream.compute import load_model
from moestream.compute.generation import load_tokenizer
from moestream.formats.profile import hot_experts, load_profile


def logits_of(store: Path, batches: list[torch.Tensor], **options) -> list[torch.Tensor]:
    """float32 logits [T, V] of each token batch [1, T] (one prefill each); options go to
    load_model (expert_compute, dense_quant)."""
    model = load_model(store, device_budget="1GiB", host_budget=0, **options)
    try:
        with torch.no_grad():
            return [model(ids)[0].float() for ids in batches]
    finally:
        model.store.close()


def expert_bytes(store: Path) -> int:
    with moestream.StoreReader(store) as r:
        return sum(x.length for x in r.index.extents.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="build/profile-heldout.json")
    p.add_argument("--profile-texts", type=int, default=4, help="held-out files the profile was recorded on")
    p.add_argument("--texts", type=int, default=8, help="further held-out files to score on")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hot-fraction", type=float, default=0.2)
    a = p.parse_args()
    ckpt = routing_model.ensure()
    store, _ = routing_model.ensure_store()
    profile = load_profile(a.profile)
    with moestream.open(store, device_budget="64MiB") as s:
        tok = load_tokenizer(s)
    texts = held_out_texts(a.profile_texts + a.texts)[a.profile_texts:]
    batches = [torch.tensor([tok.encode(t).ids[:a.tokens]]) for t in texts]
    with tempfile.TemporaryDirectory(dir="build") as tmp:
        stores = {}
        for name, kw in (("bf16", dict(quant="bf16")), ("int8", dict(quant="int8")), ("int4", dict(quant="int4")),
                         (f"mixed int8/int4, hot {a.hot_fraction:.0%}",
                          dict(hot_experts=hot_experts(profile, a.hot_fraction), hot_quant="int8", cold_quant="int4"))):
            stores[name] = moestream.convert(ckpt, Path(tmp) / name.split()[0], progress=False, **kw)
        ref = logits_of(stores["bf16"], batches)
        print(f"trained routing model, {len(batches)} held-out files x {a.tokens} tokens "
              f"({sum(b.shape[1] for b in batches)} tokens); hot set from {a.profile}")
        print("| experts | stored MB | held-out loss (nats/token) | KL vs bf16 (nats/token) | top-1 agreement |")
        print("|---|---:|---:|---:|---:|")
        ints = [(n, p) for n, p in stores.items() if n != "bf16"]
        rows = [("keep (fp32, lossless)", store, {}), ("bf16", stores["bf16"], {}),
                *((f"{n}, dequantized to bf16 on load (before 2026-12-01)", p, dict(expert_compute="dequantized"))
                  for n, p in ints),
                *((f"{n}, quantized kernels, dense bf16", p, dict(dense_quant=None)) for n, p in ints),
                *((f"{n}, quantized kernels, dense int8 (default)", p, dict(dense_quant="auto")) for n, p in ints),
                *((f"{n}, quantized kernels, dense int4", p, dict(dense_quant="int4")) for n, p in ints)]
        for name, path, options in rows:
            got = ref if name == "bf16" else logits_of(path, batches, **options)
            loss = kl = agree = n = 0.0
            for ids, lr, lg in zip(batches, ref, got):
                loss += F.cross_entropy(lg[:-1], ids[0, 1:], reduction="sum").item()
                kl += F.kl_div(F.log_softmax(lg, -1), F.log_softmax(lr, -1), log_target=True, reduction="sum").item()
                agree += (lg.argmax(-1) == lr.argmax(-1)).sum().item()
                n += ids.shape[1]
            tokens = sum(b.shape[1] - 1 for b in batches)
            print(f"| {name} | {expert_bytes(path) / 1e6:.2f} | {loss / tokens:.4f} | {kl / n:.5f} | {agree / n:.1%} |")


if __name__ == "__main__":
    main()
