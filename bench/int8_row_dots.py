"""int8 weights against float32 activations or against int16 ones: the two whole-row int8 dots of
compute/row_dots.py side by side in one process, taking turns, on an MoE layer's int8 weights
(8 experts x gate, up, down of 768 x 2048 codes, groups of 64, fp16 scales), 2 threads the way
quant_kernels._moe_layer splits rows. Reports GB/s of weight bytes; `--pool 1` keeps one expert's
weights in the caches (the dots' own speed), the default 96 reads them from memory.

AVX2 hosts run the int16 form (row_dots.S8_ACTIVATIONS); this shows why, on the host at hand.

    .venv/bin/python bench/int8_row_dots.py [--rounds 9] [--pool 96] [--isa avx2]"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange, set_num_threads

from moestream.compute.quant_kernels import PREFETCH_BYTES
from moestream.compute.row_dots import ROW_S8_DOTS, ROW_S8_I16_DOTS, S8_ACTIVATIONS, S8_I16_ISA

ROWS, COLS, GROUP, ACTIVE, ROWS_PER_TASK = 768, 2048, 64, 8, 16
NG = COLS // GROUP
TASKS = ACTIVE * 3 * (ROWS // ROWS_PER_TASK)
_f32 = ROW_S8_DOTS[GROUP]


@njit(parallel=True, cache=False)
def layer_f32(w, first, scales, x, out, pf):
    for task in prange(TASKS):
        e, m, b = first + task // (3 * (ROWS // ROWS_PER_TASK)), (task // (ROWS // ROWS_PER_TASK)) % 3, task % (ROWS // ROWS_PER_TASK)
        base = w[e % w.shape[0], m].ctypes.data
        for r in range(b * ROWS_PER_TASK, (b + 1) * ROWS_PER_TASK):
            out[m, r] += _f32(base + r * COLS, scales.ctypes.data + 2 * r * NG, x.ctypes.data, NG, pf)


def layer_i16_for(isa: str):
    dot = ROW_S8_I16_DOTS[(isa, GROUP)]

    @njit(parallel=True, cache=False)
    def layer_i16(w, first, scales, xq, xs, out, pf):
        for task in prange(TASKS):
            e, m, b = first + task // (3 * (ROWS // ROWS_PER_TASK)), (task // (ROWS // ROWS_PER_TASK)) % 3, task % (ROWS // ROWS_PER_TASK)
            base = w[e % w.shape[0], m].ctypes.data
            for r in range(b * ROWS_PER_TASK, (b + 1) * ROWS_PER_TASK):
                out[m, r] += dot(base + r * COLS, scales.ctypes.data + 2 * r * NG, xq.ctypes.data, xs.ctypes.data, NG, pf)
    return layer_i16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=48)
    p.add_argument("--pool", type=int, default=96, help="experts the layers draw from in turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default=S8_I16_ISA, help="the int16 dot's instruction set (default: the host's)")
    a = p.parse_args()
    set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (a.pool, 3, ROWS, COLS)).astype(np.int8)
    scales = (rng.standard_normal((ROWS, NG)) * 0.01).astype(np.float16).view(np.uint16)
    x = rng.standard_normal(COLS).astype(np.float32)
    xs = (np.abs(x).reshape(NG, GROUP).max(1) / 32767).astype(np.float32)
    xq = np.rint(x / np.repeat(xs, GROUP)).astype(np.int16)
    out = np.zeros((3, ROWS), np.float32)
    layer_i16 = layer_i16_for(a.isa)
    runs = {"float32 activations": lambda first: layer_f32(w, first, scales, x, out, PREFETCH_BYTES),
            f"int16 activations ({a.isa})": lambda first: layer_i16(w, first, scales, xq, xs, out, PREFETCH_BYTES)}
    for fn in runs.values():
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            for c in range(a.calls):
                runs[name](ACTIVE * c)
            times[name].append((time.perf_counter() - t0) / a.calls)
    nbytes = ACTIVE * 3 * ROWS * COLS
    print(f"host dots: {S8_ACTIVATIONS} activations; {a.threads} threads, pool {a.pool} experts, "
          f"{a.rounds} rounds taking turns; ms per layer, median (min-max), GB/s of int8 codes")
    names = list(runs)
    for name in names:
        ts = sorted(times[name])
        med = ts[len(ts) // 2]
        print(f"  {name:28s} {med * 1e3:6.2f} ms ({ts[0] * 1e3:.2f}-{ts[-1] * 1e3:.2f})  {nbytes / med / 1e9:5.1f} GB/s")
    wins = sum(b < f for f, b in zip(times[names[0]], times[names[1]]))
    print(f"  int16 faster in {wins} of {a.rounds} rounds")


if __name__ == "__main__":
    main()
