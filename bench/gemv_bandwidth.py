"""What bounds CPU decode: the machine's memory read bandwidth against the bandwidth an expert's
GEMV reaches (Qwen3-30B-A3B's expert matrix, 768 x 2048, one token), per dtype and torch thread
count. 64 matrices are used in turn so that each GEMV reads its weights from memory, not cache.
A GEMV well below the read bandwidth has room a better kernel could take; at it, only fewer
bytes (or a GPU) make decode faster.

    .venv/bin/python bench/gemv_bandwidth.py [--threads 1,2]"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

ROWS, COLS, MATRICES = 768, 2048, 64


def seconds(fn, n: int) -> float:
    """Mean seconds of fn over n calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    big_f32 = torch.ones(64 << 20)                          # 256 MiB
    big_bf16 = torch.ones(128 << 20, dtype=torch.bfloat16)  # 256 MiB
    mats = {dt: [torch.randn(ROWS, COLS).to(dt) for _ in range(MATRICES)]
            for dt in (torch.bfloat16, torch.float16, torch.float32)}
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; GB/s (1e9 bytes per second)")
    print("| torch threads | read: sum f32 | read: sum bf16 | GEMV bf16 | GEMV fp16 | GEMV fp32 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        cells = [big_f32.nbytes / seconds(big_f32.sum, 5) / 1e9, big_bf16.nbytes / seconds(big_bf16.sum, 5) / 1e9]
        for dt, ms in mats.items():
            x = torch.randn(1, COLS).to(dt)
            turn = iter(range(1 << 30))
            cells.append(ms[0].nbytes / seconds(lambda: F.linear(x, ms[next(turn) % MATRICES]), 300) / 1e9)
        print(f"| {threads} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
