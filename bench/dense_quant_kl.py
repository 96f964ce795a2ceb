"""Which dense layers can go to int4: KL against the bf16 store on the trained routing model for
int4 (or int8) experts with the dense linear layers (attention projections, lm_head; never the
routers) in each mix of int8 and int4, group 64 or 32. load_model's default holds them in int8;
this measures what an all-4-bit model (llama.cpp's Q4_0 puts attention in 4 bits too) would cost.

    .venv/bin/python bench/dense_quant_kl.py [--experts int4,int8] [--texts 8] [--tokens 256]"""
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
from moestream.compute.models.common import Attention, StreamingMoE
from moestream.compute.quant_kernels import Bf16DecodeLinear, quantize_linears

ALL = lambda n: True                                    # noqa: E731
LM_HEAD = lambda n: n == "lm_head"                      # noqa: E731
ATTENTION = lambda n: n != "lm_head"                    # noqa: E731
Q_O = lambda n: n.endswith(("q_proj", "o_proj"))        # noqa: E731
NOT_Q_O = lambda n: not n.endswith(("q_proj", "o_proj"))  # noqa: E731
#: (name, [(kind, group, which dense layers)]) applied in order
VARIANTS = [("dense bf16", []), ("dense int8 (default)", [("int8", 64, ALL)]),
            ("dense int4 g64", [("int4", 64, ALL)]), ("dense int4 g32", [("int4", 32, ALL)]),
            ("attention int4 g64, lm_head int8", [("int4", 64, ATTENTION), ("int8", 64, LM_HEAD)]),
            ("attention int4 g32, lm_head int8", [("int4", 32, ATTENTION), ("int8", 64, LM_HEAD)]),
            ("q, o int4 g64; k, v, lm_head int8", [("int4", 64, Q_O), ("int8", 64, NOT_Q_O)]),
            ("lm_head int4 g64, attention int8", [("int4", 64, LM_HEAD), ("int8", 64, ATTENTION)])]


def logits_of(store: Path, batches: list[torch.Tensor], dense) -> list[torch.Tensor]:
    model = load_model(store, device_budget="1GiB", host_budget=0, dense_quant=None)
    routers = {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, StreamingMoE)}
    for m in model.modules():     # back to plain linears, unfused, for quantize_linears to take
        if type(m) is Bf16DecodeLinear:
            m.__class__ = torch.nn.Linear
        if isinstance(m, Attention):
            m.qkv_proj = None
    for kind, group, which in dense:
        quantize_linears(model, kind, group, skip=lambda n: n in routers or not which(n))
    try:
        with torch.no_grad():
            return [model(ids)[0].float() for ids in batches]
    finally:
        model.store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="int4,int8")
    p.add_argument("--texts", type=int, default=8, help="held-out files to score on (after the first 4)")
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    ckpt = routing_model.ensure()
    store, _ = routing_model.ensure_store()
    with moestream.open(store, device_budget="64MiB") as s:
        tok = load_tokenizer(s)
    batches = [torch.tensor([tok.encode(t).ids[:a.tokens]]) for t in held_out_texts(4 + a.texts)[4:]]
    Path("build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="build") as tmp:
        ref = logits_of(moestream.convert(ckpt, Path(tmp) / "bf16", quant="bf16", progress=False), batches, [])
        print("| experts | dense layers | KL vs bf16 (nats/token) | top-1 agreement |")
        print("|---|---|---:|---:|")
        for q in a.experts.split(","):
            path = moestream.convert(ckpt, Path(tmp) / q, quant=q, progress=False)
            for name, dense in VARIANTS:
                kl = agree = n = 0.0
                for ids, lr, lg in zip(batches, ref, logits_of(path, batches, dense)):
                    kl += F.kl_div(F.log_softmax(lg, -1), F.log_softmax(lr, -1), log_target=True, reduction="sum").item()
                    agree += (lg.argmax(-1) == lr.argmax(-1)).sum().item()
                    n += ids.shape[1]
                print(f"| {q} | {name} | {kl / n:.5f} | {agree / n:.1%} |", flush=True)


if __name__ == "__main__":
    main()
