"""Random-initialised MoE checkpoints built on the spot (no download), and `make demo`.

transformers is needed here (it is in the `test` extra); nothing else in moestream imports it."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

def tiny_config(family: str, **overrides: Any):
    """A small transformers config of `family` (>= 2 layers, 8 experts, top-2)."""
    import transformers
    from .formats.families import FAMILIES
    record = FAMILIES[family]
    kw: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, num_experts_per_tok=2, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(record.demo_config)
    kw.update(overrides)
    if record.expert_intermediate_key == "intermediate_size":  # Mixtral, OLMoE: experts use intermediate_size
        kw["intermediate_size"] = kw.pop("moe_intermediate_size")
    return getattr(transformers, record.transformers_config)(**kw)


def build_tokenizer(out: Path, vocab_size: int = 256) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, saved in the HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts models route each token.",
            "Experts stream from NVMe into memory just in time."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)


def build_checkpoint(family: str, out: str | Path, *, seed: int = 0, max_shard_size: str | None = None,
                     dtype: str = "float32", with_tokenizer: bool = True, **overrides: Any) -> Path:
    """Save a random-initialised `family` model with `save_pretrained` (hub layout) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM
    out = Path(out)
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    if with_tokenizer:
        build_tokenizer(out, cfg.vocab_size)
    return out


def _run(*args: str) -> None:
    print("$ moestream " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "moestream.cli", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="build a random Mixtral-style checkpoint, convert, inspect, verify")
    p.add_argument("workdir", nargs="?", default="demo")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    ckpt, store = work / "mixtral-random", work / "mixtral-random.moe"
    if not (ckpt / "config.json").exists():
        print(f"building a random Mixtral-style checkpoint in {ckpt}", flush=True)
        build_checkpoint("mixtral", ckpt, hidden_size=256, intermediate_size=512, moe_intermediate_size=512,
                         num_hidden_layers=4, vocab_size=512, max_shard_size="2MB")
    _run("convert", str(ckpt), str(store), "--overwrite")
    _run("inspect", str(store))
    _run("verify", str(store))
    from .formats import StoreReader
    with StoreReader(store) as r:
        expert_bytes = sum(reg.decoded_length for reg in r.index.extents.values())
    budget = expert_bytes // 6  # far below the experts' size: the run must stream and evict
    print(f"# experts total {expert_bytes} bytes decoded; device budget {budget} bytes", flush=True)
    _run("generate", str(store), "--prompt", "Experts stream from NVMe", "--max-new-tokens", "24",
         "--device-budget", str(budget), "--host-budget", str(budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
