"""The small per-token operations of a bf16 decode step on the CPU, each one Numba call instead
of a chain of torch ops: RMSNorm (eight torch ops) and the rotary embedding (seven).

At decode these tensors hold a few thousand values, so each torch op costs its dispatch, not its
arithmetic: on the development machine (AMD EPYC, 2 vCPUs) RMSNorm over 2048 bf16 values took
18 us in torch and 4 us here, a rotary of 32 heads of 128 15 us and 4 us; a Qwen3-MoE layer
runs four norms and two rotaries a token. Both compute what the torch formulas of
models/common.py (and transformers') compute, rounding to bf16 where those round (round to
nearest even, as torch does). The rotary is bit-identical. RMSNorm's sum of squares is taken in
float64 and rounded once to float32, where torch sums float32 lanes; the two agree but where
torch's own sum is off by its last bit: 2 of 3000 random tensors of up to 8000 values had a few
values one bf16 step apart, and hypothesis found one value two steps off (the product with the
weight rounds again) in 27030 (tests/compute/test_decode_ops.py). They take only contiguous bf16
CPU tensors of a few rows and leave everything else to torch.

The kernels read and write through raw addresses: the caller's tensors must stay alive for the
call, which the wrappers here guarantee by holding them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import carray, njit

from .row_dots import _bf16_rne, _bits_to_f32, _f32_to_bits, _u16_ptr

#: at most this many rows (tokens x heads for a per-head norm) take the fused kernels: they run on
#: one core, and beyond a few decode rows torch's multithreaded ops win
MAX_FUSED_ROWS = 256


@njit(inline="always")
def _f32(h):
    return _bits_to_f32(np.uint32(h) << np.uint32(16))


@njit(inline="always")
def _bf16(f):
    # float32 -> bf16 bits, rounded to nearest even as torch rounds; a NaN stays a (quiet) NaN
    b = _f32_to_bits(f)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    return _bf16_rne(f)


@njit(cache=True, nogil=True)
def _rms_norm_bf16(x_addr, w_addr, out_addr, rows, width, eps):
    # out = w * bf16(x * rsqrt(mean(x^2) + eps)); the squares are float32 as torch's, their sum float64
    # (a sequential float32 sum put 3 values in 10000 one bf16 step from torch's lane-wise one)
    w = carray(_u16_ptr(w_addr), width)
    for r in range(rows):
        x = carray(_u16_ptr(x_addr + 2 * r * width), width)
        out = carray(_u16_ptr(out_addr + 2 * r * width), width)
        s = 0.0
        for i in range(width):
            v = _f32(x[i])
            s += np.float64(v * v)
        inv = np.float32(1) / np.sqrt(np.float32(s) / np.float32(width) + np.float32(eps))
        for i in range(width):
            out[i] = _bf16(_f32(_bf16(_f32(x[i]) * inv)) * _f32(w[i]))


@njit(cache=True, nogil=True)
def _rotary_bf16(x_addr, cos_addr, sin_addr, out_addr, rows, positions, dim):
    # out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)); row r is at position r % positions
    half = dim // 2
    for r in range(rows):
        x = carray(_u16_ptr(x_addr + 2 * r * dim), dim)
        out = carray(_u16_ptr(out_addr + 2 * r * dim), dim)
        t = r % positions
        cos = carray(_u16_ptr(cos_addr + 2 * t * dim), dim)
        sin = carray(_u16_ptr(sin_addr + 2 * t * dim), dim)
        for i in range(dim):
            rot = -_f32(x[i + half]) if i < half else _f32(x[i - half])
            a = _f32(_bf16(_f32(x[i]) * _f32(cos[i])))
            b = _f32(_bf16(rot * _f32(sin[i])))
            out[i] = _bf16(a + b)


def _fusable(*tensors: torch.Tensor) -> bool:
    # parameters require grad; under no_grad (generate, serving) nothing is recorded anyway
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """weight * bf16(x * rsqrt(mean(x², -1) + eps)) for bf16 x [..., W] on the CPU, as a new
    tensor; None where the fused kernel does not take it (another dtype or device, not contiguous,
    more than MAX_FUSED_ROWS rows, autograd): the caller then runs torch's ops."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    if not (0 < rows <= MAX_FUSED_ROWS and weight.shape == (width,) and _fusable(x, weight)):
        return None
    out = torch.empty_like(x)
    _rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, eps)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[torch.Tensor]:
    """x [B, heads, T, D] rotated by cos and sin [T, D] (the half-split convention), as a new
    tensor; None where the fused kernel does not take it (see rms_norm), including T > 1 unless
    x is laid out [B, heads, T, D] in memory."""
    if x.dim() != 4:
        return None
    t, dim = x.shape[2], x.shape[3]
    rows = x.numel() // dim if dim else 0
    if not (0 < rows <= MAX_FUSED_ROWS and dim % 2 == 0 and cos.shape == (t, dim) == sin.shape
            and _fusable(x, cos, sin)):
        return None
    out = torch.empty_like(x)
    _rotary_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, t, dim)
    return out
