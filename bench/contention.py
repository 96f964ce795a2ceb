"""Expert matmuls with 1 and 2 torch threads, alone and while O_DIRECT reads run beside them.

    .venv/bin/python bench/contention.py [--file BIG_FILE] [--threads 2]

Why moestream.compute.threads leaves a core to the Store while it reads: a decode-time expert
(Qwen3-30B-A3B's shape: gate/up 768x2048, down 2048x768, bf16, one token) is three GEMVs,
each a parallel region that ends with its slowest thread; a thread sharing its core with the
I/O path is late every time. Reads come from --file (default: a 1 GiB file written once into
$TMPDIR), in 8 MiB O_DIRECT preads on one thread, in a loop."""
from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def expert_ms(experts, x, rounds: int = 4) -> float:
    """Milliseconds per expert (gate, up, down GEMVs and the SwiGLU) over `rounds` passes."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        for g, u, d in experts:
            F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    return (time.perf_counter() - t0) / (rounds * len(experts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="a large file to read with O_DIRECT (default: one written into $TMPDIR)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the full torch thread count")
    a = ap.parse_args()
    path = Path(a.file) if a.file else Path(tempfile.gettempdir()) / "moestream-contention.bin"
    if not path.exists():
        with open(path, "wb") as f:
            for _ in range(128):
                f.write(os.urandom(8 << 20))
    size = path.stat().st_size
    experts = [(torch.randn(768, 2048, dtype=torch.bfloat16), torch.randn(768, 2048, dtype=torch.bfloat16),
                torch.randn(2048, 768, dtype=torch.bfloat16)) for _ in range(64)]
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    stop = threading.Event()

    def reader():
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        buf, off = mmap.mmap(-1, 8 << 20), 0
        try:
            while not stop.is_set():
                n = os.preadv(fd, [buf], off)
                off = (off + (n or 0)) % max(size - (8 << 20), 1) // 4096 * 4096
        finally:
            os.close(fd)
    print(f"torch threads | alone ms/expert | with O_DIRECT reads ms/expert   ({os.cpu_count()} cores, {path})")
    for n in sorted({a.threads, max(1, a.threads - 1)}, reverse=True):
        torch.set_num_threads(n)
        expert_ms(experts, x, 1)
        alone = expert_ms(experts, x)
        stop.clear()
        t = threading.Thread(target=reader)
        t.start()
        try:
            busy = expert_ms(experts, x)
        finally:
            stop.set()
            t.join()
        print(f"{n:13d} | {alone:15.3f} | {busy:.3f}")


if __name__ == "__main__":
    main()
