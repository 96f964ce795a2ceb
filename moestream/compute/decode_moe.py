"""A decode token's routed experts read where L1's slots hold them, in one kernel call, with
as little Python around it as the bookkeeping allows.

At decode, with every expert a layer routes to already in L1 (a resident store, or hits for all
of them), the general path (models/common.py: stream_experts, routed_experts_output) spent
~0.3 ms a layer around a ~0.8 ms kernel on the development machine (AMD EPYC, 2 vCPUs, a
resident int4 Qwen3-MoE store, 2026-12-07): grouping the routing per expert, two store calls
under two locks, each expert's layout looked up, batches and argument lists built, futures'
loop. The same Python measured hot in a loop costs a fifth of that: it runs cold, after the
kernel before it has streamed tens of MB of weights through the caches, so what it costs is
how much code and how many objects it touches. Here a layer's kernel layout is worked out once
for all its experts (`ExpertTable`), the store is asked once (Store.hold_routed: the routing
noted, the hits counted and their slots pinned under one lock) and the kernel's arguments are
rows of that table plus the slots' addresses.

The result is the general path's bit for bit: the experts go to the kernel in the order that
path gives them (ascending expert index), with the same routing weights. Anything else (a
miss, a layer whose experts the kernel does not all read in place, more than one token, a
store without an arena) is left to the general path, with nothing noted or held."""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from numba import carray, njit

from .decode_ops import _bf16, _f32, _softmax_topk
from .dequant import _PARALLEL_LOCK
from .quant_kernels import (CALLS_PARALLEL, PREFETCH_BYTES, QUANT_KERNELS, _layer_group, _moe_layer, flush_cached_kernels_on_source_change,
                            held_layout, layouts_fit)
from .row_dots import _f32_ptr, _u16_ptr
from .threads import COMPUTE_THREADS


@dataclass(frozen=True)
class ExpertTable:
    """How the layer kernel reads each expert of one layer where a slot holds it: `kinds` [E]
    (QUANT_KERNELS codes), `offsets` [E, 9] bytes from the slot's first byte to the codes,
    scales and mins of gate, up and down (-1: a plane the type has not), the experts'
    intermediate width and the group size the kernel's scratch takes."""
    kinds: np.ndarray
    offsets: np.ndarray
    inter: int
    group: int


#: store -> {(layer, names): ExpertTable, or None where the kernel cannot take the layer's experts
#: in place}: a store's index and its keep_quantized are fixed for its life
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: (a weak reference to the store expert_table was last asked for, its tables)
_last: tuple = (lambda: None, {})


def expert_table(store, layer: int, names: tuple[str, str, str]) -> Optional[ExpertTable]:
    """The ExpertTable of `layer`'s experts in `store` (gate, up and down named `names`), worked out
    on first use; None unless every expert of the layer is one layout the kernel reads in place
    (held_layout), all of them fit one call (layouts_fit) and a decode token's single row is
    below their types' gemm_rows."""
    global _last
    last, tables = _last
    if last() is not store:     # a decode step asks per layer: the WeakKeyDictionary's lookup makes a weakref
        tables = _TABLES.setdefault(store, {})
        _last = weakref.ref(store), tables
    key = (layer, names)
    if key not in tables:
        tables[key] = _make_table(store, layer, names)
    return tables[key]


def _make_table(store, layer: int, names: tuple[str, str, str]) -> Optional[ExpertTable]:
    found = []
    for e in range(store.reader.experts_per_layer):
        region = store.index.extents.get((layer, e))
        if region is None:          # not one of the store's MoE layers: the general path says so when asked
            return None
        held = held_layout(region, store.holds_quantized(region), names)
        if held is None or QUANT_KERNELS[held[0][0]].gemm_rows <= 1:
            return None
        found.append(held)
    layouts = [layout for layout, _ in found]
    if not layouts_fit(layouts):
        return None
    return ExpertTable(kinds=np.array([QUANT_KERNELS[lay[0]].code for lay in layouts], np.int64),
                       offsets=np.array([planes for _, planes in found], np.int64).reshape(len(found), 9),
                       inter=layouts[0][2], group=_layer_group(layouts))


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _moe_decode(x_addr, x_bf16, hidden, kinds, offsets, ids, bases, w_addr, w_bf16, inter, group, pf, res_addr):
    # one token's routed experts (ids [K], their slots' addresses bases [K], any order) through
    # _moe_layer in ascending expert order, its arguments made here rather than as numpy and torch
    # calls in Python; x [H] bf16 or float32 at x_addr; the routing weights [K] bf16 or float32 at
    # w_addr, rounded to x's dtype as the general path rounds them. Returns the float32 sum [1, H];
    # with a residual [H] of x's dtype at res_addr (not 0), residual + the sum rounded to x's
    # dtype, added as torch adds two tensors of it (for bf16: in float32, rounded once).
    k = ids.shape[0]
    weights = np.empty(k, np.float32)
    for j in range(k):
        if w_bf16:
            weights[j] = _f32(carray(_u16_ptr(w_addr), k)[j])
        elif x_bf16:
            weights[j] = _f32(_bf16(carray(_f32_ptr(w_addr), k)[j]))
        else:
            weights[j] = carray(_f32_ptr(w_addr), k)[j]
    out = _moe_sum(x_addr, x_bf16, hidden, kinds, offsets, ids, bases, weights, inter, group, pf)
    if res_addr != 0:
        if x_bf16:
            res = carray(_u16_ptr(res_addr), hidden)
            for i in range(hidden):
                out[0, i] = _f32(_plus_rounded(res[i], out[0, i]))
        else:
            out[0, :] += carray(_f32_ptr(res_addr), hidden)
    return out


@njit(inline="always")
def _plus_rounded(res, total):
    # a bf16 residual (bits) + a float32 sum, as torch adds two bf16 tensors: the sum rounded to
    # bf16, the two added in float32 and rounded once; bf16 bits
    return _bf16(_f32(res) + _f32(_bf16(total)))


@njit(inline="always")
def _moe_sum(x_addr, x_bf16, hidden, kinds, offsets, ids, bases, weights, inter, group, pf):
    # _moe_decode's and _moe_leased's sum: the experts ids [K] (slots at bases [K]) weighted by
    # weights [K] float32 (already rounded as the caller's path rounds them), through _moe_layer
    # in ascending expert order; float32 [1, H]. Inlined into both: a cached kernel that calls the
    # parallel _moe_layer must be compiled as parallel itself (CALLS_PARALLEL), and this one is neither
    k = ids.shape[0]
    order = np.argsort(ids, kind="mergesort")
    x = np.empty((1, hidden), np.float32)
    if x_bf16:
        xb = carray(_u16_ptr(x_addr), hidden)
        for i in range(hidden):
            x[0, i] = _f32(xb[i])
    else:
        x[0, :] = carray(_f32_ptr(x_addr), hidden)
    layer_kinds = np.empty(k, np.int64)
    addrs = np.empty((k, 3, 3), np.int64)
    pair_weight = np.empty(k, np.float32)
    for j in range(k):
        src = order[j]
        e = ids[src]
        layer_kinds[j] = kinds[e]
        pair_weight[j] = weights[src]
        for t in range(9):
            o = offsets[e, t]
            addrs[j, t // 3, t % 3] = 0 if o < 0 else bases[src] + o
    out = np.zeros((1, hidden), np.float32)
    _moe_layer(x, layer_kinds, addrs, np.arange(k + 1), np.zeros(k, np.int64), pair_weight, inter, group, out, pf)
    return out


@njit(cache=True, nogil=True, parallel=CALLS_PARALLEL)
def _moe_leased(logits_addr, n_experts, top_k, renorm, x_addr, hidden, kinds, offsets, layer_addrs, inter, group, pf,
                res_addr, out_addr):
    # a bf16 decode token's router choice and routed experts in one call: the softmax top-k of the
    # router's logits [E] float32 at logits_addr (decode_ops._softmax_topk, as StreamingMoE.route
    # chooses), the weights rounded to bf16 as route rounds them, each expert read at its slot's
    # address layer_addrs[e] (a ResidentLease's), and residual [H] at res_addr + the weighted sum
    # written as bf16 [H] to out_addr, as _moe_decode and the .to(bf16) after it make it. Returns
    # False, with nothing written, where the lease has no address for a chosen expert
    weights, experts = _softmax_topk(carray(_f32_ptr(logits_addr), (1, n_experts)), top_k, renorm)
    ids = experts[0]
    bases = np.empty(top_k, np.int64)
    rounded = np.empty(top_k, np.float32)
    for j in range(top_k):
        bases[j] = layer_addrs[ids[j]]
        if bases[j] == 0:
            return False
        rounded[j] = _f32(_bf16(weights[0, j]))
    out = _moe_sum(x_addr, True, hidden, kinds, offsets, ids, bases, rounded, inter, group, pf)
    res = carray(_u16_ptr(res_addr), hidden)
    dst = carray(_u16_ptr(out_addr), hidden)
    for i in range(hidden):
        dst[i] = _plus_rounded(res[i], out[0, i])
    return True


flush_cached_kernels_on_source_change((_moe_decode, _moe_leased))


def warm_up(store, layers: list[int], names: tuple[str, str, str]) -> None:
    """Work out the ExpertTables of `layers` now, and have Numba load _moe_decode's and _moe_leased's
    machine code (from its cache, or compile it) with a one-expert bf16 layer of zeros, rather than inside
    the first decode token, as llama.cpp runs a warm-up decode at load: loading the cached
    kernel took ~65 ms on the development machine (the first decode step of a 2-layer int4 model
    47 ms before this call existed, 111 ms with it unwarmed), the tables ~2 ms a layer of 128
    experts."""
    global _kernel_warm
    if not getattr(store, "holds_by_address", False):
        return
    for layer in layers:
        expert_table(store, layer, names)
    if _kernel_warm:
        return
    width = 64                                  # a group of the kernel's whole-row dots
    planes = np.zeros(3 * width * width, np.uint16)                 # gate, up, down [64, 64] bf16
    x = np.zeros(width, np.uint16)
    step = 2 * width * width
    offsets = np.array([[0, -1, -1, step, -1, -1, 2 * step, -1, -1]], np.int64)
    with _PARALLEL_LOCK:
        _moe_decode(x.ctypes.data, True, width, np.array([QUANT_KERNELS["bf16"].code], np.int64), offsets,
                    np.zeros(1, np.int64), np.array([planes.ctypes.data], np.int64), np.ones(1, np.float32).ctypes.data,
                    False, width, width, PREFETCH_BYTES, 0)
        out = np.empty(width, np.uint16)
        _moe_leased(np.zeros(1, np.float32).ctypes.data, 1, 1, True, x.ctypes.data, width,
                    np.array([QUANT_KERNELS["bf16"].code], np.int64), offsets, np.array([planes.ctypes.data], np.int64),
                    width, width, PREFETCH_BYTES, x.ctypes.data, out.ctypes.data)
    _kernel_warm = True


_kernel_warm = False


def held_decode_output(store, layer: int, names: tuple[str, str, str], x: torch.Tensor, weights: torch.Tensor,
                       experts: torch.Tensor, then_prefetch: Optional[tuple[int, list[int]]] = None,
                       residual: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, float]]:
    """routed_experts_output (models/common.py) for one decode token x [1, H] on the CPU whose
    routed experts [1, A] (weights [1, A]) L1 holds every one of: (the output [1, H] in x's
    dtype, a new tensor; the seconds the kernel took); with a `residual` (H values of x's dtype,
    contiguous), residual + that output, as torch adds them. None where it does not apply (see
    the module's docstring): then nothing was noted, held, counted or prefetched."""
    if (x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu" or x.dtype not in _X_DTYPES
            or not x.is_contiguous() or not getattr(store, "holds_by_address", False)):
        return None
    if residual is not None and (residual.numel() != x.shape[1] or residual.dtype != x.dtype
                                 or residual.device.type != "cpu" or not residual.is_contiguous()):
        return None
    table = expert_table(store, layer, names)
    if table is None:
        return None
    ids = _routed_ids(table, weights, experts)
    if ids is None:
        return None
    held = store.hold_routed(layer, ids)
    if held is None:
        return None
    slots, bases = held
    try:
        if then_prefetch is not None:     # this layer has no reads of its own to queue first
            store.prefetch(*then_prefetch)
        COMPUTE_THREADS.adjust(store.prefetching)   # leave a core to the store's prefetch work
        out, seconds = _decode_routed(table, x, weights, ids, np.array(bases, np.int64), residual)
    finally:
        store.release_slots(slots)
    COMPUTE_THREADS.adjust(store.prefetching)
    return out, seconds


def _routed_ids(table: ExpertTable, weights: torch.Tensor, experts: torch.Tensor) -> Optional[list[int]]:
    # a decode token's routing [1, A] as the kernel takes it: A distinct experts of the layer, the
    # weights on the CPU in their shape; else None
    if experts.dim() != 2 or experts.shape[0] != 1 or weights.shape != experts.shape or weights.device.type != "cpu":
        return None
    ids = experts[0].tolist()
    if len(set(ids)) != len(ids) or not 0 <= min(ids) <= max(ids) < len(table.kinds):
        return None
    return ids


def _decode_routed(table: ExpertTable, x: torch.Tensor, weights: torch.Tensor, ids: list[int], bases: np.ndarray,
                   residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, float]:
    # _moe_decode of one token x [1, H] whose experts ids lie at bases (their slots' addresses,
    # held by the caller): the output [1, H] in x's dtype (plus the residual), the kernel's seconds
    t0 = time.perf_counter()
    if weights.dtype not in _X_DTYPES or not weights.is_contiguous():
        weights = weights.detach().to(x.dtype).float().contiguous()        # read as float32 below
    with _PARALLEL_LOCK:
        out = _moe_decode(x.data_ptr(), x.dtype == torch.bfloat16, x.shape[1], table.kinds, table.offsets,
                          np.array(ids, np.int64), bases, weights.data_ptr(), weights.dtype == torch.bfloat16,
                          table.inter, table.group, PREFETCH_BYTES, 0 if residual is None else residual.data_ptr())
    seconds = time.perf_counter() - t0
    return torch.from_numpy(out).to(x.dtype), seconds


_X_DTYPES = (torch.bfloat16, torch.float32)


class LeasedLayer:
    """One MoE layer's routed experts read through a ResidentLease (Store.lease_resident) for the
    decode steps of one generate: the router's top-k and the experts in one call (_moe_leased),
    with no store call a step: the per-step path's router call, Store.hold_routed, its release
    and their tensors and arrays cost an int4 token of two layers ~0.9 ms (8.07 against 7.18 ms,
    faster in 12 of 12 pairs taking turns in one process; the development machine, 2026-12-07:
    bench/resident_token.py --lease-ab). Made by leased_layer; the lease's owner releases it."""

    def __init__(self, lease, layer: int, table: ExpertTable, top_k: int, renorm: bool, route=None):
        self.lease, self.layer, self.table = lease, layer, table
        self.addresses = lease.addresses[layer]          # [E] int64, the lease's: refresh fills its zeros
        self.top_k, self.renorm = top_k, renorm
        #: a route(x, logits) -> (weights, experts) [1, A] that replaces the router's choice (bench
        #: decode replays a routing trace this way), called each step; None: the router's top-k
        self.route = route

    def output(self, x: torch.Tensor, logits: torch.Tensor, residual: torch.Tensor) -> Optional[tuple[torch.Tensor, float]]:
        """residual + the routed experts' weighted sum for one bf16 decode token, as
        StreamingMoE.forward(x, logits, residual) computes it: x [1, H] (the post-attention norm),
        logits [1, E] float32, residual [1, 1, H], each contiguous on the CPU (the fused attention
        call's). Returns (a new [1, 1, H] bf16 tensor, the kernel's seconds), or None, with nothing
        written or counted, where the lease lacks a chosen expert (the caller takes the general
        path, then refresh)."""
        if self.route is not None:
            return self._routed_output(x, logits, residual)
        t = self.table
        hidden = x.shape[-1]
        out = torch.empty_like(residual)
        t0 = time.perf_counter()
        with _PARALLEL_LOCK:
            done = _moe_leased(logits.data_ptr(), len(t.kinds), self.top_k, self.renorm, x.data_ptr(), hidden, t.kinds,
                               t.offsets, self.addresses, t.inter, t.group, PREFETCH_BYTES, residual.data_ptr(),
                               out.data_ptr())
        seconds = time.perf_counter() - t0
        if not done:
            return None
        self.lease.count(self.top_k)
        return out, seconds

    def _routed_output(self, x: torch.Tensor, logits: torch.Tensor, residual: torch.Tensor
                       ) -> Optional[tuple[torch.Tensor, float]]:
        # output's work with the routing of self.route: its experts read at the lease's addresses
        # by _moe_decode, as held_decode_output reads them at hold_routed's
        weights, experts = self.route(x, logits)                                 # [1, A], [1, A]
        ids = _routed_ids(self.table, weights, experts)
        if ids is None:
            return None
        bases = self.addresses[ids]
        if not bases.all():
            return None
        out, seconds = _decode_routed(self.table, x, weights, ids, bases, residual)
        self.lease.count(len(ids))
        return out.view(residual.shape), seconds

    def refresh(self) -> None:
        """Take into the lease the experts of this layer the general path has loaded meanwhile."""
        self.lease.refresh(self.layer)


def leased_layer(lease, store, layer: int, names: tuple[str, str, str], top_k: int, renorm: bool,
                 n_experts: int, route=None) -> Optional[LeasedLayer]:
    """A LeasedLayer for `layer` of `store` under `lease` (its router choosing `top_k` of
    `n_experts`, their probabilities divided by their sum when `renorm`, or `route` choosing
    instead: LeasedLayer.route), or None where the layer's experts are not all read in place by
    the layer kernel (expert_table), or the lease or the store has another count of experts for it."""
    if lease is None or layer not in lease.addresses or not 0 < top_k <= n_experts:
        return None
    table = expert_table(store, layer, names)
    if table is None or len(table.kinds) != n_experts or len(lease.addresses[layer]) != n_experts:
        return None
    return LeasedLayer(lease, layer, table, top_k, renorm, route)
