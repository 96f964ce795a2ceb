"""Prompt processing (prefill) with every expert in RAM: moestream's native forward on the bf16,
int8 and int4 stores `moestream bench decode --quick` builds, against llama.cpp's `llama-bench
-p N -n 0` on the same checkpoint's bf16, Q8_0 and Q4_0 GGUFs (both built there by `bench
decode` with its llama.cpp systems), taking turns, N tokens a prompt.

    .venv/bin/python bench/prefill_vs_llama_cpp.py --workdir /tmp/bd [--tokens 256] [--rounds 3]

Ours: one forward over N random token ids (no KV cache reuse), median of `rounds`; llama.cpp:
llama-bench's mean of `rounds` repetitions, its default repack, all cores."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time, torch
from moestream.bench.decode import load_every_expert
from moestream.compute.loader import load_model
store, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = load_model(store, host_budget=0, device_budget="90%")
load_every_expert(m.store)
ids = torch.randint(0, m.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(ids)                      # compiles and warms every path this prompt takes; not counted
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        m(ids)
        ts.append(n / (time.perf_counter() - t))
print(" ".join(f"{x:.1f}" for x in ts))
m.store.close()
"""

PAIRS = (("bf16", "qwen3moe-2L.moe", "qwen3moe-2L-bf16.gguf"), ("int8 / Q8_0", "qwen3moe-2L-int8.moe", "qwen3moe-2L-q8_0.gguf"),
         ("int4 / Q4_0", "qwen3moe-2L-int4.moe", "qwen3moe-2L-q4_0.gguf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    from moestream.bench import llama_cpp
    work = Path(a.workdir) / "moestream-bench-decode"
    src = llama_cpp.tree(work)
    bench = src / "build" / "bin" / "llama-bench"
    if not bench.exists():
        raise SystemExit(f"{bench} is missing: run `moestream bench decode --quick --workdir {a.workdir} "
                         "--system llama.cpp-q4_0` (it builds llama.cpp and the GGUFs) first")
    print(f"prefill of {a.tokens} tokens, every expert in RAM ({os.cpu_count()} cores)")
    for name, store, gguf in PAIRS:
        ours = [float(x) for x in subprocess.run([sys.executable, "-c", CHILD, str(work / store), str(a.tokens),
                                                  str(a.rounds)], check=True, capture_output=True,
                                                 text=True).stdout.split()]
        theirs = llama_cpp.run_bench(src, work / gguf, 0, prompt=a.tokens, threads=os.cpu_count() or 2,
                                     repetitions=a.rounds)["tokens_per_s"]
        mine = statistics.median(ours)
        print(f"  {name:12s} moestream {mine:7.1f} tok/s (of {', '.join(f'{x:.1f}' for x in ours)})   "
              f"llama.cpp {theirs:7.1f}   ours / llama.cpp {mine / theirs:.2f}")


if __name__ == "__main__":
    main()
