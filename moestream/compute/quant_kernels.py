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

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from ..formats.quantized import QuantizedTensor
from .dequant import _PARALLEL_LOCK, dequantize

# ---- raw addresses and fp16 bits in Numba ---------------------------------------------------


def _pointer_intrinsic(element):
    @intrinsic
    def to_pointer(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None
        sig = types.CPointer(element)(addr)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(element)))
        return sig, codegen
    return to_pointer


_i8_ptr = _pointer_intrinsic(types.int8)
_u16_ptr = _pointer_intrinsic(types.uint16)


@intrinsic
def _bits_to_f32(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32
                               else builder.zext(args[0], ir.IntType(32)) if bits.bitwidth < 32 else args[0],
                               ir.FloatType())
    return sig, codegen


@njit(inline="always")
def _f16(h):
    """fp16 bit pattern -> float32, branch-free for finite values (subnormals included): the
    exponent and mantissa shifted into float32's place and rebiased by a multiply by 2**112."""
    mag = _bits_to_f32((np.uint32(h) & np.uint32(0x7FFF)) << np.uint32(13)) * np.float32(5.192296858534828e33)
    return -mag if np.uint32(h) & np.uint32(0x8000) else mag


# ---- 64-element dot products in LLVM vector IR ---------------------------------------------------
# Numba's scalar loops over codes read through raw pointers vectorize poorly (4-7 GB/s of weights,
# 1.6 for int8 times floats, against ~13-17 GB/s of memory read on the development machine).
# Written as one vector load, widen, multiply and horizontal add, LLVM vectorizes them anywhere;
# for int4 on a CPU with AVX512-VNNI (or AVX512BW) the nibbles and the int8 activations go to
# vpdpbusd (vpmaddubsw), unsigned codes times signed activations, 64 at a time
# (bench/quant_kernels.py).
DOT_CHUNK = 64


def _declare(builder, name: str, ret, params):
    mod = builder.module
    fn = mod.globals.get(name)
    return fn if fn is not None else ir.Function(mod, ir.FunctionType(ret, params), name)


def _load(builder, addr, n: int):
    vt = ir.VectorType(ir.IntType(8), n)
    return builder.load(builder.inttoptr(addr, vt.as_pointer()), align=1)


def _reduce_add(builder, v, n: int):
    return builder.call(_declare(builder, f"llvm.vector.reduce.add.v{n}i32", ir.IntType(32),
                                 [ir.VectorType(ir.IntType(32), n)]), [v])


def _float_dot_intrinsic(widen):
    """An intrinsic (w_addr, x_addr) -> Σ w[j]·x[j] over 64 weights and 64 float32 activations at
    two addresses (float32; the sum in any order), the weights loaded and widened to float32 by
    widen(builder, w_addr, <64 x float>)."""
    @intrinsic
    def dot(typingctx, w_addr, x_addr):
        sig = types.float32(types.intp, types.intp)

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            vf = ir.VectorType(f32, DOT_CHUNK)
            x = builder.load(builder.inttoptr(args[1], vf.as_pointer()), align=4)
            p = builder.fmul(widen(builder, args[0], vf), x, flags=("fast",))
            red = _declare(builder, f"llvm.vector.reduce.fadd.v{DOT_CHUNK}f32", f32, [f32, vf])
            return builder.call(red, [ir.Constant(f32, 0.0), p], fastmath=("reassoc",))
        return sig, codegen
    return dot


def _widen_s8(builder, addr, vf):
    return builder.sitofp(_load(builder, addr, DOT_CHUNK), vf)


def _widen_bf16(builder, addr, vf):
    # a bf16 is the top half of a float32: widening is a shift
    v16, v32 = ir.VectorType(ir.IntType(16), DOT_CHUNK), ir.VectorType(ir.IntType(32), DOT_CHUNK)
    bits = builder.load(builder.inttoptr(addr, v16.as_pointer()), align=2)
    return builder.bitcast(builder.shl(builder.zext(bits, v32), ir.Constant(v32, [16] * DOT_CHUNK)), vf)


#: int8 weights, and bf16 weights, times float32 activations: 64 at a time
_dot_s8_f32 = _float_dot_intrinsic(_widen_s8)
_dot_bf16_f32 = _float_dot_intrinsic(_widen_bf16)


def _u4_intrinsic(isa: str):
    """Σ lo(c[j])·e[j] + hi(c[j])·o[j] over 32 bytes of int4 codes c (element 2j in the low nibble)
    and the 32 even (e) and odd (o) int8 activations: 64 weights, int32."""
    @intrinsic
    def dot(typingctx, c_addr, e_addr, o_addr):
        sig = types.int32(types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            half = DOT_CHUNK // 2
            v8 = ir.VectorType(ir.IntType(8), half)
            c, e, o = (_load(builder, a, half) for a in args)
            lo = builder.and_(c, ir.Constant(v8, [15] * half))
            hi = builder.lshr(c, ir.Constant(v8, [4] * half))
            if isa == "generic":
                wide = ir.VectorType(ir.IntType(32), half)
                p = builder.add(builder.mul(builder.zext(lo, wide), builder.sext(e, wide)),
                                builder.mul(builder.zext(hi, wide), builder.sext(o, wide)))
                return _reduce_add(builder, p, half)
            cat = ir.Constant(ir.VectorType(ir.IntType(32), DOT_CHUNK), list(range(DOT_CHUNK)))
            a, b = builder.shuffle_vector(lo, hi, cat), builder.shuffle_vector(e, o, cat)
            i32x16, i16x32 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.IntType(16), 32)
            if isa == "avx512vnni":
                f = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", i32x16, [i32x16] * 3)
                acc = builder.call(f, [ir.Constant(i32x16, [0] * 16), builder.bitcast(a, i32x16),
                                       builder.bitcast(b, i32x16)])
            else:   # avx512bw: u8·s8 pairs to int16 (15·127·2 cannot saturate), then pairs to int32
                v64 = ir.VectorType(ir.IntType(8), DOT_CHUNK)
                p16 = builder.call(_declare(builder, "llvm.x86.avx512.pmaddubs.w.512", i16x32, [v64, v64]), [a, b])
                acc = builder.call(_declare(builder, "llvm.x86.avx512.pmaddw.d.512", i32x16, [i16x32, i16x32]),
                                   [p16, ir.Constant(i16x32, [1] * 32)])
            return _reduce_add(builder, acc, 16)
        return sig, codegen
    return dot


#: how far ahead of the codes being multiplied the kernels ask for the weights (bytes, in the same
#: matrix). The hardware prefetcher alone kept a core's loads short of memory's bandwidth: on the
#: development machine a resident int4 store decoded 1.19x and an int8 one 1.32x faster with
#: 2-4 KiB of software prefetch (medians of 10 rounds alternating 0, 2, 4, 6 and 8 KiB in one
#: process; bench/quant_kernels.py has the kernel with and without). The kernels take it as an
#: argument so that a benchmark can sweep it. Near a matrix's end the hint points past it: a
#: prefetch never faults (x86 PREFETCHh, AArch64 PRFM), it only fetches a line nobody reads.
PREFETCH_BYTES = 4096


@intrinsic
def _prefetch(typingctx, addr):
    """A read prefetch of the cache line at `addr` into all cache levels (llvm.prefetch)."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        f = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, i32, i32, i32])
        builder.call(f, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


#: the int4 dot of each instruction set; U4_ISA is the one this process's kernels use: the host's
#: best, "generic" where Numba compiles for a named CPU (NUMBA_CPU_NAME, e.g. a portable cache)
U4_DOTS = {isa: _u4_intrinsic(isa) for isa in ("avx512vnni", "avx512bw", "generic")}


def _host_u4_isa() -> str:
    import numba
    from llvmlite import binding
    if numba.config.CPU_NAME:
        return "generic"
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:
        return "generic"
    for isa in ("avx512vnni", "avx512bw"):
        if features.get(isa) and features.get("avx512f"):
            return isa
    return "generic"


U4_ISA = _host_u4_isa()
_dot_u4 = U4_DOTS[U4_ISA]


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


# ---- one row of W against one row of activations ---------------------------------------------
# kind 0: int8 (codes int8, scales); kind 1: int4 (two codes a byte, low nibble first; scales,
# mins); kind 2: bf16 (the weights themselves at the codes' address; no planes, no groups)

@njit(inline="always")
def _row_dot(kind, codes_addr, scales_addr, mins_addr, row, cols, group, xf, xe, xo, xs, xsum, t, sums, pf):
    # int8: float activations xf. int4: the integer sums of all groups first, into `sums`
    # (scratch, >= cols / group), then the scales, so the float work stays out of the integer
    # loop. Groups of a multiple of DOT_CHUNK take the vector dots; others the scalar loop.
    if kind == 2:
        acc = np.float32(0)
        if cols % DOT_CHUNK == 0:
            w_addr = codes_addr + 2 * row * cols
            x_addr = xf.ctypes.data + 4 * t * cols
            for c in range(cols // DOT_CHUNK):
                off = c * DOT_CHUNK
                if pf:       # a chunk is two cache lines of bf16
                    _prefetch(w_addr + 2 * off + pf)
                    _prefetch(w_addr + 2 * off + pf + 64)
                acc += _dot_bf16_f32(w_addr + 2 * off, x_addr + 4 * off)
        else:
            wb = carray(_u16_ptr(codes_addr + 2 * row * cols), cols)
            xrow = xf[t]
            for j in range(cols):
                acc += _bits_to_f32(np.uint32(wb[j]) << np.uint32(16)) * xrow[j]
        return acc
    ng = cols // group
    sc = carray(_u16_ptr(scales_addr + 2 * row * ng), ng)
    chunks = group // DOT_CHUNK if group % DOT_CHUNK == 0 else 0
    if kind == 0:
        # int8 weights times the float32 activations themselves: exact to the weights' own
        # quantization (int8 activations added a third to the KL on the trained model,
        # bench/mixed_precision.py), and as fast, LLVM widening the codes to floats 16 at a time
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


_ROWS_PER_TASK = 16


@njit(parallel=True, fastmath=True, cache=True)
def _moe_layer(x, kinds, addrs, pair_ptr, pair_token, pair_weight, inter, group, out, pf):
    """out [N, H] += the routed experts' SwiGLU outputs for tokens x [N, H] (float32).
    Expert k (of K) has kind kinds[k] and its gate, up, down planes at addrs[k, tensor, plane]
    (tensor 0 gate [I, H], 1 up [I, H], 2 down [H, I]; plane 0 codes, 1 scales, 2 mins); its
    pairs are pair_ptr[k]..pair_ptr[k+1]: the token of each and its routing weight."""
    n, hidden = x.shape
    k_experts = kinds.shape[0]
    pairs = pair_token.shape[0]
    int4 = (kinds == 1).any()
    xe, xo, xs, xsum = _quantized_activations(x, group, int4)
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
                                xe, xo, xs, xsum, t, sums, pf)
                up = _row_dot(kind, addrs[k, 1, 0], addrs[k, 1, 1], addrs[k, 1, 2], i, hidden, group, x,
                              xe, xo, xs, xsum, t, sums, pf)
                h[p, i] = gate / (np.float32(1) + np.exp(-gate)) * up
    he, ho, hs, hsum = _quantized_activations(h, group, int4)
    out_blocks = (hidden + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for blk in prange(out_blocks):      # each task owns its output columns: no two write one
        sums = np.empty(inter // group, np.int32)
        for r in range(blk * _ROWS_PER_TASK, min(hidden, (blk + 1) * _ROWS_PER_TASK)):
            for k in range(k_experts):
                for p in range(pair_ptr[k], pair_ptr[k + 1]):
                    y = _row_dot(kinds[k], addrs[k, 2, 0], addrs[k, 2, 1], addrs[k, 2, 2], r, inter, group, h,
                                 he, ho, hs, hsum, p, sums, pf)
                    out[pair_token[p], r] += pair_weight[p] * y


@njit(parallel=True, fastmath=True, cache=True)
def _linear(x, kind, codes_addr, scales_addr, mins_addr, rows, group, out, pf):
    """out [N, rows] = x [N, cols] · Wᵀ for one quantized W [rows, cols] (float32 in and out)."""
    n, cols = x.shape
    xe, xo, xs, xsum = _quantized_activations(x, group, kind == 1)
    blocks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for blk in prange(blocks):
        sums = np.empty(cols // group, np.int32)
        for r in range(blk * _ROWS_PER_TASK, min(rows, (blk + 1) * _ROWS_PER_TASK)):
            for t in range(n):
                out[t, r] = _row_dot(kind, codes_addr, scales_addr, mins_addr, r, cols, group, x,
                                     xe, xo, xs, xsum, t, sums, pf)


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantKernel:
    """What compute does with one weight type (formats.constants.QUANT_TYPES has the quantized
    types' bytes): `code`, the type's branch in the CPU layer kernel (_row_dot); `dequantize`,
    its (codes, scales, mins) -> weights kernel (compute/dequant.py, CPU and CUDA), None for a
    type that is its own weights (bf16)."""
    name: str
    code: int
    dequantize: Optional[Callable[..., torch.Tensor]]


QUANT_KERNELS = {
    "int8": QuantKernel("int8", 0, dequantize),
    "int4": QuantKernel("int4", 1, dequantize),
    # a lossless bf16 store's experts: the layer kernel saves the six torch calls per expert and
    # reads with the same prefetch (torch's bf16 GEMV reads as fast, the calls around it do not)
    "bf16": QuantKernel("bf16", 2, None),
}

#: what the layer kernel multiplies: a quantized tensor, or a plain bf16 matrix
KernelWeight = Union[QuantizedTensor, torch.Tensor]


def _kind(w: KernelWeight) -> Optional[str]:
    if isinstance(w, QuantizedTensor):
        return w.spec.kind
    return "bf16" if w.dtype == torch.bfloat16 else None


def _addresses(w: KernelWeight) -> tuple[int, int, int]:
    return w.addresses() if isinstance(w, QuantizedTensor) else (w.data_ptr(), 0, 0)


def cpu_kernel_fits(w: KernelWeight, group: Optional[int] = None) -> bool:
    """Whether the CPU kernels read `w` in place: on the CPU, a type of the table, contiguous
    rows (the stored layout always is), and for a quantized `w` (when given) the batch's group size."""
    if not isinstance(w, QuantizedTensor):
        return w.device.type == "cpu" and _kind(w) in QUANT_KERNELS and w.dim() == 2 and w.is_contiguous()
    return (w.device.type == "cpu" and w.spec.kind in QUANT_KERNELS and w.contiguous
            and (group is None or w.spec.group == group))


def quant_linear(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor:
    """x [n, in] · Wᵀ -> [n, out] in x's dtype, for a quantized W [out, in] (any device)."""
    if not cpu_kernel_fits(w):
        return F.linear(x, w.dequantize(QUANT_KERNELS[w.spec.kind].dequantize, x.dtype))
    rows, cols = w.shape
    xf = x.detach().reshape(-1, cols).float().contiguous()   # inference only: no autograd through the kernels
    out = np.empty((xf.shape[0], rows), np.float32)
    with _PARALLEL_LOCK:
        _linear(xf.numpy(), QUANT_KERNELS[w.spec.kind].code, *_addresses(w), rows, w.spec.group, out, PREFETCH_BYTES)
    return torch.from_numpy(out).to(x.dtype).view(*x.shape[:-1], rows)


@dataclass
class RoutedExpert:
    """One expert of a batch: its gate, up and down matrices, the token rows routed to it and
    each row's routing weight."""
    gate: KernelWeight
    up: KernelWeight
    down: KernelWeight
    rows: Sequence[int]
    weights: Sequence[float]


def _layer_group(experts: Sequence[RoutedExpert]) -> Optional[int]:
    """The group size the quantized experts of a batch share, None if they differ; with none
    quantized, one that divides both widths (the kernel's scratch is sized by it; bf16 has no groups)."""
    groups = {m.spec.group for e in experts for m in (e.gate, e.up, e.down) if isinstance(m, QuantizedTensor)}
    if not groups:
        return math.gcd(*experts[0].gate.shape)
    return groups.pop() if len(groups) == 1 else None


def moe_layer_fits(experts: Sequence[RoutedExpert]) -> bool:
    """Whether `_moe_layer` computes these experts in one call: all on the CPU, of types in the
    table, one type per expert, the quantized ones sharing one group size, the SwiGLU shapes
    gate/up [I, H] and down [H, I]."""
    if not experts:
        return False
    group = _layer_group(experts)
    if group is None:
        return False
    inter, hidden = experts[0].gate.shape
    return all(cpu_kernel_fits(m, group) for e in experts for m in (e.gate, e.up, e.down)) and all(
        _kind(e.gate) == _kind(e.up) == _kind(e.down) for e in experts) and all(
        tuple(e.gate.shape) == tuple(e.up.shape) == (inter, hidden) and tuple(e.down.shape) == (hidden, inter)
        for e in experts) and inter % group == 0 and hidden % group == 0


def moe_layer(x: torch.Tensor, experts: Sequence[RoutedExpert], out: torch.Tensor) -> None:
    """out [N, H] (float32, contiguous, CPU) += Σ over `experts` of weight · down(silu(gate(x)) · up(x))
    for each expert's rows of x [N, H], in one kernel call (moe_layer_fits must hold)."""
    kinds = np.array([QUANT_KERNELS[_kind(e.gate)].code for e in experts], np.int64)
    addrs = np.array([[_addresses(e.gate), _addresses(e.up), _addresses(e.down)] for e in experts], np.int64)
    counts = [len(e.rows) for e in experts]
    pair_ptr = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=pair_ptr[1:])
    pair_token = np.fromiter((r for e in experts for r in e.rows), np.int64, pair_ptr[-1])
    pair_weight = np.fromiter((w for e in experts for w in e.weights), np.float32, pair_ptr[-1])
    inter = experts[0].gate.shape[0]
    xf = x.detach().float().contiguous()
    with _PARALLEL_LOCK:
        _moe_layer(xf.numpy(), kinds, addrs, pair_ptr, pair_token, pair_weight, inter, _layer_group(experts),
                   out.numpy(), PREFETCH_BYTES)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(x, self.weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.shape[1]} -> {self.shape[0]}, {self.spec.stage}"


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
