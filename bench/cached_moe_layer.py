"""The MoE layer kernel where its experts' weights sit in the caches: the compute-bound case (a
server's batch of decode tokens, a short prefill chunk below the kernels' gemm_rows), where the
row dots' own speed shows rather than memory's. `quant_kernels.moe_layer` on 8 experts drawn in
turn from a pool of `--pool` (8: 21 MB of int4 or 38 MB of int8, Qwen3-30B-A3B's expert shapes,
groups of 64), each of 1 or `--tokens` tokens routed to all 8; ms a layer, the median of `--rounds`
rounds of `--calls` calls. Only APIs every tree since 2026-12-06 has, so that two source trees
can take turns in fresh processes (before/after in one sitting):

    git worktree add /tmp/oldtree COMMIT
    for i in 1 2 3; do
      PYTHONPATH=/tmp/oldtree .venv/bin/python bench/cached_moe_layer.py
      PYTHONPATH=. .venv/bin/python bench/cached_moe_layer.py
    done

`--pool 96` reads the weights from memory instead (bench/quant_kernels.py's case)."""
from __future__ import annotations

import argparse
import time

import torch
from numba import set_num_threads

from moestream.compute.quant_kernels import RoutedExpert, moe_layer
from moestream.formats.quantized import quantize_matrix

HIDDEN, INTER, ACTIVE, GROUP = 2048, 768, 8, 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=8, help="experts the layers draw from in turn")
    p.add_argument("--tokens", type=int, default=4, help="the batch measured beside one token")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shapes = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    experts = {kind: [[quantize_matrix(torch.randn(*s) * 0.02, kind, GROUP) for s in shapes] for _ in range(a.pool)]
               for kind in ("int4", "int8")}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(a.rounds):           # interleaved rounds: the machine is shared
        for kind, pool in experts.items():
            for n in (1, a.tokens):
                x, out = torch.randn(n, HIDDEN).bfloat16(), torch.zeros(n, HIDDEN)

                def run(i: int) -> None:
                    moe_layer(x, [RoutedExpert(*pool[(i * ACTIVE + j) % a.pool], list(range(n)), [1.0 / ACTIVE] * n)
                                  for j in range(ACTIVE)], out)
                for i in range(2):
                    run(i)
                t0 = time.perf_counter()
                for i in range(a.calls):
                    run(i)
                times.setdefault((kind, n), []).append((time.perf_counter() - t0) / a.calls)
    print(f"moe_layer, {ACTIVE} experts of a pool of {a.pool}, {a.threads} threads; ms a layer, median of "
          f"{a.rounds} rounds (min-max)")
    for (kind, n), ts in times.items():
        ts.sort()
        print(f"  {kind} {n} token{'s' if n > 1 else ''}: {ts[len(ts) // 2] * 1e3:.2f} ms ({ts[0] * 1e3:.2f}-{ts[-1] * 1e3:.2f})")


if __name__ == "__main__":
    main()
