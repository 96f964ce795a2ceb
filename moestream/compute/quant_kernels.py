"""Matmuls on quantized experts where they lie: y = x · Wᵀ for group-wise int8 and int4 weights
held in their stored form (formats.quantized.QuantizedTensor), without a bf16 copy of W.

The CPU kernels work the way llama.cpp's `ggml_vec_dot_q4_0_q8_0` family does: each row of
activations is quantized to int8 once per group (one fp32 scale per group of the weights' group
size), a group's dot product is an integer multiply-add over codes, and the group's two scales
multiply its integer sum once. For int4 (w = q·s + m) the minimum's share is m · Σx over the group,
Σx taken over the quantized activations.

One call computes a whole MoE layer for a batch of tokens: every routed expert's gate and up
rows, SwiGLU, the activations of the down projection quantized again, then the down rows,
weighted and summed into each token's output. The Python and dispatch cost per expert (six torch
calls and their tensors, more than the expert's matmuls at decode: issue 22) becomes one Numba
call per layer. Experts reach the kernel by address: the Store's slots are scattered over one
arena, and a stacked copy would cost what the held form saves. The caller keeps the tensors
alive for the call.

`QUANT_KERNELS` is the table, keyed by the quant type's name (formats.constants.QUANT_TYPES):
its layer-kernel code, its dequantizer and the types the CPU kernel reads. A new type is one
entry there and one branch in `_row_dot`. Off the CPU (CUDA) each expert is dequantized on the
device (compute/dequant.py's Numba-CUDA kernel) and multiplied by torch: held quantized, the L1
still keeps 3.6x (int4) more experts in the same bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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


_u8_ptr = _pointer_intrinsic(types.uint8)
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


# ---- activations ------------------------------------------------------------------------------


@njit(cache=True)
def _quantize_rows(x, group, xq, xe, xo, xs, xsum):
    """x float32 [N, K] -> int8 codes [N, K] (and split into even/odd elements [N, K/2] for the
    int4 dot), one scale absmax/127 per group [N, K/group], and each group's sum of the quantized
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
                xq[r, j] = q
                if j % 2 == 0:
                    xe[r, j // 2] = q
                else:
                    xo[r, j // 2] = q
            xsum[r, g] = s * np.float32(qsum)


@njit(cache=True)
def _quantized_activations(x, group):
    """(codes, even codes, odd codes, scales, sums) of x float32 [N, K]: _quantize_rows into new arrays."""
    n, k = x.shape
    xq = np.empty((n, k), np.int8)
    xe = np.empty((n, k // 2), np.int8)
    xo = np.empty((n, k // 2), np.int8)
    xs = np.empty((n, k // group), np.float32)
    xsum = np.empty((n, k // group), np.float32)
    _quantize_rows(x, group, xq, xe, xo, xs, xsum)
    return xq, xe, xo, xs, xsum


# ---- one row of W against one row of activations ---------------------------------------------
# kind 0: int8 (codes int8, scales); kind 1: int4 (two codes a byte, low nibble first; scales, mins)

@njit(inline="always")
def _row_dot(kind, codes_addr, scales_addr, mins_addr, row, cols, group, xq, xe, xo, xs, xsum, t, sums):
    # The integer sums of all groups first, into `sums` (scratch, >= cols / group), then the
    # scales: with the float work out of the inner loop LLVM turns it into vpmaddwd over 32
    # codes at a time (measured 2x over one loop doing both: bench/quant_kernels.py)
    ng = cols // group
    sc = carray(_u16_ptr(scales_addr + 2 * row * ng), ng)
    xrow = xq[t]
    if kind == 0:
        w = carray(_i8_ptr(codes_addr + row * cols), cols)
        for g in range(ng):
            wg = w[g * group:(g + 1) * group]
            xg = xrow[g * group:(g + 1) * group]
            s = np.int32(0)
            for j in range(group):
                s += np.int32(wg[j]) * np.int32(xg[j])
            sums[g] = s
        acc = np.float32(0)
        for g in range(ng):
            acc += np.float32(sums[g]) * _f16(sc[g]) * xs[t, g]
        return acc
    half = group // 2
    w4 = carray(_i8_ptr(codes_addr + row * (cols // 2)), cols // 2)
    mn = carray(_u16_ptr(mins_addr + 2 * row * ng), ng)
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
def _moe_layer(x, kinds, addrs, pair_ptr, pair_token, pair_weight, inter, group, out):
    """out [N, H] += the routed experts' SwiGLU outputs for tokens x [N, H] (float32).
    Expert k (of K) has kind kinds[k] and its gate, up, down planes at addrs[k, tensor, plane]
    (tensor 0 gate [I, H], 1 up [I, H], 2 down [H, I]; plane 0 codes, 1 scales, 2 mins); its
    pairs are pair_ptr[k]..pair_ptr[k+1]: the token of each and its routing weight."""
    n, hidden = x.shape
    k_experts = kinds.shape[0]
    pairs = pair_token.shape[0]
    xq, xe, xo, xs, xsum = _quantized_activations(x, group)
    h = np.empty((pairs, inter), np.float32)                      # [P, I] SwiGLU per (expert, token)
    blocks = (inter + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(k_experts * blocks):
        k, blk = task // blocks, task % blocks
        kind = kinds[k]
        sums = np.empty(hidden // group, np.int32)
        for i in range(blk * _ROWS_PER_TASK, min(inter, (blk + 1) * _ROWS_PER_TASK)):
            for p in range(pair_ptr[k], pair_ptr[k + 1]):
                t = pair_token[p]
                gate = _row_dot(kind, addrs[k, 0, 0], addrs[k, 0, 1], addrs[k, 0, 2], i, hidden, group,
                                xq, xe, xo, xs, xsum, t, sums)
                up = _row_dot(kind, addrs[k, 1, 0], addrs[k, 1, 1], addrs[k, 1, 2], i, hidden, group,
                              xq, xe, xo, xs, xsum, t, sums)
                h[p, i] = gate / (np.float32(1) + np.exp(-gate)) * up
    hq, he, ho, hs, hsum = _quantized_activations(h, group)
    out_blocks = (hidden + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for blk in prange(out_blocks):      # each task owns its output columns: no two write one
        sums = np.empty(inter // group, np.int32)
        for r in range(blk * _ROWS_PER_TASK, min(hidden, (blk + 1) * _ROWS_PER_TASK)):
            for k in range(k_experts):
                for p in range(pair_ptr[k], pair_ptr[k + 1]):
                    y = _row_dot(kinds[k], addrs[k, 2, 0], addrs[k, 2, 1], addrs[k, 2, 2], r, inter, group,
                                 hq, he, ho, hs, hsum, p, sums)
                    out[pair_token[p], r] += pair_weight[p] * y


@njit(parallel=True, fastmath=True, cache=True)
def _linear(x, kind, codes_addr, scales_addr, mins_addr, rows, group, out):
    """out [N, rows] = x [N, cols] · Wᵀ for one quantized W [rows, cols] (float32 in and out)."""
    n, cols = x.shape
    xq, xe, xo, xs, xsum = _quantized_activations(x, group)
    blocks = (rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for blk in prange(blocks):
        sums = np.empty(cols // group, np.int32)
        for r in range(blk * _ROWS_PER_TASK, min(rows, (blk + 1) * _ROWS_PER_TASK)):
            for t in range(n):
                out[t, r] = _row_dot(kind, codes_addr, scales_addr, mins_addr, r, cols, group,
                                     xq, xe, xo, xs, xsum, t, sums)


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantKernel:
    """What compute does with one quant type (formats.constants.QUANT_TYPES has its bytes):
    `code`, the type's branch in the CPU layer kernel (_row_dot); `dequantize`, its
    (codes, scales, mins) -> weights kernel (compute/dequant.py, CPU and CUDA)."""
    name: str
    code: int
    dequantize: Callable[..., torch.Tensor]


QUANT_KERNELS = {
    "int8": QuantKernel("int8", 0, dequantize),
    "int4": QuantKernel("int4", 1, dequantize),
}


def _addresses(w: QuantizedTensor) -> tuple[int, int, int]:
    return (w.codes.data_ptr(), w.scales.data_ptr(), w.mins.data_ptr() if w.mins is not None else 0)


def cpu_kernel_fits(w: QuantizedTensor, group: Optional[int] = None) -> bool:
    """Whether the CPU kernels read `w` in place: on the CPU, a type of the table, contiguous
    rows (the stored layout always is), and (when given) the batch's group size."""
    return (w.device.type == "cpu" and w.spec.kind in QUANT_KERNELS and w.codes.is_contiguous()
            and (group is None or w.spec.group == group))


def quant_linear(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor:
    """x [n, in] · Wᵀ -> [n, out] in x's dtype, for a quantized W [out, in] (any device)."""
    if not cpu_kernel_fits(w):
        return F.linear(x, w.dequantize(QUANT_KERNELS[w.spec.kind].dequantize, x.dtype))
    rows, cols = w.shape
    xf = x.reshape(-1, cols).float().contiguous()
    out = np.empty((xf.shape[0], rows), np.float32)
    with _PARALLEL_LOCK:
        _linear(xf.numpy(), QUANT_KERNELS[w.spec.kind].code, *_addresses(w), rows, w.spec.group, out)
    return torch.from_numpy(out).to(x.dtype).view(*x.shape[:-1], rows)


@dataclass
class RoutedExpert:
    """One expert of a batch: its gate, up and down matrices, the token rows routed to it and
    each row's routing weight."""
    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor
    rows: Sequence[int]
    weights: Sequence[float]


def moe_layer_fits(experts: Sequence[RoutedExpert]) -> bool:
    """Whether `_moe_layer` computes these experts in one call: all on the CPU, of types in the
    table, sharing one group size, the SwiGLU shapes gate/up [I, H] and down [H, I]."""
    if not experts:
        return False
    group = experts[0].gate.spec.group
    inter, hidden = experts[0].gate.shape
    return all(cpu_kernel_fits(m, group) for e in experts for m in (e.gate, e.up, e.down)) and all(
        e.gate.shape == e.up.shape == (inter, hidden) and e.down.shape == (hidden, inter) for e in experts) \
        and inter % group == 0 and hidden % group == 0


def moe_layer(x: torch.Tensor, experts: Sequence[RoutedExpert], out: torch.Tensor) -> None:
    """out [N, H] (float32, contiguous, CPU) += Σ over `experts` of weight · down(silu(gate(x)) · up(x))
    for each expert's rows of x [N, H], in one kernel call (moe_layer_fits must hold)."""
    kinds = np.array([QUANT_KERNELS[e.gate.spec.kind].code for e in experts], np.int64)
    addrs = np.array([[_addresses(e.gate), _addresses(e.up), _addresses(e.down)] for e in experts], np.int64)
    counts = [len(e.rows) for e in experts]
    pair_ptr = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=pair_ptr[1:])
    pair_token = np.fromiter((r for e in experts for r in e.rows), np.int64, pair_ptr[-1])
    pair_weight = np.fromiter((w for e in experts for w in e.weights), np.float32, pair_ptr[-1])
    inter = experts[0].gate.shape[0]
    xf = x.float().contiguous()
    with _PARALLEL_LOCK:
        _moe_layer(xf.numpy(), kinds, addrs, pair_ptr, pair_token, pair_weight, inter, experts[0].gate.spec.group,
                   out.numpy())
