"""A bf16 decode token's pass through a decoder layer's attention half on the CPU, in one native
call: the input RMSNorm, the fused q/k/v projection, the head norms, rotary, KV-cache write and
attention (decode_ops._attend_one_bf16), the o projection, the residual add, the post-attention
RMSNorm and the MoE router's logits.

Run as modules (models/common.py), those are six module calls, four kernel calls and a dozen
torch ops a layer. Each kernel is fast; the Python and dispatch between them is not, and it runs
with cold caches after every kernel has streamed its weights through them: on the development
machine (AMD EPYC, 2 vCPUs) a resident int4 Qwen3-MoE token spent 1.3 ms of its 4.4 outside the
kernels, 0.15 ms a layer of it in the attention half alone (2026-12-07,
bench/decode_breakdown.py). Here the same kernels (quant_kernels._linear for each matrix,
decode_ops' norm, rotary and attention) run back to back in one call, and every value is rounded
to bf16 where the module path rounds it, so the result is bit-identical to that path (tested).

Beyond decode_ops.MAX_ATTENDED_POSITIONS cached positions, torch's two-threaded SDPA attends
faster than the kernel's one thread, so the call splits in two around it (`attention_in`, SDPA,
`attention_out`), as decode_ops.attend_one does.

The final norm and lm_head of a decode token are one call the same way (`head`).

A layer's plan (`BlockPlan`) holds the addresses of its weights; the caller works it out again
whenever one of them moves (DecoderLayer keys it by the linears' LinearPlans and the norms' data
pointers). The kernels read through raw addresses: the caller keeps every tensor alive for the
call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from numba import carray, njit

from . import decode_ops
from .decode_ops import _attend_one_bf16, _bf16, _f32, _norm_row
from .dequant import _PARALLEL_LOCK
from .quant_kernels import CALLS_PARALLEL, PREFETCH_BYTES, LinearPlan, _linear, flush_cached_kernels_on_source_change
from .row_dots import _u16_ptr

# the fields of a BlockPlan's array (int64): sizes, then (code, codes, scales, mins, group) of each
# matrix, then the norms' weight addresses (0: no norm); the router's code is -1 where there is none
_HIDDEN, _HEADS, _KV_HEADS, _DIM, _QKV_ROWS, _EXPERTS = range(6)
_QKV, _O, _GATE = 6, 11, 16
_IN_NORM, _Q_NORM, _K_NORM, _POST_NORM = 21, 22, 23, 24
_FIELDS = 25


@njit(inline="always")
def _project(p, at, x16, rows, out16):
    # out16 [rows] (bf16 bits) = bf16(x16 · Wᵀ), W the matrix of the plan's fields at..at+4: what
    # QuantLinear / Bf16DecodeLinear return for one row (float32 activations, the kernel's float32
    # sums rounded to bf16 once)
    xf = np.empty((1, x16.shape[0]), np.float32)
    for i in range(x16.shape[0]):
        xf[0, i] = _f32(x16[i])
    y = np.empty((1, rows), np.float32)
    _linear(xf, p[at], p[at + 1], p[at + 2], p[at + 3], rows, p[at + 4], y, PREFETCH_BYTES)
    for i in range(rows):
        out16[i] = _bf16(y[0, i])


@njit(inline="always")
def _logits(p, xn, logits):
    # logits [E] float32 = the bf16 logits of the matrix in the plan's router fields (the router,
    # or _head's lm_head) for the normed row xn, widened: what the modules' .float() gives
    lg = np.empty(p[_EXPERTS], np.uint16)
    _project(p, _GATE, xn, p[_EXPERTS], lg)
    for i in range(p[_EXPERTS]):
        logits[i] = _f32(lg[i])


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _attention_in(p, x_addr, eps, cos_addr, sin_addr, kc_addr, vc_addr, max_len, pos, attend, out_addr):
    # input norm, q/k/v, head norms, rotary, cache write and (attend) attention -> out [heads*D]
    # bf16; without `attend`, out holds the normed, rotated query heads for torch's SDPA
    hidden, heads, kv_heads, dim = p[_HIDDEN], p[_HEADS], p[_KV_HEADS], p[_DIM]
    xn = np.empty(hidden, np.uint16)
    _norm_row(carray(_u16_ptr(x_addr), hidden), carray(_u16_ptr(p[_IN_NORM]), hidden), xn, hidden, eps)
    qkv = np.empty(p[_QKV_ROWS], np.uint16)
    _project(p, _QKV, xn, p[_QKV_ROWS], qkv)
    q_addr = qkv.ctypes.data
    k_addr = q_addr + 2 * heads * dim
    _attend_one_bf16(q_addr, k_addr, k_addr + 2 * kv_heads * dim, heads, kv_heads, dim, p[_Q_NORM], p[_K_NORM],
                     eps, cos_addr, sin_addr, kc_addr, vc_addr, max_len, pos, out_addr, attend)


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _attention_out(p, x_addr, attn_addr, eps, h_addr, xn_addr, logits):
    # o projection of the attention output, h = x + o (bf16), xn = post-norm(h), and the router's
    # logits of xn rounded to bf16 (as float32), where the plan has a router
    hidden, width = p[_HIDDEN], p[_HEADS] * p[_DIM]
    o = np.empty(hidden, np.uint16)
    _project(p, _O, carray(_u16_ptr(attn_addr), width), hidden, o)
    x = carray(_u16_ptr(x_addr), hidden)
    h = carray(_u16_ptr(h_addr), hidden)
    for i in range(hidden):
        h[i] = _bf16(_f32(x[i]) + _f32(o[i]))
    xn = carray(_u16_ptr(xn_addr), hidden)
    _norm_row(h, carray(_u16_ptr(p[_POST_NORM]), hidden), xn, hidden, eps)
    if p[_GATE] >= 0:
        _logits(p, xn, logits)


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _attention_block(p, x_addr, eps, cos_addr, sin_addr, kc_addr, vc_addr, max_len, pos, h_addr, xn_addr,
                     logits):
    attn = np.empty(p[_HEADS] * p[_DIM], np.uint16)
    _attention_in(p, x_addr, eps, cos_addr, sin_addr, kc_addr, vc_addr, max_len, pos, True, attn.ctypes.data)
    _attention_out(p, x_addr, attn.ctypes.data, eps, h_addr, xn_addr, logits)


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _head(p, x_addr, eps, logits):
    # the final norm of x and the lm_head's logits of it, rounded to bf16 (as float32): the plan's
    # router fields hold the lm_head, its post-norm field the final norm
    hidden = p[_HIDDEN]
    xn = np.empty(hidden, np.uint16)
    _norm_row(carray(_u16_ptr(x_addr), hidden), carray(_u16_ptr(p[_POST_NORM]), hidden), xn, hidden, eps)
    _logits(p, xn, logits)


flush_cached_kernels_on_source_change((_attention_in, _attention_out, _attention_block, _head))


def _fields(qkv: Optional[LinearPlan] = None, o: Optional[LinearPlan] = None,
            gate: Optional[LinearPlan] = None) -> np.ndarray:
    """A plan's field array with its matrices' (code, codes, scales, mins, group) filled in; a
    matrix it has not gets code -1."""
    f = np.zeros(_FIELDS, np.int64)
    for at, plan in ((_QKV, qkv), (_O, o), (_GATE, gate)):
        f[at:at + 5] = (-1, 0, 0, 0, 0) if plan is None else (plan.code, *plan.addresses, plan.group)
    return f


def _one_token(x: torch.Tensor, hidden: int) -> bool:
    """Whether x is one decode token [1, 1, hidden] the fused calls read: bf16, contiguous, CPU."""
    return x.dtype == torch.bfloat16 and x.shape == (1, 1, hidden) and x.device.type == "cpu" and x.is_contiguous()


@dataclass(frozen=True)
class BlockPlan:
    """One decoder layer's attention half as the fused call reads it: its shape and its weights'
    addresses (`fields`, int64), valid while the tensors of `key` stay where they are."""
    key: tuple
    fields: np.ndarray
    experts: int
    eps: float


def block_plan(key: tuple, *, hidden: int, heads: int, kv_heads: int, dim: int, eps: float,
               qkv: LinearPlan, o: LinearPlan, gate: Optional[LinearPlan], in_norm: torch.Tensor,
               post_norm: torch.Tensor, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor]
               ) -> Optional[BlockPlan]:
    """The BlockPlan of a layer whose matrices the CPU kernels read in place (their LinearPlans,
    `gate` None for a layer without a router) and whose norm weights are contiguous bf16 CPU
    tensors; None where the shapes do not make one grouped-query attention (the caller then runs
    the modules)."""
    norms = [in_norm, post_norm] + ([] if q_norm is None else [q_norm, k_norm])
    if not (heads and kv_heads and heads % kv_heads == 0 and dim % 2 == 0
            and qkv.cols == hidden and qkv.rows == (heads + 2 * kv_heads) * dim
            and o.cols == heads * dim and o.rows == hidden
            and (gate is None or gate.cols == hidden)
            and in_norm.shape == (hidden,) == post_norm.shape
            and (q_norm is None or (q_norm.shape == (dim,) == k_norm.shape))
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in norms)):
        return None
    f = _fields(qkv=qkv, o=o, gate=gate)
    f[_HIDDEN], f[_HEADS], f[_KV_HEADS], f[_DIM], f[_QKV_ROWS] = hidden, heads, kv_heads, dim, qkv.rows
    f[_EXPERTS] = 0 if gate is None else gate.rows
    f[_IN_NORM], f[_POST_NORM] = in_norm.data_ptr(), post_norm.data_ptr()
    f[_Q_NORM], f[_K_NORM] = (0, 0) if q_norm is None else (q_norm.data_ptr(), k_norm.data_ptr())
    return BlockPlan(key, f, int(f[_EXPERTS]), float(eps))


def attention_half(plan: BlockPlan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, pos: int, checked: bool = False
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """One decode token x [1, 1, H] (bf16, contiguous, CPU) at position `pos` through the layer of
    `plan`: its key and value written to the layer's KV cache [1, kv_heads, max_len, D] (bf16,
    contiguous) at `pos`; cos and sin [1, D] bf16. Returns new tensors: h [1, 1, H] (x plus the
    attention), the post-attention norm of h [1, H] and the router's logits float32 [1, E] (None
    without a router), the values the module path computes; None, with nothing written, where
    the inputs are not of that form. `checked`: the caller had the caches (the same tensors: a
    frozen KVCache's, DecoderLayer.attention_half) and cos and sin (made the same way, by
    Rotary.at) pass these checks on an earlier call; x and pos are checked all the same."""
    f = plan.fields
    hidden, dim = int(f[_HIDDEN]), int(f[_DIM])
    if checked:
        if not (_one_token(x, hidden) and 0 <= pos < cache_k.shape[2]):
            return None
    elif not (_one_token(x, hidden) and cache_k.dim() == 4 and cache_k.shape[:2] == (1, f[_KV_HEADS])
            and cache_k.shape[3] == dim and cache_v.shape == cache_k.shape and 0 <= pos < cache_k.shape[2]
            and cos.shape == (1, dim) == sin.shape
            and all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu"
                    for t in (cos, sin, cache_k, cache_v))):
        return None
    max_len = cache_k.shape[2]
    h = torch.empty_like(x)
    xn = torch.empty((1, hidden), dtype=torch.bfloat16)
    logits = np.empty(max(plan.experts, 1), np.float32)
    if pos < decode_ops.MAX_ATTENDED_POSITIONS:
        with _PARALLEL_LOCK:
            _attention_block(f, x.data_ptr(), plan.eps, cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
                             cache_v.data_ptr(), max_len, pos, h.data_ptr(), xn.data_ptr(), logits)
    else:
        # the query heads come back normed and rotated; SDPA attends each kv head's group of them
        # as that many query rows of one head, in place (as attend_one does)
        heads, kv_heads = int(f[_HEADS]), int(f[_KV_HEADS])
        q = torch.empty((1, 1, heads * dim), dtype=torch.bfloat16)
        with _PARALLEL_LOCK:
            _attention_in(f, x.data_ptr(), plan.eps, cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
                          cache_v.data_ptr(), max_len, pos, False, q.data_ptr())
        n = pos + 1
        attn = F.scaled_dot_product_attention(q.view(1, kv_heads, heads // kv_heads, dim), cache_k[:, :, :n],
                                              cache_v[:, :, :n]).reshape(heads * dim).contiguous()
        with _PARALLEL_LOCK:
            _attention_out(f, x.data_ptr(), attn.data_ptr(), plan.eps, h.data_ptr(), xn.data_ptr(), logits)
    return h, xn, (torch.from_numpy(logits)[None] if plan.experts else None)


def head_plan(key: tuple, *, norm: torch.Tensor, eps: float, lm_head: LinearPlan) -> Optional[BlockPlan]:
    """The plan of the final norm and lm_head of a model whose lm_head the CPU kernels read in
    place (its LinearPlan) and whose norm weight is a contiguous bf16 CPU tensor; None otherwise."""
    if not (norm.dim() == 1 and lm_head.cols == norm.shape[0] and norm.dtype == torch.bfloat16
            and norm.device.type == "cpu" and norm.is_contiguous()):
        return None
    f = _fields(gate=lm_head)
    f[_HIDDEN], f[_EXPERTS] = lm_head.cols, lm_head.rows
    f[_POST_NORM] = norm.data_ptr()
    return BlockPlan(key, f, lm_head.rows, float(eps))


def head(plan: BlockPlan, x: torch.Tensor) -> Optional[torch.Tensor]:
    """lm_head(norm(x)) as float32 [1, 1, V] for one decode token x [1, 1, H] (bf16, contiguous,
    CPU), the values the modules compute (the logits rounded to bf16, then widened); None where x
    is not of that form."""
    if not _one_token(x, int(plan.fields[_HIDDEN])):
        return None
    logits = np.empty(plan.experts, np.float32)
    with _PARALLEL_LOCK:
        _head(plan.fields, x.data_ptr(), plan.eps, logits)
    return torch.from_numpy(logits).view(1, 1, plan.experts)


def warm_up() -> None:
    """Have Numba load the fused calls' machine code (from its cache, or compile it) now, with a
    layer of zeros one attention head and one 64-wide group across, rather than inside the first
    decode token, as llama.cpp runs a warm-up decode at load: on the development machine the
    first decode step of a 2-layer model took ~35 ms more than the next ones, most of it these
    loads. Once a process."""
    global _kernels_warm
    if _kernels_warm:
        return
    from .quant_kernels import plan_linear
    width, dim = 64, 64

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.bfloat16)
    weights = {"qkv": zeros(3 * dim, width), "o": zeros(width, dim), "gate": zeros(8, width),
               "norm": zeros(width), "head_norm": zeros(dim)}
    plans = {name: plan_linear(weights[name]) for name in ("qkv", "o", "gate")}
    plan = block_plan((), hidden=width, heads=1, kv_heads=1, dim=dim, eps=1e-6, qkv=plans["qkv"], o=plans["o"],
                      gate=plans["gate"], in_norm=weights["norm"], post_norm=weights["norm"],
                      q_norm=weights["head_norm"], k_norm=weights["head_norm"])
    cache_k, cache_v = zeros(1, 1, decode_ops.MAX_ATTENDED_POSITIONS + 1, dim), \
        zeros(1, 1, decode_ops.MAX_ATTENDED_POSITIONS + 1, dim)
    x, rope = zeros(1, 1, width), zeros(1, dim)
    for pos in (0, decode_ops.MAX_ATTENDED_POSITIONS):      # both branches: the kernel's attention, SDPA
        attention_half(plan, x, rope, rope, cache_k, cache_v, pos)
    head(head_plan((), norm=weights["norm"], eps=1e-6, lm_head=plans["gate"]), x)
    _kernels_warm = True


_kernels_warm = False
