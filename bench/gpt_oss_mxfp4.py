"""GPT-OSS as published (MXFP4 experts) kept as MXFP4 against the same experts decoded to bf16:
store bytes, cache bytes per expert and decode tokens/s through the transformers engine (the
family has no native forward), every expert resident, rounds alternating in one process.

    .venv/bin/python bench/gpt_oss_mxfp4.py /tmp/gpt-oss-mxfp4 --rounds 3

Builds (once, in WORKDIR) a random GPT-OSS checkpoint of the given sizes, its MXFP4 copy made as
the published one is (formats/quantized.py's _mxfp4_payload: per 32 weights the smallest power
of two bringing the largest to 6, each weight the nearest e2m1 value), and two stores of that copy:
`--quant keep` (mxfp4) and `--quant bf16` (its exact decoded values). The page cache is warm
(the experts are read once, then resident): this measures compute, not the disk."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def mxfp4_copy(src: Path, out: Path) -> None:
    """`src` (a GPT-OSS checkpoint) with its expert matrices as *_blocks / *_scales and the mxfp4
    quantization_config, as openai/gpt-oss-* ship."""
    from safetensors.torch import load_file, save_file
    from moestream.formats.quantized import quantize_matrix
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in load_file(src / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = t
            continue
        blocks, scales = [], []
        for w in t:                               # [in, out] per expert; the blocks run along `in`
            q = quantize_matrix(w.t().contiguous(), "mxfp4", 32)
            rows, cols = q.shape
            blocks.append(q.codes.reshape(rows, cols // 32, 16).clone())
            scales.append(q.scales.reshape(rows, cols // 32).clone())
        state[name + "_blocks"], state[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).exists():
            (out / f).write_bytes((src / f).read_bytes())


def decode_rate(store: Path, tokens: int) -> tuple[float, dict]:
    """tokens/s of greedy decode of `tokens` tokens after a 16-token prompt, every expert resident
    (the cache filled by a first pass), and the store's stats."""
    import moestream
    model = moestream.from_pretrained(store, device_budget="4GiB", host_budget=0, dtype=torch.bfloat16)
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        kw = dict(do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)     # fills the cache
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            dt = time.perf_counter() - t0
        return tokens / dt, model.moestream_store.stats()
    finally:
        model.moestream_store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    import moestream
    from moestream.demo import build_checkpoint
    from moestream.formats import StoreReader
    src, q = a.workdir / "src", a.workdir / "mxfp4"
    if not (q / "config.json").exists():
        build_checkpoint("gpt_oss", src, seed=1, dtype="bfloat16", hidden_size=a.hidden, moe_intermediate_size=a.intermediate,
                         num_local_experts=a.experts, num_experts_per_tok=a.top_k, num_hidden_layers=a.layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=4096)
        mxfp4_copy(src, q)
    stores = {}
    for quant in ("keep", "bf16"):
        out = a.workdir / f"{quant}.moe"
        if not out.exists():
            moestream.convert(q, out, quant=quant, progress=False)
        with StoreReader(out) as r:
            experts = sum(x.padded_length for x in r.index.extents.values())
            stores[quant] = (out, r.index.quant, experts)
    rates: dict[str, list[float]] = {k: [] for k in stores}
    stats = {}
    for _ in range(a.rounds):
        for k, (path, _, _) in stores.items():
            rate, stats[k] = decode_rate(path, a.tokens)
            rates[k].append(rate)
    import os
    print(f"GPT-OSS random, hidden {a.hidden}, expert width {a.intermediate}, {a.experts} experts top-{a.top_k}, "
          f"{a.layers} layers; {os.cpu_count()} CPUs; {a.rounds} alternating rounds of {a.tokens} tokens")
    for k, (path, quant, experts) in stores.items():
        s = stats[k]
        print(f"  {k:5s} ({quant}): experts {experts / 2**20:.1f} MiB on disk, cache {s['l1_bytes'] / 2**20:.1f} MiB "
              f"for {s['misses']} experts; decode {', '.join(f'{r:.1f}' for r in rates[k])} tok/s")
    ratio = [m / b for m, b in zip(rates["keep"], rates["bf16"])]
    print(f"  mxfp4 / bf16 decode: {', '.join(f'{x:.2f}' for x in ratio)} (per round)")


if __name__ == "__main__":
    main()
