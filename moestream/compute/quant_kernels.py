"""Matmuls on quantized experts where they lie: y = x · Wᵀ for group-wise int8 and int4 weights
held in their stored form (formats.quantized.QuantizedTensor), without a bf16 copy of W.

The int4 CPU kernel works the way llama.cpp's `ggml_vec_dot_q4_0_q8_0` family does: each row of
activations is quantized to int8 once per group (one fp32 scale per group of the weights' group
size), a group's dot product is an integer multiply-add over codes, and the group's two scales
multiply its integer sum once. For int4 (w = q·s + m) the minimum's share is m · Σx over the group,
Σx taken over the quantized activations. int8 codes are multiplied by the float32 activations
themselves (widened 64 at a time): as fast on the development machine, and no rounding of the
activations on top of the weights' own (on the trained routing model int8 activations raised the
KL against bf16 from 0.0017 to 0.0021 nats/token).

One call computes a whole MoE layer for a batch of tokens: every routed expert's gate and up
rows, SwiGLU, the activations of the down projection quantized again, then the down rows,
weighted and summed into each token's output. The Python and dispatch cost per expert (six torch
calls and their tensors, more than the expert's matmuls at decode: issue 22) becomes one Numba
call per layer. Experts reach the kernel by address: the Store's slots are scattered over one
arena, and a stacked copy would cost what the held form saves. The caller keeps the tensors
alive for the call.

`QUANT_KERNELS` is the table, keyed by the quant type's name (formats.constants.QUANT_TYPES):
its layer-kernel code, its dequantizer and the types the CPU kernel reads. A new type is one
entry there and one branch in `_row_dot`. A lossless store's bf16 experts take the same layer
kernel (weights × float32 activations, accumulated in float32). Off the CPU (CUDA) each expert is dequantized on the
device (compute/dequant.py's Numba-CUDA kernel) and multiplied by torch: held quantized, the L1
still keeps 3.6x (int4) more experts in the same bytes."""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from numba import carray, njit, prange

from ..formats.quantized import QuantizedTensor
from .dequant import _PARALLEL_LOCK, dequantize
from .row_dots import (DOT_CHUNK, ROW_FLOAT8, ROW_S8_DOTS, ROW_S8_I16, ROW_U4, S8_ACTIVATIONS, _bits_to_f32,
                       _dot_s8_f32, _dot_u4, _f16, _f32_ptr, _fp8_f32, _i8_ptr, _prefetch, _u8_ptr, _u16_ptr,
                       row_dot_bf16)

# Numba calls an intrinsic by its global name: one per group size of row_dots.ROW_DOT_GROUPS, one per float8 type
_s8_g32, _s8_g64, _u4_g32, _u4_g64 = ROW_S8_DOTS[32], ROW_S8_DOTS[64], ROW_U4[32], ROW_U4[64]
_s8i_g32, _s8i_g64 = ROW_S8_I16[32], ROW_S8_I16[64]
#: int8 weights of groups of 32 and 64 multiply int16 activations (row_dots.S8_ACTIVATIONS); a
#: global, so Numba compiles it in as a constant
_S8_INT16 = S8_ACTIVATIONS == "int16"
_f8_e4m3, _f8_e5m2 = ROW_FLOAT8[3], ROW_FLOAT8[4]

#: how far ahead of the codes being multiplied the kernels ask for the weights (bytes, in the same
#: matrix). The hardware prefetcher alone kept a core's loads short of memory's bandwidth: on the
#: development machine a resident int4 store decoded 1.19x and an int8 one 1.32x faster with
#: 2-4 KiB of software prefetch (medians of 10 rounds alternating 0, 2, 4, 6 and 8 KiB in one
#: process; bench/quant_kernels.py has the kernel with and without). The kernels take it as an
#: argument so that a benchmark can sweep it. Near a matrix's end the hint points past it: a
#: prefetch never faults (x86 PREFETCHh, AArch64 PRFM), it only fetches a line nobody reads.
#: 0: no look-ahead (the line being read).
PREFETCH_BYTES = 4096


# ---- activations ------------------------------------------------------------------------------


@njit(cache=True)
def _quantize_rows(x, group, xe, xo, xs, xsum):
    """x float32 [N, K] -> int8 codes split into even and odd elements [N, K/2] (for the int4
    dot), one scale absmax/127 per group [N, K/group], and each group's sum of the quantized
    values (scale · Σ codes, as llama.cpp's q8_1 keeps it): the int4 minimum's share m · Σx must
    be taken over the same activations as the codes' share, or the two, which nearly cancel,
    leave the activations' rounding error several times over (4.3 % against 1.2 % measured)."""
    n, k = x.shape
    for r in range(n):
        for g in range(k // group):
            amax = np.float32(0)
            for j in range(g * group, (g + 1) * group):
                a = abs(x[r, j])
                if a > amax:
                    amax = a
            s = amax / np.float32(127)
            inv = np.float32(1) / s if s > 0 else np.float32(0)
            xs[r, g] = s
            qsum = np.int32(0)
            for j in range(g * group, (g + 1) * group):
                q = np.int8(np.rint(x[r, j] * inv))
                qsum += np.int32(q)
                if j % 2 == 0:
                    xe[r, j // 2] = q
                else:
                    xo[r, j // 2] = q
            xsum[r, g] = s * np.float32(qsum)


@njit(cache=True)
def _quantized_activations(x, group, needed=True):
    """(even codes, odd codes, scales, sums) of x float32 [N, K]: _quantize_rows into new arrays;
    empty arrays where not `needed` (int8 weights multiply the float activations: quantizing a
    decode row cost more than a small matrix's whole product)."""
    n, k = x.shape
    if not needed:
        n = 0
    xe = np.empty((n, k // 2), np.int8)
    xo = np.empty((n, k // 2), np.int8)
    xs = np.empty((n, k // group), np.float32)
    xsum = np.empty((n, k // group), np.float32)
    if needed:
        _quantize_rows(x, group, xe, xo, xs, xsum)
    return xe, xo, xs, xsum


@njit(cache=True)
def _quantize_rows16(x, group, xq, xs):
    """x float32 [N, K] -> int16 codes xq [N, K] and one scale absmax/32767 per group xs
    [N, K/group], for int8 weights' dot on AVX2 hosts (row_dots: int8 x int16)."""
    n, k = x.shape
    for r in range(n):
        for g in range(k // group):
            amax = np.float32(0)
            for j in range(g * group, (g + 1) * group):
                amax = max(amax, abs(x[r, j]))
            s = amax / np.float32(32767)
            inv = np.float32(1) / s if s > 0 else np.float32(0)
            xs[r, g] = s
            for j in range(g * group, (g + 1) * group):
                xq[r, j] = np.int16(np.rint(x[r, j] * inv))


@njit(cache=True)
def _int16_activations(x, group, needed):
    """(int16 codes, scales) of x float32 [N, K] (_quantize_rows16) where `needed`, else empty arrays."""
    n, k = x.shape
    if not needed:
        n = 0
    xq = np.empty((n, k), np.int16)
    xs = np.empty((n, k // group), np.float32)
    if needed:
        _quantize_rows16(x, group, xq, xs)
    return xq, xs


# ---- one row of W against one row of activations ---------------------------------------------
# kind 0: int8 (codes int8, scales); kind 1: int4 (two codes a byte, low nibble first; scales,
# mins); kind 2: bf16 (the weights themselves at the codes' address; no planes, no groups);
# kinds 3 and 4: float8 E4M3FN and E5M2 (one code a byte, float32 scales); kind 5: mxfp4 (two
# e2m1 codes a byte, low nibble first; one uint8 E8M0 exponent a group)

@njit(inline="always")
def _e2m1(c):
    # the value of a 4-bit e2m1 code (formats/mxfp4.py's FP4_VALUES) built as float32 bits: sign
    # bit 3, exponent bits 1-2 (bias 1), mantissa bit 0; exponent 0 is 0 or the subnormal 0.5.
    # Arithmetic, not a table: LLVM vectorizes it (a table lookup per code kept the dot scalar:
    # 0.61 -> 0.26 ms for [768, 2048] against one token row, the development machine)
    e = (c >> np.uint32(1)) & np.uint32(3)
    sign = (c & np.uint32(8)) << np.uint32(28)
    m = c & np.uint32(1)
    normal = sign | ((e + np.uint32(126)) << np.uint32(23)) | (m << np.uint32(22))
    return _bits_to_f32(normal if e != 0 else (sign | np.uint32(0x3F000000) if m != 0 else sign))


@njit(inline="always")
def _e8m0(e):
    # 2^(e - 127) as float32 bits: the exponent field itself, or for e = 0 the subnormal 2^-127
    return _bits_to_f32(np.uint32(e) << np.uint32(23)) if e > 0 else _bits_to_f32(np.uint32(1) << np.uint32(22))

@njit(inline="always")
def _row_dot(kind, codes_addr, scales_addr, mins_addr, row, cols, group, xf, xe, xo, xs, xsum, xq, xqs, t,
             sums, pf):
    # int8: float activations xf, or where _S8_INT16 (groups of 32 and 64) their int16 codes xq and
    # scales xqs. int4: the integer sums of all groups first, into `sums`
    # (scratch, >= cols / group), then the scales, so the float work stays out of the integer
    # loop. Groups of 64 (the default) and 32 (GGUF's blocks) take the whole-row dots; other
    # multiples of DOT_CHUNK the 64-weight vector dots; the rest the scalar loop.
    if kind == 2:
        if cols % DOT_CHUNK == 0:
            return row_dot_bf16(codes_addr + 2 * row * cols, xf.ctypes.data + 4 * t * cols, cols // DOT_CHUNK, pf)
        acc = np.float32(0)
        wb = carray(_u16_ptr(codes_addr + 2 * row * cols), cols)
        xrow = xf[t]
        for j in range(cols):
            acc += _bits_to_f32(np.uint32(wb[j]) << np.uint32(16)) * xrow[j]
        return acc
    ng = cols // group
    if kind == 3 or kind == 4:
        # float8 codes (an FP8 checkpoint's own bytes) times the float32 activations, each group's
        # float32 scale once: the whole-row dot where the group is a multiple of 64, else one by one
        w_addr, x_addr = codes_addr + row * cols, xf.ctypes.data + 4 * t * cols
        if group % DOT_CHUNK == 0:
            if kind == 3:
                return _f8_e4m3(w_addr, scales_addr + 4 * row * ng, x_addr, ng, group // DOT_CHUNK, pf)
            return _f8_e5m2(w_addr, scales_addr + 4 * row * ng, x_addr, ng, group // DOT_CHUNK, pf)
        sc32 = carray(_f32_ptr(scales_addr + 4 * row * ng), ng)
        wb = carray(_u8_ptr(w_addr), cols)
        xrow = xf[t]
        acc = np.float32(0)
        for g in range(ng):
            s = np.float32(0)
            for j in range(g * group, (g + 1) * group):
                s += _fp8_f32(wb[j], kind) * xrow[j]
            acc += s * sc32[g]
        return acc
    if kind == 5:
        # mxfp4 codes decoded (_e2m1) and multiplied by the float32 activations, each group's
        # power of two once
        half = group // 2
        wb = carray(_u8_ptr(codes_addr + row * (cols // 2)), cols // 2)
        eb = carray(_u8_ptr(scales_addr + row * ng), ng)
        xrow = xf[t]
        acc = np.float32(0)
        for g in range(ng):
            wg = wb[g * half:(g + 1) * half]
            xg = xrow[g * group:(g + 1) * group]
            s = np.float32(0)
            for j in range(half):
                b = np.uint32(wg[j])
                s += _e2m1(b & np.uint32(15)) * xg[2 * j] + _e2m1(b >> np.uint32(4)) * xg[2 * j + 1]
            acc += s * _e8m0(eb[g])
        return acc
    if group == 64 or group == 32:      # the whole-row dots (row_dots.py)
        s_addr, m_addr = scales_addr + 2 * row * ng, mins_addr + 2 * row * ng
        if kind == 0:
            if _S8_INT16:
                w_addr, q_addr, qs_addr = codes_addr + row * cols, xq.ctypes.data + 2 * t * cols, xqs.ctypes.data + 4 * t * ng
                if group == 64:
                    return _s8i_g64(w_addr, s_addr, q_addr, qs_addr, ng, pf)
                return _s8i_g32(w_addr, s_addr, q_addr, qs_addr, ng, pf)
            w_addr, x_addr = codes_addr + row * cols, xf.ctypes.data + 4 * t * cols
            if group == 64:
                return _s8_g64(w_addr, s_addr, x_addr, ng, pf)
            return _s8_g32(w_addr, s_addr, x_addr, ng, pf)
        w_addr = codes_addr + row * (cols // 2)
        e_addr, o_addr = xe.ctypes.data + t * (cols // 2), xo.ctypes.data + t * (cols // 2)
        xs_addr, xsum_addr = xs.ctypes.data + 4 * t * ng, xsum.ctypes.data + 4 * t * ng
        if group == 64:
            return _u4_g64(w_addr, s_addr, m_addr, e_addr, o_addr, xs_addr, xsum_addr, ng, pf)
        return _u4_g32(w_addr, s_addr, m_addr, e_addr, o_addr, xs_addr, xsum_addr, ng, pf)
    sc = carray(_u16_ptr(scales_addr + 2 * row * ng), ng)
    chunks = group // DOT_CHUNK if group % DOT_CHUNK == 0 else 0
    if kind == 0:
        # int8 weights times the float32 activations themselves: exact to the weights' own
        # quantization (int8 activations added a third to the KL on the trained model,
        # bench/mixed_precision.py), and as fast on AVX-512, LLVM widening the codes to floats 16
        # at a time (groups of 32 and 64 on AVX2 hosts took the int16 dot above)
        acc = np.float32(0)
        if chunks:
            w_addr = codes_addr + row * cols
            x_addr = xf.ctypes.data + 4 * t * cols
            for g in range(ng):
                s = np.float32(0)
                for c in range(chunks):
                    off = g * group + c * DOT_CHUNK
                    if pf:
                        _prefetch(w_addr + off + pf)
                    s += _dot_s8_f32(w_addr + off, x_addr + 4 * off)
                acc += s * _f16(sc[g])
        else:
            w = carray(_i8_ptr(codes_addr + row * cols), cols)
            xrow = xf[t]
            for g in range(ng):
                s = np.float32(0)
                for j in range(g * group, (g + 1) * group):
                    s += np.float32(w[j]) * xrow[j]
                acc += s * _f16(sc[g])
        return acc
    half = group // 2
    mn = carray(_u16_ptr(mins_addr + 2 * row * ng), ng)
    if chunks:
        c_addr = codes_addr + row * (cols // 2)
        e_addr = xe.ctypes.data + t * (cols // 2)
        o_addr = xo.ctypes.data + t * (cols // 2)
        for g in range(ng):
            s = np.int32(0)
            for c in range(chunks):
                off = g * half + c * (DOT_CHUNK // 2)
                if pf and c % 2 == 0:
                    _prefetch(c_addr + off + pf)
                s += _dot_u4(c_addr + off, e_addr + off, o_addr + off)
            sums[g] = s
    else:
        w4 = carray(_i8_ptr(codes_addr + row * (cols // 2)), cols // 2)
        erow, orow = xe[t], xo[t]
        for g in range(ng):
            wg = w4[g * half:(g + 1) * half]
            eg = erow[g * half:(g + 1) * half]
            og = orow[g * half:(g + 1) * half]
            s = np.int32(0)
            for j in range(half):
                c = wg[j]
                s += np.int32(c & np.int8(15)) * np.int32(eg[j]) + np.int32((c >> np.int8(4)) & np.int8(15)) * np.int32(og[j])
            sums[g] = s
    acc = np.float32(0)
    for g in range(ng):
        acc += np.float32(sums[g]) * _f16(sc[g]) * xs[t, g] + _f16(mn[g]) * xsum[t, g]
    return acc


#: output rows per parallel task: gate/up rows of one expert, and down rows of every routed expert,
#: taken expert by expert. Larger down tasks make longer sequential runs of each down matrix: int4
#: layers from memory (96 experts in turn, 8 a token, 2 threads) read 1.24x faster expert by expert
#: than row by row across the experts, and 1.09x more with 128 rows than with 16 (64: 1.05x, 256:
#: 1.04x; 8 alternating rounds each in one process, 2026-12-06, AMD EPYC 2 vCPUs); int8 ~1.03x
_ROWS_PER_TASK = 16
_DOWN_ROWS_PER_TASK = 128


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _moe_layer(x, kinds, addrs, pair_ptr, pair_token, pair_weight, inter, group, out, pf):
    """out [N, H] += the routed experts' SwiGLU outputs for tokens x [N, H] (float32).
    Expert k (of K) has kind kinds[k] and its gate, up, down planes at addrs[k, tensor, plane]
    (tensor 0 gate [I, H], 1 up [I, H], 2 down [H, I]; plane 0 codes, 1 scales, 2 mins); its
    pairs are pair_ptr[k]..pair_ptr[k+1]: the token of each and its routing weight."""
    n, hidden = x.shape
    k_experts = kinds.shape[0]
    pairs = pair_token.shape[0]
    int4 = (kinds == 1).any()
    int16 = _S8_INT16 and (group == 32 or group == 64) and (kinds == 0).any()
    xe, xo, xs, xsum = _quantized_activations(x, group, int4)
    xq, xqs = _int16_activations(x, group, int16)
    h = np.empty((pairs, inter), np.float32)                      # [P, I] SwiGLU per (expert, token)
    blocks = (inter + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(k_experts * blocks):
        k, blk = task // blocks, task % blocks
        kind = kinds[k]
        sums = np.empty(hidden // group, np.int32)
        for i in range(blk * _ROWS_PER_TASK, min(inter, (blk + 1) * _ROWS_PER_TASK)):
            for p in range(pair_ptr[k], pair_ptr[k + 1]):
                t = pair_token[p]
                gate = _row_dot(kind, addrs[k, 0, 0], addrs[k, 0, 1], addrs[k, 0, 2], i, hidden, group, x,
                                xe, xo, xs, xsum, xq, xqs, t, sums, pf)
                up = _row_dot(kind, addrs[k, 1, 0], addrs[k, 1, 1], addrs[k, 1, 2], i, hidden, group, x,
                              xe, xo, xs, xsum, xq, xqs, t, sums, pf)
                h[p, i] = gate / (np.float32(1) + np.exp(-gate)) * up
    he, ho, hs, hsum = _quantized_activations(h, group, int4)
    hq, hqs = _int16_activations(h, group, int16)
    out_blocks = (hidden + _DOWN_ROWS_PER_TASK - 1) // _DOWN_ROWS_PER_TASK
    for blk in prange(out_blocks):      # each task owns its output columns: no two write one
        sums = np.empty(inter // group, np.int32)
        # expert by expert over the task's rows: one sequential run of each down matrix at a time
        # (row by row across all experts, the reads jumped between k matrices every row)
        for k in range(k_experts):
            for r in range(blk * _DOWN_ROWS_PER_TASK, min(hidden, (blk + 1) * _DOWN_ROWS_PER_TASK)):
                for p in range(pair_ptr[k], pair_ptr[k + 1]):
                    y = _row_dot(kinds[k], addrs[k, 2, 0], addrs[k, 2, 1], addrs[k, 2, 2], r, inter, group, h,
                                 he, ho, hs, hsum, hq, hqs, p, sums, pf)
                    out[pair_token[p], r] += pair_weight[p] * y


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _linear(x, kind, codes_addr, scales_addr, mins_addr, rows, group, out, pf):
    """out [N, rows] = x [N, cols] · Wᵀ for one quantized W [rows, cols] (float32 in and out)."""
    n, cols = x.shape
    xe, xo, xs, xsum = _quantized_activations(x, group, kind == 1)
    xq, xqs = _int16_activations(x, group, _S8_INT16 and kind == 0 and (group == 32 or group == 64))
    blocks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for blk in prange(blocks):
        sums = np.empty(cols // group, np.int32)
        for r in range(blk * _ROWS_PER_TASK, min(rows, (blk + 1) * _ROWS_PER_TASK)):
            for t in range(n):
                out[t, r] = _row_dot(kind, codes_addr, scales_addr, mins_addr, r, cols, group, x,
                                     xe, xo, xs, xsum, xq, xqs, t, sums, pf)


#: njit's `parallel` for a cached kernel that calls _moe_layer or _linear (decode_moe, decode_layer)
#: and has no parallel loop of its own. Compiled without it, such a caller crashed (SIGSEGV) when
#: loaded from Numba's cache in a later process, if the parallel kernel it calls had come from the
#: cache of yet another process when the caller was compiled (a process that ran only _moe_layer,
#: say the vLLM plug or bench/quant_kernels.py, then a decode, then another decode: Numba issues
#: #4807 and #8578). Compiled as a parallel function the caller's cached code is whole. Only the
#: prange option is on: the caller's own array expressions stay serial (a parallel region each,
#: for arrays of a few thousand floats, would cost more than it saves).
CALLS_PARALLEL = {"prange": True, "numpy": False, "comprehension": False, "reduction": False, "setitem": False,
                  "stencil": False, "inplace_binop": False, "fusion": False}


#: the files whose functions and intrinsics the cached kernels of compute/ inline or call
KERNEL_SOURCES = ("row_dots.py", "quant_kernels.py", "decode_ops.py", "decode_layer.py", "decode_moe.py")


def flush_cached_kernels_on_source_change(kernels: Sequence) -> None:
    """Numba's disk cache keys a kernel by its own file's timestamp and bytecode, not by what it
    inlines or calls from other files (row_dots.py's intrinsics, decode_ops' norm and attention,
    this file's _linear): an update that changes one of those alone would run the kernels as
    compiled before it. A hash of KERNEL_SOURCES is kept beside the kernels' cache (one marker
    per module), and where it differs their cached code is dropped (compiled again on first use)."""
    here = Path(__file__).parent
    module = kernels[0].py_func.__module__.rsplit(".", 1)[-1]
    marker = Path(kernels[0]._cache._cache_path) / f"{module}.sources.sha256"
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in KERNEL_SOURCES)).hexdigest()
    try:
        if marker.exists() and marker.read_text() == digest:
            return
        for k in kernels:
            k._cache.flush()
        marker.write_text(digest)
    except OSError:    # a cache directory we cannot write: Numba caches nothing there either
        pass


flush_cached_kernels_on_source_change((_moe_layer, _linear))


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantKernel:
    """What compute does with one weight type (formats.constants.QUANT_TYPES has the quantized
    types' bytes): `code`, the type's branch in the CPU layer kernel (_row_dot); `dequantize`,
    its (codes, scales, mins) -> weights kernel (compute/dequant.py, CPU and CUDA), None for a
    type that is its own weights (bf16); `gemm_rows`, from how many token rows torch's GEMM on
    the (dequantized) weights beats the kernel, whose dot per row and token does the work of a
    GEMV per row (prefill and batches: kernel_takes)."""
    name: str
    code: int
    dequantize: Optional[Callable[..., torch.Tensor]]
    gemm_rows: int


#: gemm_rows, measured on the development machine (AMD EPYC, 2 threads, medians of 20 calls, an
#: expert's [768, 2048] matrix from memory; kernel against dequantize to bf16 + F.linear, after the
#: CPU dequantizer got 4-5x faster, 2026-12-06; it got 1.2x more since, which would move them a
#: little lower): int8 at 8 rows 0.32 ms against 0.38, at 16 0.61 against 0.44; int4 at 16 rows
#: 0.39 against 0.52, at 32 0.77 against 0.63 (the MoE path adds ~0.07 ms of torch calls per
#: expert on the GEMM side); bf16 [768, 2048] at 4 rows 330 us against torch's 226, at 2 rows 184
#: against 210
QUANT_KERNELS = {
    "int8": QuantKernel("int8", 0, dequantize, gemm_rows=12),
    "int4": QuantKernel("int4", 1, dequantize, gemm_rows=28),
    # a lossless bf16 store's experts: the layer kernel saves the six torch calls per expert and
    # reads with the same prefetch (torch's bf16 GEMV reads as fast, the calls around it do not)
    "bf16": QuantKernel("bf16", 2, None, gemm_rows=3),
    # an FP8 checkpoint's experts, kept as its bytes: float8 codes times float activations, like
    # int8's ([768, 2048] block 128, e4m3: at 4 rows 0.35 ms against 0.65, at 6 0.48 against 0.46;
    # e5m2 decodes the same way)
    "fp8e4m3": QuantKernel("fp8e4m3", 3, dequantize, gemm_rows=6),
    "fp8e5m2": QuantKernel("fp8e5m2", 4, dequantize, gemm_rows=6),
    # an MXFP4 checkpoint's experts (GPT-OSS), kept as its bytes: each code decoded from its bits
    # times the float activations ([768, 2048] from memory, medians of 20 calls, 2026-12-06: 1 row
    # 0.36 ms against 0.85 for dequantize + GEMM, 2 rows 0.66 against 0.78, 3 rows 0.96 against
    # 0.80; the table lookup it replaced took 0.71 ms a row and lost from 2 rows)
    "mxfp4": QuantKernel("mxfp4", 5, dequantize, gemm_rows=3),
}

#: what the layer kernel multiplies: a quantized tensor, or a plain bf16 matrix
KernelWeight = Union[QuantizedTensor, torch.Tensor]


def _kind(w: KernelWeight) -> Optional[str]:
    if isinstance(w, QuantizedTensor):
        return w.spec.kind
    return "bf16" if w.dtype == torch.bfloat16 else None


def _addresses(w: KernelWeight) -> tuple[int, int, int]:
    return w.addresses() if isinstance(w, QuantizedTensor) else (w.data_ptr(), 0, 0)


def _kernel_type(w: KernelWeight) -> Optional[tuple[str, Optional[int]]]:
    """(type name, group size; None for bf16) of a matrix the CPU kernels read in place
    (cpu_kernel_fits, any group), else None."""
    if isinstance(w, QuantizedTensor):
        return (w.spec.kind, w.spec.group) if w.spec.kind in QUANT_KERNELS and w.is_cpu and w.contiguous else None
    if w.dtype == torch.bfloat16 and w.is_cpu and w.dim() == 2 and w.is_contiguous():
        return "bf16", None
    return None


def cpu_kernel_fits(w: KernelWeight, group: Optional[int] = None) -> bool:
    """Whether the CPU kernels read `w` in place: on the CPU, a type of the table, contiguous
    rows (the stored layout always is), and for a quantized `w` (when given) the batch's group size."""
    t = _kernel_type(w)
    return t is not None and (group is None or t[1] is None or t[1] == group)


def kernel_takes(w: KernelWeight, rows: int) -> bool:
    """Whether the CPU kernels multiply `rows` token rows by `w`: they read it in place
    (cpu_kernel_fits) and there are fewer rows than its type's gemm_rows."""
    return cpu_kernel_fits(w) and rows < QUANT_KERNELS[_kind(w)].gemm_rows


def quant_linear(x: torch.Tensor, w: KernelWeight) -> torch.Tensor:
    """x [n, in] · Wᵀ -> [n, out] in x's dtype, for W [out, in] quantized (any device) or a bf16
    matrix: the CPU kernel where it takes them (kernel_takes), else torch's GEMM on W dequantized
    to x's dtype."""
    if not kernel_takes(w, x.numel() // x.shape[-1]):
        return F.linear(x, w.dequantize(QUANT_KERNELS[w.spec.kind].dequantize, x.dtype)
                        if isinstance(w, QuantizedTensor) else w.to(x.dtype))
    return _kernel_linear(x, w)


@dataclass(frozen=True)
class LinearPlan:
    """What `_linear` needs of one weight the CPU kernels read in place (cpu_kernel_fits): its
    kernel code, plane addresses, shape, group and its type's gemm_rows. Worked out once per
    module (plan_linear), not at every decode step: the dense layers run several a token, and the
    per-call checks cost more than the kernel on a small matrix (a [128, 2048] router: 7 us
    kernel, 27 us a call before). Valid while the weight's memory, type and layout are."""
    code: int
    addresses: tuple[int, int, int]
    rows: int
    cols: int
    group: int
    gemm_rows: int


def plan_linear(w: KernelWeight) -> Optional[LinearPlan]:
    """The LinearPlan of `w`, None where the CPU kernels do not read it in place."""
    if not cpu_kernel_fits(w):
        return None
    rows, cols = w.shape
    addresses = _addresses(w)
    group = w.spec.group if isinstance(w, QuantizedTensor) else DOT_CHUNK   # bf16: sizes only the scratch
    kernel = QUANT_KERNELS[_kind(w)]
    return LinearPlan(kernel.code, addresses, rows, cols, group, kernel.gemm_rows)


def _kernel_linear(x: torch.Tensor, w: KernelWeight, plan: Optional[LinearPlan] = None) -> torch.Tensor:
    """quant_linear's kernel call, for a `w` and a row count that kernel_takes (`plan`: w's, when
    the caller holds it)."""
    plan = plan or plan_linear(w)
    xf = x.detach().reshape(-1, plan.cols)   # inference only: no autograd through the kernels
    xf = xf.float() if xf.dtype != torch.float32 else xf.contiguous()
    out = np.empty((xf.shape[0], plan.rows), np.float32)
    with _PARALLEL_LOCK:
        _linear(xf.numpy(), plan.code, *plan.addresses, plan.rows, plan.group, out, PREFETCH_BYTES)
    return torch.from_numpy(out).to(x.dtype).view(*x.shape[:-1], plan.rows)


def _held_plan(module: torch.nn.Module, key: tuple, weight: Callable[[], KernelWeight]) -> Optional[LinearPlan]:
    """The module's LinearPlan, worked out (from weight()) again when `key` (what identifies the
    weight's memory, type and layout now) differs from the one it was worked out for (after to(),
    a load, rebind_rows); None where the kernels do not read the weight."""
    held = module.__dict__.get("_plan")
    if held is None or held[0] != key:
        held = key, plan_linear(weight())
        module.__dict__["_plan"] = held
    return held[1]


#: what the layer kernel needs to know of one SwiGLU expert: (type name, group size or None
#: for bf16, intermediate width I, hidden width H)
ExpertLayout = tuple[str, Optional[int], int, int]


def expert_layout(gate: KernelWeight, up: KernelWeight, down: KernelWeight) -> Optional[ExpertLayout]:
    """The layout of an expert `_moe_layer` reads in place: its three matrices one type of the
    table on the CPU (cpu_kernel_fits), gate and up [I, H], down [H, I], and a quantized type's
    group dividing both widths; None otherwise."""
    if type(gate) is QuantizedTensor and type(up) is QuantizedTensor and type(down) is QuantizedTensor:
        # what the tiers hand out for every routed expert of every token: decided by specs and shapes
        return _quantized_layout(gate.spec, up.spec, down.spec, gate.shape, up.shape, down.shape,
                                 gate.is_cpu and up.is_cpu and down.is_cpu and gate.contiguous and up.contiguous
                                 and down.contiguous)
    return _expert_layout(gate, up, down)


@functools.lru_cache(maxsize=256)
def _quantized_layout(gate_spec, up_spec, down_spec, gate_shape, up_shape, down_shape, in_place: bool
                      ) -> Optional[ExpertLayout]:
    if not in_place or not gate_spec == up_spec == down_spec or gate_spec.kind not in QUANT_KERNELS:
        return None
    return _swiglu_layout(gate_spec.kind, gate_spec.group, gate_shape, up_shape, down_shape)


def _expert_layout(gate: KernelWeight, up: KernelWeight, down: KernelWeight) -> Optional[ExpertLayout]:
    t = _kernel_type(gate)
    if t is None or _kernel_type(up) != t or _kernel_type(down) != t:
        return None
    return _swiglu_layout(*t, gate.shape, up.shape, down.shape)


def _swiglu_layout(kind: str, group: Optional[int], gate_shape, up_shape, down_shape) -> Optional[ExpertLayout]:
    # the shapes of one SwiGLU expert, gate and up [I, H], down [H, I], and a quantized type's
    # group dividing both widths
    inter, hidden = gate_shape
    if tuple(up_shape) != (inter, hidden) or tuple(down_shape) != (hidden, inter):
        return None
    if group is not None and (inter % group or hidden % group):
        return None
    return kind, group, inter, hidden


@dataclass
class RoutedExpert:
    """One expert of a batch: its gate, up and down matrices, the token rows routed to it and
    each row's routing weight; `layout` (expert_layout) is worked out once, here."""
    gate: KernelWeight
    up: KernelWeight
    down: KernelWeight
    rows: Sequence[int]
    weights: Sequence[float]
    layout: Optional[ExpertLayout] = field(init=False)

    def __post_init__(self):
        self.layout = expert_layout(self.gate, self.up, self.down)

    @property
    def kernel_takes(self) -> bool:
        """Whether the layer kernel computes this expert: it reads it in place and it has fewer
        token rows than its type's gemm_rows (more take torch's GEMM: prefill)."""
        return self.layout is not None and len(self.rows) < QUANT_KERNELS[self.layout[0]].gemm_rows


def _layer_group(layouts: Sequence[ExpertLayout]) -> Optional[int]:
    """The group size the quantized experts of a batch share, None if they differ; with none
    quantized, one that divides both widths (the kernel's scratch is sized by it; bf16 has no groups)."""
    groups = {lay[1] for lay in layouts} - {None}
    if not groups:
        return math.gcd(*layouts[0][2:])
    return groups.pop() if len(groups) == 1 else None


def layouts_fit(layouts: Sequence[Optional[ExpertLayout]]) -> bool:
    """Whether `_moe_layer` computes experts of these layouts in one call: each has one (expert_layout),
    all of one SwiGLU shape, the quantized ones sharing one group size."""
    if not layouts or any(lay is None for lay in layouts):
        return False
    return len({lay[2:] for lay in layouts}) == 1 and _layer_group(layouts) is not None


def moe_layer_fits(experts: Sequence[RoutedExpert]) -> bool:
    """layouts_fit for RoutedExperts."""
    return layouts_fit([e.layout for e in experts])


def moe_layer(x: torch.Tensor, experts: Sequence[RoutedExpert], out: torch.Tensor) -> None:
    """out [N, H] (float32, contiguous, CPU) += Σ over `experts` of weight · down(silu(gate(x)) · up(x))
    for each expert's rows of x [N, H], in one kernel call (moe_layer_fits must hold)."""
    addrs = [[a for m in (e.gate, e.up, e.down) for a in _addresses(m)] for e in experts]
    _layer_call(x, [e.layout for e in experts], addrs, [e.rows for e in experts], [e.weights for e in experts], out)


def _layer_call(x: torch.Tensor, layouts: Sequence[ExpertLayout], addrs, rows: Sequence[Sequence[int]],
                weights: Sequence[Sequence[float]], out: torch.Tensor) -> None:
    # addrs [K, 9]: per expert, the (codes, scales, mins) addresses of gate, up and down
    kinds = np.array([QUANT_KERNELS[lay[0]].code for lay in layouts], np.int64)
    pair_ptr = np.array([0, *itertools.accumulate(len(r) for r in rows)], np.int64)
    pair_token = np.array([t for r in rows for t in r], np.int64)
    pair_weight = np.array([w for ws in weights for w in ws], np.float32)
    xf = x.detach().float().contiguous()
    with _PARALLEL_LOCK:
        _moe_layer(xf.numpy(), kinds, np.asarray(addrs, np.int64).reshape(-1, 3, 3), pair_ptr, pair_token,
                   pair_weight, layouts[0][2], _layer_group(layouts), out.numpy(), PREFETCH_BYTES)


@functools.lru_cache(maxsize=4096)
def held_layout(region, quantized: bool, names: tuple[str, str, str]
                ) -> Optional[tuple[ExpertLayout, tuple[int, ...]]]:
    """For an expert a CPU store's slot holds (storage.store.HeldExpert: `region`, in stored form
    when `quantized`), what `_moe_layer` needs to read it in place: its ExpertLayout and the byte
    offsets from the slot's start of the gate, up and down planes, nine in a row (codes, scales,
    mins of each; -1 for a plane it has not; flat: a decode step turns eight experts' into
    addresses in 7 us this way, 20 as nested tuples). None where the kernel does not read it so
    (a type outside the table, a transposed matrix, shapes that are not one SwiGLU expert, a
    missing name)."""
    from ..formats.quantized import plane_layout
    from ..storage.arena import decoded_offsets
    if quantized:
        found = {name: (spec, shape, offsets) for name, spec, shape, offsets, transposed, _ in plane_layout(region)
                 if spec is not None and not transposed}
        if any(n not in found for n in names):
            return None
        (gs, gsh, _), (us, ush, _), (ds, dsh, _) = (found[n] for n in names)
        layout = _quantized_layout(gs, us, ds, tuple(gsh), tuple(ush), tuple(dsh), True)
        planes = tuple(-1 if o is None else o for n in names for o in found[n][2])
        return None if layout is None else (layout, planes)
    tensors = {t.name: (t, off) for t, off in zip(region.tensors, decoded_offsets(region))}
    if any(n not in tensors or tensors[n][0].dtype != "bf16" or len(tensors[n][0].shape) != 2 for n in names):
        return None
    layout = _swiglu_layout("bf16", None, *(tensors[n][0].shape for n in names))
    return None if layout is None else (layout, tuple(o for n in names for o in (tensors[n][1], -1, -1)))


def moe_layer_at(x: torch.Tensor, held: Sequence[tuple[ExpertLayout, tuple, int]], rows: Sequence[Sequence[int]],
                 weights: Sequence[Sequence[float]], out: torch.Tensor) -> None:
    """moe_layer for experts read where a store's slots hold them: per expert (its held_layout's
    layout and plane offsets, the slot's address), its token rows of x and their routing weights.
    layouts_fit must hold; the slots must stay pinned for the call (Store.hold_hits)."""
    addrs = np.array([[0 if o < 0 else base + o for o in planes] for _, planes, base in held], np.int64)
    _layer_call(x, [lay for lay, _, _ in held], addrs, rows, weights, out)


# ---- dense layers held quantized ----------------------------------------------------------------


class QuantLinear(torch.nn.Module):
    """nn.Linear's forward over a weight held quantized (codes and fp16 planes as buffers this
    module owns), multiplied by quant_linear: attention projections, shared experts and lm_head of
    an int store, which are otherwise the largest bf16 read of a token (issue 22)."""

    def __init__(self, w: QuantizedTensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.spec, self.shape = w.spec, w.shape
        self.register_buffer("codes", w.codes)
        self.register_buffer("scales", w.scales)
        self.register_buffer("mins", w.mins)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> QuantizedTensor:
        return QuantizedTensor(self.spec, self.shape, self.codes, self.scales, self.mins)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def plan_key(self) -> tuple:
        """What identifies the weight's memory and layout now (quant_kernels._held_plan)."""
        b = self._buffers          # not the attributes: a module's __getattr__ costs ~1 us a buffer
        codes, mins = b["codes"], b["mins"]
        return (codes.data_ptr(), b["scales"].data_ptr(), 0 if mins is None else mins.data_ptr(),
                codes.is_contiguous(), self.spec, self.shape)

    def plan(self) -> Optional[LinearPlan]:
        """The kernel call's plan for this weight (worked out again when its planes move)."""
        return _held_plan(self, self.plan_key(), lambda: self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan()
        if plan is not None and x.numel() // plan.cols < plan.gemm_rows:
            y = _kernel_linear(x, None, plan)
        else:
            y = quant_linear(x, self.weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.shape[1]} -> {self.shape[0]}, {self.spec.stage}"

    def rebind_rows(self, codes: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor]) -> None:
        """Hold these planes (views of a fused weight's rows: the same values) instead of its own."""
        self.codes, self.scales, self.mins = codes, scales, mins


def quantize_linears(model: torch.nn.Module, kind: str, group: int, skip: Callable[[str], bool]) -> int:
    """Replace every nn.Linear of `model` (CPU) whose name `skip` does not take and whose input width
    is a multiple of `group` by a QuantLinear of its weight quantized to `kind` (the converter's
    quantizer); returns the bytes of weights that no longer have a float copy."""
    from ..formats.quantized import quantize_matrix
    saved = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or skip(full) or child.in_features % group:
                continue
            w = child.weight.detach()
            q = quantize_matrix(w.float(), kind, group)
            setattr(module, child_name, QuantLinear(q, None if child.bias is None else child.bias.detach()))
            saved += w.numel() * w.element_size() - q.nbytes
    return saved


class Bf16DecodeLinear(torch.nn.Linear):
    """An nn.Linear over a bf16 CPU weight whose decode steps (fewer token rows than bf16's
    gemm_rows: a [4096, 2048] matrix 536 us against torch's bf16 GEMV's 1063 at 1 row, 729 against
    913 at 2, 1311 against 942 at 4) take the layer kernels' bf16 dot, and everything else torch's
    GEMM: the dense layers of a lossless bf16 store, which at decode read as many bytes as its
    routed experts, and the routers. Same parameters and state-dict names as the nn.Linear it
    replaces."""

    def plan_key(self) -> tuple:
        """What identifies the weight's memory and layout now (quant_kernels._held_plan)."""
        w = self._parameters["weight"]     # not the attribute: a module's __getattr__ costs ~1 us
        return w.data_ptr(), w.dtype, w.shape, w.stride()

    def plan(self) -> Optional[LinearPlan]:
        """The kernel call's plan for this weight (worked out again when it moves or changes)."""
        return _held_plan(self, self.plan_key(), lambda: self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan()
        if plan is None or x.numel() // self.in_features >= plan.gemm_rows:
            return super().forward(x)
        y = _kernel_linear(x, None, plan)
        return y + self.bias if self.bias is not None else y


def linear_plan(module: torch.nn.Module) -> Optional[LinearPlan]:
    """The kernel plan of a linear layer whose weight the CPU kernels read in place (a QuantLinear
    or Bf16DecodeLinear that plans one), else None."""
    return module.plan() if isinstance(module, (QuantLinear, Bf16DecodeLinear)) else None


def kernel_takes_rows(module: torch.nn.Module, rows: int) -> bool:
    """Whether `module` (a linear layer) multiplies `rows` token rows in the CPU kernel: one
    QuantLinear or Bf16DecodeLinear whose weight the kernel reads in place, fewer rows than its
    type's gemm_rows. The kernel takes each row as it takes one alone (the same values), so a
    caller may join rows of different sequences into one call, which reads the weight once."""
    plan = linear_plan(module)
    return plan is not None and rows < plan.gemm_rows


def bf16_decode_linears(model: torch.nn.Module, skip: Callable[[str], bool]) -> int:
    """Turn every nn.Linear of `model` with a contiguous bf16 CPU weight whose input width is a
    multiple of the kernel's 64-weight chunk (narrower ones would take its scalar loop) into a
    Bf16DecodeLinear, unless `skip` takes its name; returns how many."""
    n = 0
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (type(module) is torch.nn.Linear and not skip(name) and w.dtype == torch.bfloat16 and w.device.type == "cpu"
                and w.is_contiguous() and module.in_features % DOT_CHUNK == 0):
            module.__class__ = Bf16DecodeLinear
            n += 1
    return n



def fuse_rows(linears: Sequence[torch.nn.Module]) -> Optional[torch.nn.Module]:
    """One module whose output is `linears`' outputs side by side, their weights' rows stacked:
    the q, k and v projections of one attention, which read the same input. At decode that is one
    kernel call instead of three, and the small k and v matrices ([512, 2048] on the bench model:
    9-13 GB/s alone against 18-26 for a [4096, 2048] one, the per-call cost) read at the large
    one's speed. The linears are rebound to row views of the fused weight, so there is no second
    copy and their names and state-dict keys stay the checkpoint's. None, and nothing changed,
    unless all are QuantLinear of one spec or all nn.Linear (or Bf16DecodeLinear) of one class,
    dtype and device, with one input width and all or none with a bias."""
    first = linears[0]
    if len(linears) < 2 or any(type(m) is not type(first) for m in linears):
        return None
    biased = [m.bias is not None for m in linears]
    if any(biased) != all(biased):
        return None
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in linears])
    if isinstance(first, QuantLinear):
        ws = [m.weight for m in linears]
        if any(w.spec != ws[0].spec or w.shape[1] != ws[0].shape[1] or (w.mins is None) != (ws[0].mins is None)
               or w.device != ws[0].device for w in ws):
            return None
        planes = [torch.cat([getattr(w, n) for w in ws]) if getattr(ws[0], n) is not None else None
                  for n in ("codes", "scales", "mins")]
        fused = QuantLinear(QuantizedTensor(ws[0].spec, (sum(w.shape[0] for w in ws), ws[0].shape[1]), *planes), bias)
        start = 0
        for m, w in zip(linears, ws):
            m.rebind_rows(*(p[start:start + w.shape[0]] if p is not None else None for p in planes))
            start += w.shape[0]
        return fused
    if not isinstance(first, torch.nn.Linear) or any(
            m.weight.dtype != first.weight.dtype or m.weight.device != first.weight.device
            or m.in_features != first.in_features for m in linears):
        return None
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = torch.nn.Linear(first.in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    fused.__class__ = type(first)
    start = 0
    for m in linears:
        rows = m.out_features
        m.weight = torch.nn.Parameter(weight[start:start + rows], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return fused
