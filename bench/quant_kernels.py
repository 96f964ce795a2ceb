"""Kernel candidates for an MoE layer's quantized experts on the CPU, in GB/s of the weight bytes a
token reads, beside the machine's memory read bandwidth (bench/gemv_bandwidth.py's measure).

Qwen3-30B-A3B's expert shapes (hidden 2048, intermediate 768), 8 routed experts per token, one
token (decode), drawn in turn from 96 experts per type so that every layer reads its weights from
memory, not the caches. Rows:

- bf16 torch: F.linear x3 + SwiGLU per expert (the lossless store's path)
- dequantize at every call + bf16 torch: the Numba dequantizer into bf16, then the same: what the
  int path paid on every miss until now (it then held the bf16 copy)
- torch _weight_int8pack_mm: per-output-channel int8 (not our group-wise format: a reference
  for what torch's own CPU int8 kernel reaches); torch _weight_int4pack_mm_for_cpu: group-wise
  int4 with bf16 scales and zeros (our int4 maps onto it: scale s, zero m + 8 s)
- numba moe_layer: compute/quant_kernels.py, the whole layer in one call (what moestream runs),
  with its software prefetch (quant_kernels.PREFETCH_BYTES ahead) and without (0); for groups of
  64 its rows take the whole-row dots of compute/row_dots.py (since 2026-12-02); bf16: a lossless
  store's experts through the same kernel

    .venv/bin/python bench/quant_kernels.py [--threads 2] [--rounds 3]"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moestream.compute.dequant import dequantize
from moestream.compute import quant_kernels
from moestream.compute.quant_kernels import RoutedExpert, moe_layer
from moestream.formats.quantized import quantize_matrix

HIDDEN, INTER, ACTIVE, POOL, GROUP = 2048, 768, 8, 96, 64


def seconds(fn, n: int) -> float:
    for i in range(3):
        fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=40)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shapes = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    f32 = [[torch.randn(*s) * 0.02 for s in shapes] for _ in range(POOL)]
    bf16 = [[w.bfloat16() for w in e] for e in f32]
    q = {k: [[quantize_matrix(w, k, GROUP) for w in e] for e in f32] for k in ("int8", "int4")}
    x = torch.randn(1, HIDDEN).bfloat16()
    # torch's own int kernels on the same weights
    i8 = [[(torch.randint(-127, 127, w.shape, dtype=torch.int8), torch.rand(w.shape[0]).bfloat16()) for w in e]
          for e in f32]
    i4 = []
    for e in q["int4"]:
        mats = []
        for m in e:
            codes = torch.stack([m.codes & 15, m.codes >> 4], -1).reshape(m.shape).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            s, mn = m.scales.float(), m.mins.float()
            sz = torch.stack([s, mn + 8 * s], -1).transpose(0, 1).contiguous().bfloat16()   # [in/G, out, 2]
            mats.append((packed, sz))
        i4.append(mats)
    read = torch.ones(64 << 20)

    def experts(i):
        return [(i * ACTIVE + j) % POOL for j in range(ACTIVE)]

    def swiglu(lin, e):
        g, u, d = e
        return lin(F.silu(lin(x, g)) * lin(x, u), d)

    def run_bf16(i):
        for k in experts(i):
            swiglu(F.linear, bf16[k])

    def run_dequant(kind):
        def run(i):
            for k in experts(i):
                swiglu(F.linear, [m.dequantize(dequantize, torch.bfloat16) for m in q[kind][k]])
        return run

    def run_int8pack(i):
        for k in experts(i):
            swiglu(lambda h, w: torch.ops.aten._weight_int8pack_mm(h, w[0], w[1]), i8[k])

    def run_int4pack(i):
        for k in experts(i):
            swiglu(lambda h, w: torch.ops.aten._weight_int4pack_mm_for_cpu(h, w[0], GROUP, w[1]), i4[k])

    def run_numba(kind, prefetch=quant_kernels.PREFETCH_BYTES):
        out = torch.zeros(1, HIDDEN)
        weights = bf16 if kind == "bf16" else q[kind]

        def run(i):
            saved, quant_kernels.PREFETCH_BYTES = quant_kernels.PREFETCH_BYTES, prefetch
            try:
                moe_layer(x, [RoutedExpert(*weights[k], [0], [1.0 / ACTIVE]) for k in experts(i)], out)
            finally:
                quant_kernels.PREFETCH_BYTES = saved
        return run

    bytes_bf16 = ACTIVE * sum(w.nbytes for w in bf16[0])
    bytes_q = {k: ACTIVE * sum(m.nbytes for m in q[k][0]) for k in q}
    rows = [("bf16 torch F.linear", run_bf16, bytes_bf16),
            (f"bf16 numba moe_layer, prefetch {quant_kernels.PREFETCH_BYTES} B (moestream)", run_numba("bf16"),
             bytes_bf16),
            ("int8 dequantize at every call (a miss's cost) + bf16 torch", run_dequant("int8"), bytes_q["int8"]),
            ("int4 dequantize at every call (a miss's cost) + bf16 torch", run_dequant("int4"), bytes_q["int4"]),
            ("int8 torch _weight_int8pack_mm (per channel)", run_int8pack, ACTIVE * sum(w[0].nbytes for w in i8[0])),
            ("int4 torch _weight_int4pack_mm_for_cpu", run_int4pack, bytes_q["int4"]),
            ("int8 numba moe_layer, no software prefetch", run_numba("int8", 0), bytes_q["int8"]),
            ("int4 numba moe_layer, no software prefetch", run_numba("int4", 0), bytes_q["int4"]),
            (f"int8 numba moe_layer, prefetch {quant_kernels.PREFETCH_BYTES} B (moestream)", run_numba("int8"),
             bytes_q["int8"]),
            (f"int4 numba moe_layer, prefetch {quant_kernels.PREFETCH_BYTES} B (moestream)", run_numba("int4"),
             bytes_q["int4"])]
    results: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    reads = []
    for _ in range(a.rounds):   # interleaved rounds: the machine is shared
        reads.append(read.nbytes / seconds(lambda i: read.sum(), 5) / 1e9)
        for name, fn, _ in rows:
            results[name].append(seconds(fn, a.calls))
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {a.threads} threads; "
          f"memory read (sum f32) {min(reads):.1f}-{max(reads):.1f} GB/s; one token, {ACTIVE} experts "
          f"{INTER}x{HIDDEN}; median of {a.rounds} interleaved rounds (min-max)")
    print("| candidate | ms / layer | weight GB/s | of read bandwidth |")
    print("|---|---:|---:|---:|")
    for name, _, nbytes in rows:
        ts = sorted(results[name])
        med = ts[len(ts) // 2]
        print(f"| {name} | {med * 1e3:.2f} ({ts[0] * 1e3:.2f}-{ts[-1] * 1e3:.2f}) | {nbytes / med / 1e9:.1f} | "
              f"{nbytes / med / 1e9 / (sorted(reads)[len(reads) // 2]):.2f} |")


if __name__ == "__main__":
    main()
