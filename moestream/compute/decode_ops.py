"""The small per-token operations of a bf16 decode step on the CPU, each one Numba call instead
of a chain of torch ops: RMSNorm (eight torch ops), the rotary embedding (seven) and a softmax
router's top-k (five).

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
import torch.nn.functional as F
from numba import carray, njit

from .quant_kernels import flush_cached_kernels_on_source_change
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


@njit(inline="always")
def _norm_row(x, w, out, width, eps):
    # out = w * bf16(x * rsqrt(mean(x^2) + eps)) over one row (bf16 bits); the squares are float32 as
    # torch's, their sum float64 (a sequential float32 sum put 3 values in 10000 one bf16 step from
    # torch's lane-wise one). `out` may be `x`.
    s = 0.0
    for i in range(width):
        v = _f32(x[i])
        s += np.float64(v * v)
    inv = np.float32(1) / np.sqrt(np.float32(s) / np.float32(width) + np.float32(eps))
    for i in range(width):
        out[i] = _bf16(_f32(_bf16(_f32(x[i]) * inv)) * _f32(w[i]))


@njit(inline="always")
def _rotate_row(x, cos, sin, out, dim):
    # out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)) over one row (bf16 bits); `out` not `x`
    half = dim // 2
    for i in range(dim):
        rot = -_f32(x[i + half]) if i < half else _f32(x[i - half])
        a = _f32(_bf16(_f32(x[i]) * _f32(cos[i])))
        b = _f32(_bf16(rot * _f32(sin[i])))
        out[i] = _bf16(a + b)


@njit(inline="always")
def _norm_rotate(src, norm_addr, eps, cos, sin, scratch, out, dim):
    # one query or key head (bf16 bits): RMSNorm'd by the weights at norm_addr (Qwen3's q/k norm;
    # none when 0) into scratch, then rotated into out
    if norm_addr != 0:
        _norm_row(src, carray(_u16_ptr(norm_addr), dim), scratch, dim, eps)
        src = scratch
    _rotate_row(src, cos, sin, out, dim)


@njit(cache=True, nogil=True)
def _rms_norm_bf16(x_addr, w_addr, out_addr, rows, width, eps):
    w = carray(_u16_ptr(w_addr), width)
    for r in range(rows):
        _norm_row(carray(_u16_ptr(x_addr + 2 * r * width), width), w,
                  carray(_u16_ptr(out_addr + 2 * r * width), width), width, eps)


@njit(cache=True, nogil=True)
def _rotary_bf16(x_addr, cos_addr, sin_addr, out_addr, rows, positions, dim):
    # row r is at position r % positions
    for r in range(rows):
        t = r % positions
        _rotate_row(carray(_u16_ptr(x_addr + 2 * r * dim), dim), carray(_u16_ptr(cos_addr + 2 * t * dim), dim),
                    carray(_u16_ptr(sin_addr + 2 * t * dim), dim), carray(_u16_ptr(out_addr + 2 * r * dim), dim), dim)


@njit(fastmath=True)
def _dot(a, b):
    # float32 a·b; fastmath lets LLVM split the sum into vector lanes (here only: the other
    # kernels here keep torch's order of operations)
    s = np.float32(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(cache=True, nogil=True)
def _attend_one_bf16(q_addr, k_addr, v_addr, heads, kv_heads, dim, qn_addr, kn_addr, eps, cos_addr, sin_addr,
                     kc_addr, vc_addr, max_len, pos, out_addr, attend):
    # One decode position of grouped-query attention, in place of Attention.forward's chain for T = 1:
    # the new key head-normed (by the weights at kn_addr, when set) and rotated into the cache at
    # `pos`, the value copied there, each query head normed (qn_addr) and rotated as the key, then
    # softmax(q·Kᵀ / sqrt(D)) · V over
    # positions 0..pos of its kv head. Caches [kv_heads, max_len, D] bf16; out [heads, D] bf16.
    # Computed as torch's CPU flash-attention kernel computes bf16 (what transformers and the torch
    # path run): float32 scores q·k times 1/sqrt(D), their max, exp(score - max) summed in float32,
    # each exp rounded to bf16 before it weighs V, the float32 sum of those divided by the sum of
    # exps and rounded to bf16 once. Without `attend`, out receives the normed, rotated query
    # heads instead, for torch's SDPA.
    cos = carray(_u16_ptr(cos_addr), dim)
    sin = carray(_u16_ptr(sin_addr), dim)
    row = np.empty(dim, np.uint16)
    rotated = np.empty(dim, np.uint16)
    for g in range(kv_heads):
        _norm_rotate(carray(_u16_ptr(k_addr + 2 * g * dim), dim), kn_addr, eps, cos, sin,
                     row, carray(_u16_ptr(kc_addr + 2 * (g * max_len + pos) * dim), dim), dim)
        vc = carray(_u16_ptr(vc_addr + 2 * (g * max_len + pos) * dim), dim)
        v = carray(_u16_ptr(v_addr + 2 * g * dim), dim)
        for i in range(dim):
            vc[i] = v[i]
    if not attend:
        for h in range(heads):
            _norm_rotate(carray(_u16_ptr(q_addr + 2 * h * dim), dim), qn_addr, eps, cos, sin, row,
                         carray(_u16_ptr(out_addr + 2 * h * dim), dim), dim)
        return
    group = heads // kv_heads
    n = pos + 1
    scale = np.float32(1.0 / np.sqrt(dim))
    q = np.empty((group, dim), np.float32)      # the group's query heads, normed and rotated
    kf = np.empty(dim, np.float32)              # one cached key or value row in float32
    scores = np.empty((group, n), np.float32)
    acc = np.empty((group, dim), np.float32)
    totals = np.empty(group, np.float32)
    for g in range(kv_heads):
        for j in range(group):
            _norm_rotate(carray(_u16_ptr(q_addr + 2 * (g * group + j) * dim), dim), qn_addr, eps, cos, sin, row,
                         rotated, dim)
            for i in range(dim):
                q[j, i] = _f32(rotated[i])
        kc = carray(_u16_ptr(kc_addr + 2 * g * max_len * dim), (n, dim))
        vc = carray(_u16_ptr(vc_addr + 2 * g * max_len * dim), (n, dim))
        # each cached row is converted once for the group's heads
        for t in range(n):
            for i in range(dim):
                kf[i] = _f32(kc[t, i])
            for j in range(group):
                scores[j, t] = _dot(q[j], kf) * scale
        for j in range(group):
            top = scores[j].max()
            total = np.float32(0)
            for t in range(n):
                e = np.float32(np.exp(scores[j, t] - top))
                total += e
                scores[j, t] = _f32(_bf16(e))
            totals[j] = total
        acc[:] = 0
        for t in range(n):
            for i in range(dim):
                kf[i] = _f32(vc[t, i])
            for j in range(group):
                p = scores[j, t]
                aj = acc[j]
                for i in range(dim):
                    aj[i] += p * kf[i]
        for j in range(group):
            out = carray(_u16_ptr(out_addr + 2 * (g * group + j) * dim), dim)
            for i in range(dim):
                out[i] = _bf16(acc[j, i] / totals[j])


@njit(cache=True, nogil=True)
def _softmax_topk(logits, k, renorm):
    # per row of logits [N, E] (float32): softmax, the k largest probabilities (largest first;
    # equal ones in index order) and, with renorm, those divided by their sum
    n, e = logits.shape
    weights = np.empty((n, k), np.float32)
    experts = np.empty((n, k), np.int64)
    p = np.empty(e, np.float32)
    taken = np.empty(e, np.bool_)
    for r in range(n):
        top = logits[r, 0]
        for j in range(1, e):
            top = max(top, logits[r, j])
        total = np.float32(0)
        for j in range(e):
            p[j] = np.exp(logits[r, j] - top)
            total += p[j]
        for j in range(e):
            p[j] = p[j] / total
            taken[j] = False
        for a in range(k):
            best = -1
            for j in range(e):
                if not taken[j] and (best < 0 or p[j] > p[best]):
                    best = j
            taken[best] = True
            experts[r, a] = best
            weights[r, a] = p[best]
        if renorm:
            chosen = np.float32(0)
            for a in range(k):
                chosen += weights[r, a]
            for a in range(k):
                weights[r, a] = weights[r, a] / chosen
    return weights, experts


flush_cached_kernels_on_source_change((_rms_norm_bf16, _rotary_bf16, _attend_one_bf16, _softmax_topk))


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


#: attend_one computes attention itself up to this many cached positions; it runs on one core, and
#: from ~100 positions torch's SDPA on two threads is faster (32 query and 4 kv heads of 128, with
#: the norms, rotary and cache write, the development machine: 26 against 62 us at 1 position, 77
#: against 80 at 100, 295 against 159 at 511)
MAX_ATTENDED_POSITIONS = 96


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: Optional[torch.Tensor],
               k_norm: Optional[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor,
               cache_k: torch.Tensor, cache_v: torch.Tensor, pos: int) -> Optional[torch.Tensor]:
    """One decode token's attention, in place of Attention.forward's chain of torch ops: q [1, 1,
    heads*D] and k, v [1, 1, kv_heads*D] as the projections give them (bf16 CPU, each contiguous),
    the optional per-head RMSNorm weights [D] of Qwen3's q and k, cos and sin [1, D] for position
    `pos`, and one layer's KV cache [1, kv_heads, max_len, D], into which the key (normed,
    rotated) and value are written at `pos`. One kernel call does the norms, the rotary, the cache
    write and, up to MAX_ATTENDED_POSITIONS positions, the attention; beyond that torch's SDPA
    attends. Returns the attention output [1, 1, heads*D] as a new tensor; None, with nothing
    written, where it does not take the inputs (another dtype or device, a batch, heads that do
    not group, autograd, `pos` outside the cache): the caller then runs torch's ops."""
    if cache_k.dim() != 4 or cache_k.shape[0] != 1:
        return None
    kv_heads, max_len, dim = cache_k.shape[1:]
    heads = q.shape[-1] // dim if dim else 0
    norms = () if q_norm is None else (q_norm, k_norm)
    if not (0 <= pos < max_len and dim % 2 == 0 and heads * dim == q.shape[-1]
            and q.numel() == heads * dim and k.numel() == kv_heads * dim == v.numel() and kv_heads
            and heads % kv_heads == 0 and cache_v.shape == cache_k.shape and cos.shape == (1, dim) == sin.shape
            and all(w.shape == (dim,) for w in norms) and _fusable(q, k, v, cos, sin, cache_k, cache_v, *norms)):
        return None
    attend = pos < MAX_ATTENDED_POSITIONS
    out = torch.empty_like(q)
    _attend_one_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), heads, kv_heads, dim,
                     0 if q_norm is None else q_norm.data_ptr(), 0 if k_norm is None else k_norm.data_ptr(),
                     eps, cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), max_len, pos,
                     out.data_ptr(), attend)
    if attend:
        return out
    # each kv head's group of query heads attends as that many query rows of one head, in place
    n = pos + 1
    return F.scaled_dot_product_attention(out.view(1, kv_heads, heads // kv_heads, dim), cache_k[:, :, :n],
                                          cache_v[:, :, :n]).reshape(1, 1, heads * dim)


def softmax_topk(logits: torch.Tensor, k: int, renorm: bool) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A softmax router's choice from its logits [N, E] (float32, CPU, at most MAX_FUSED_ROWS
    rows): (weights [N, k] float32, experts [N, k] int64), the k most probable experts of each
    row, most probable first (equal probabilities in index order), their probabilities divided
    by their sum when `renorm`. What torch's softmax, topk and division compute, in one call
    instead of five ops (48 us a decode layer with cold caches, 2026-12-07); the
    probabilities may differ from torch's in their last bit (torch's vectorized exp and sum).
    None where it does not take the logits (another dtype or device, more rows, autograd, k
    outside 1..E): the caller then runs torch's ops."""
    if (logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2
            or not 0 < k <= logits.shape[1] or logits.shape[0] > MAX_FUSED_ROWS
            or (logits.requires_grad and torch.is_grad_enabled())):
        return None
    weights, experts = _softmax_topk(logits.detach().numpy(), k, renorm)
    return torch.from_numpy(weights), torch.from_numpy(experts)
