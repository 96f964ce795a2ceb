"""A small MoE language model with real (learned) routing, trained here on the CPU.

Random-initialised models route almost uniformly, so cache policies and next-layer predictors
cannot be judged on them. This trains a Mixtral-style model (transformers' own
MixtralForCausalLM: 8 layers x 32 experts, top-2, hidden 128) for a few minutes on text that
ships with every Python: the standard library's sources. Deterministic (fixed seed, fixed file
order, 2 threads); the checkpoint is saved in the Hugging Face layout with its tokenizer and a
`training.json` report (held-out loss against a unigram baseline, routing coverage), and reused
when it exists.

    python -m moestream.bench.routing_model [OUT] [--steps N]      # or: make routing-model

transformers is needed (the `test` extra)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

#: Where `make routing-model` and the benchmarks keep the checkpoint.
DEFAULT_DIR = Path("build/routing-model")
#: The model's shape: small enough to train in minutes on 2 cores, with enough experts per layer
#: that 5 % of them is more than one.
MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=32, num_experts_per_tok=2, max_position_embeddings=512,
             rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             output_router_logits=True, router_aux_loss_coef=0.01)
TRAIN = dict(steps=800, batch=16, seq=128, lr=3e-3, warmup=30, seed=0, corpus_bytes=6_000_000, held_out_files=0.05)


def corpus_files() -> list[Path]:
    """The standard library's .py sources in a fixed order (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def corpus_text(limit: int, held_out: float) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): whole files, every 1/held_out-th file held out, up
    to `limit` bytes in all."""
    train, test, total = [], [], 0
    every = max(2, round(1 / held_out))
    for i, p in enumerate(corpus_files()):
        try:
            text = p.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (test if i % every == every - 1 else train).append(text)
        total += len(text)
        if total >= limit:
            break
    if not train or not test:
        raise RuntimeError(f"the standard library at {sysconfig.get_paths()['stdlib']} has too little source to train on")
    return train, test


def build_tokenizer(texts: list[str], out: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, saved in the HF layout; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(out)
    return tok


def _ids(tok, texts: list[str]) -> np.ndarray:
    return np.concatenate([np.array(e.ids, np.int64) for e in tok.encode_batch(texts)])


def coverage(counts: np.ndarray) -> dict[str, float]:
    """Share of all activations taken by the most used 1/5/10/20/50 % of the (layer, expert)
    pairs (the profile's coverage curve, formats/profile.py)."""
    from ..formats.profile import coverage_curve
    curve = coverage_curve(counts)
    return {f"top_{p}%": curve[p - 1] for p in (1, 5, 10, 20, 50)}


def train(out: str | Path = DEFAULT_DIR, *, steps: Optional[int] = None, corpus_bytes: Optional[int] = None,
          progress: bool = True) -> dict[str, Any]:
    """Train and save the model into `out` (the HF layout plus training.json); returns the report.
    steps and corpus_bytes (characters of source read) default to TRAIN's."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    out = Path(out)
    cfg_t = dict(TRAIN, steps=steps or TRAIN["steps"], corpus_bytes=corpus_bytes or TRAIN["corpus_bytes"])
    torch.manual_seed(cfg_t["seed"])
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    train_texts, test_texts = corpus_text(cfg_t["corpus_bytes"], cfg_t["held_out_files"])
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(train_texts, staging, MODEL["vocab_size"])
    train_ids, test_ids = _ids(tok, train_texts), _ids(tok, test_texts)
    cfg = MixtralConfig(**MODEL)
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg_t["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg_t["seed"])
    seq, batch, n = cfg_t["seq"], cfg_t["batch"], cfg_t["steps"]
    losses = []
    model.train()
    for step in range(n):
        lr = cfg_t["lr"] * min(1.0, (step + 1) / cfg_t["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / n))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - seq - 1, size=batch)
        x = torch.from_numpy(np.stack([train_ids[s:s + seq] for s in starts]))
        loss = model(input_ids=x, labels=x).loss      # includes the router's load-balancing loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == n - 1):
            print(f"step {step + 1}/{n}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    model.eval()
    held_out, counts = _evaluate(model, test_ids, seq)
    freq = np.bincount(train_ids, minlength=cfg.vocab_size).astype(np.float64) + 1.0   # add-one: no log(0)
    p = freq / freq.sum()
    unigram = float(-np.log(p[test_ids[1:]]).mean())
    report = {"model": MODEL, "training": cfg_t, "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(test_ids)),
              "final_train_loss": float(np.mean(losses[-20:])), "held_out_loss": held_out,
              "unigram_held_out_loss": unigram, "held_out_vs_unigram": held_out / unigram,
              "routing_coverage": coverage(counts), "uniform_coverage": coverage(np.ones_like(counts)),
              "seconds": time.perf_counter() - t0, "torch": torch.__version__}
    model.save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    staging.rename(out)
    return report


def _evaluate(model, ids: np.ndarray, seq: int) -> tuple[float, np.ndarray]:
    """Mean held-out next-token loss (nats) and the expert counts [layers, experts] of top-k routing."""
    import torch
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), np.int64)
    total, tokens = 0.0, 0
    rows = [ids[s:s + seq] for s in range(0, len(ids) - seq, seq)][:64]
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            x = torch.from_numpy(np.stack(rows[i:i + 16]))
            o = model(input_ids=x, labels=x, output_router_logits=True)
            total += float(o.loss - cfg.router_aux_loss_coef * o.aux_loss) * x.numel()
            tokens += x.numel()
            for layer, logits in enumerate(o.router_logits):
                top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1).numpy()
                np.add.at(counts[layer], top, 1)
    return total / tokens, counts


def ensure(out: str | Path = DEFAULT_DIR, *, progress: bool = True, steps: Optional[int] = None) -> Path:
    """The trained checkpoint at `out`, trained first (for `steps`, default TRAIN's) when missing
    or when it was trained with another MODEL shape than this one (a few minutes)."""
    out = Path(out)
    report = out / "training.json"
    stale = report.exists() and json.loads(report.read_text()).get("model") != MODEL
    if not report.exists() or stale:
        if progress:
            why = "its shape is not MODEL's (an older version's checkpoint)" if stale else "once"
            print(f"training the routing model into {out} ({why}; a few minutes on 2 cores)", file=sys.stderr, flush=True)
        train(out, progress=progress, steps=steps)
    return out


def ensure_store(out: str | Path = DEFAULT_DIR, *, progress: bool = True) -> tuple[Path, int]:
    """The trained model converted into a store (lossless) beside it, built when missing, and
    its experts' decoded bytes (what the benchmarks take budgets as shares of)."""
    import moestream
    ckpt = ensure(out, progress=progress)
    store = ckpt.with_name(ckpt.name + ".moe")
    if not store.exists() or store.stat().st_mtime < (ckpt / "training.json").stat().st_mtime:
        moestream.convert(ckpt, store, progress=False, overwrite=True)   # missing, or of an older checkpoint
    with moestream.StoreReader(store) as r:
        return store, sum(x.decoded_length for x in r.index.extents.values())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="train the small MoE model with real routing (cached)")
    p.add_argument("out", nargs="?", default=str(DEFAULT_DIR))
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {TRAIN['steps']})")
    p.add_argument("--force", action="store_true", help="train again even if OUT exists")
    a = p.parse_args(argv)
    if a.force:
        train(a.out, steps=a.steps)
    else:
        ensure(a.out, steps=a.steps)      # trains when missing or of another shape
    print(json.dumps(json.loads((Path(a.out) / "training.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
