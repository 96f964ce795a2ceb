"""Where a whole-row int4 dot's time goes (compute/row_dots.py), from the L1 cache, one thread: the
process's dot (ROW_U4) beside variants built from the same pieces, taking turns in one process, on
rows of 768 and 2048 int4 weights (an expert's down and gate/up rows), groups of 64:

- `merges, then scales (4a14770)`: the units' 16 lanes merged into one lane a group (shuffles,
  _group_blocks), the block's scales applied at its end; AVX2 hosts' dot from 4a14770 until
  _scaled_blocks;
- `merges, scales as 16-bit masked lanes (8fec1c5)`: as above, the block's fp16 scales and
  minimums read as every host read them before 4a14770 (_f16_lanes: a masked load of 16-bit lanes,
  which AVX2 has no instruction for, and an integer rebias);
- `units only`: the multiply-adds of the codes alone, every unit's vector added into one (no
  merges, no scales): wrong sums on purpose, it only shows what the multiply-adds cost.

Reports ns a row and G weights/s, the best of `--rounds`.

    .venv/bin/python bench/row_dot_parts.py [--rounds 7] [--cols 768,2048]"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from moestream.compute.row_dots import (DOT_CHUNK, ROW_U4, U4_ISA, _V16F, _V16I, _V64B, _FAST, _const, _f16_block,
                                        _f16_lanes, _group_blocks, _load_first, _loop_head, _loop_tail, _masked_load,
                                        _sum_lanes, _u4_unit, _u4_unit_vector)

GROUP = 64
ROWS = 64                 # 64 rows of 2048: 64 KiB of codes, the L1 and L2 caches' share


def _variant(kind: str):
    per = 2 * DOT_CHUNK // GROUP

    @intrinsic
    def dot(typingctx, codes_addr, scales_addr, mins_addr, e_addr, o_addr, xs_addr, xsum_addr, ng, pf):
        sig = types.float32(*([types.intp] * 9))

        def codegen(context, builder, signature, args):
            cw, sc, mn, e, o, xs, xsum, ng, pf = args
            if kind == "units only":
                loop, u, acc = _loop_head(builder, "unit", _V16I)
                off = builder.mul(u, _const(DOT_CHUNK))
                v = _u4_unit(builder, U4_ISA, *(_load_first(builder, builder.add(a, off), _V64B, 1) for a in (cw, e, o)))
                acc1 = builder.add(acc, v)
                _loop_tail(builder, loop, u, acc, acc1, builder.sdiv(ng, _const(per)), "units_end")
                return _sum_lanes(builder, builder.sitofp(acc1, _V16F), 16)

            unit_vector = _u4_unit_vector(builder, U4_ISA, GROUP, cw, e, o, pf)

            def block_end(base, mask, isums, acc):
                sums = builder.sitofp(isums, _V16F)
                b2, b4 = builder.mul(base, _const(2)), builder.mul(base, _const(4))
                if kind.startswith("merges, then scales"):
                    s, m = (_f16_block(builder, U4_ISA, builder.add(a, b2), builder.sub(ng, base), mask) for a in (sc, mn))
                else:
                    s, m = (_f16_lanes(builder, builder.add(a, b2), mask) for a in (sc, mn))
                xsv, xsumv = (_masked_load(builder, builder.add(a, b4), _V16F, 4, mask) for a in (xs, xsum))
                t = builder.fadd(builder.fmul(builder.fmul(sums, s, flags=_FAST), xsv, flags=_FAST),
                                 builder.fmul(m, xsumv, flags=_FAST), flags=_FAST)
                return builder.fadd(acc, t, flags=_FAST)
            return _sum_lanes(builder, _group_blocks(builder, ng, per, unit_vector, block_end, _V16F, builder.add), 16)
        return sig, codegen
    return dot


def _runner(dot):
    @njit
    def run(codes, sc, mn, e, o, xs, xsum, reps):
        acc = np.float32(0)
        rows, half = codes.shape
        ng = sc.shape[1]
        for _ in range(reps):
            for r in range(rows):
                acc += dot(codes.ctypes.data + r * half, sc.ctypes.data + 2 * r * ng, mn.ctypes.data + 2 * r * ng,
                           e.ctypes.data, o.ctypes.data, xs.ctypes.data, xsum.ctypes.data, ng, 0)
        return acc
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cols", default="768,2048")
    a = p.parse_args()
    runs = {"ROW_U4 (moestream)": _runner(ROW_U4[GROUP])}
    for kind in ("merges, then scales (4a14770)", "merges, scales as 16-bit masked lanes (8fec1c5)", "units only"):
        runs[kind] = _runner(_variant(kind))
    print(f"int4 whole-row dots, groups of {GROUP}, U4_ISA {U4_ISA}, one thread, {ROWS} rows from the L1/L2 caches; "
          f"best of {a.rounds} rounds taking turns")
    rng = np.random.default_rng(0)
    for cols in (int(c) for c in a.cols.split(",")):
        ng = cols // GROUP
        codes = rng.integers(0, 256, (ROWS, cols // 2)).astype(np.uint8)
        sc = (rng.standard_normal((ROWS, ng)) * 0.01).astype(np.float16).view(np.uint16)
        mn = (rng.standard_normal((ROWS, ng)) * 0.01).astype(np.float16).view(np.uint16)
        e, o = (rng.integers(-127, 128, cols // 2).astype(np.int8) for _ in range(2))
        xs, xsum = rng.random(ng).astype(np.float32), rng.standard_normal(ng).astype(np.float32)
        args = (codes, sc, mn, e, o, xs, xsum)
        reps = max(1, int(1e8 // (ROWS * cols)))
        first = {name: fn(*args, 1) for name, fn in runs.items()}
        best = {name: float("inf") for name in runs}
        for r in range(a.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[name](*args, reps)
                best[name] = min(best[name], time.perf_counter() - t0)
        sums = ", ".join(f"{first[name]:.6g}" for name in list(runs)[:3])
        print(f"  {cols} weights a row ({ng} groups); the three whole dots' sums over the rows: {sums} (the same "
              f"products, summed in other orders)")
        for name, t in best.items():
            print(f"    {name:50s} {t / (reps * ROWS) * 1e9:6.1f} ns a row  {reps * ROWS * cols / t / 1e9:5.1f} G weights/s")


if __name__ == "__main__":
    main()
