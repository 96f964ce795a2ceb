"""The Store: experts on demand from a tiered cache (L1 device, L2 host, L3 file).

Data path of a miss: a dispatcher thread takes the next load (demand reads before prefetches;
prefetch bytes in flight bounded) and, on a CPU device, reserves its L1 slot first (evicting by
policy a slot no caller still holds). A lossless extent with no codec stage is read straight
into that slot (O_DIRECT into the final tensor's memory) and only checksummed: no copy at all.
Any other extent is read into an aligned slab of the BufferPool, checksummed there, and decoded
from the slab into the slot (zstd/shuffle undone, int codes dequantized in one pass). A CUDA
store decodes into new device tensors instead (the caching allocator recycles them): each decode
thread copies from the pinned slab with non_blocking copies and dequantizes on its own CUDA
stream, and waits on that stream's event alone, so the caller's queued kernels never hold up a
decode. Reading of one expert thus overlaps the decoding of the previous ones, and nothing is
allocated per miss on a CPU device.

L2 holds *stored* bytes (compressed, quantized) in a preallocated host arena, for extents whose
stored form is smaller than their decoded one, or on a CUDA device where host RAM is not the
device memory. On a CPU device a lossless extent's stored bytes are its decoded bytes: an L2
copy would only duplicate L1 (measured: 0 L2 hits, 6-14 % slower; docs/STORAGE.md), so
those skip L2 there.

Ownership: tensors handed out are views of the L1 slot on a CPU device (see arena.py: the slot
cannot be reused while any of them lives), or caller-owned tensors on CUDA. Either way each
result is a fresh dict and what a caller holds never changes under it."""
from __future__ import annotations

import operator
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait
from concurrent.futures import as_completed as _as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import psutil
import torch

from ..errors import BudgetError, MoestreamError, ReadCancelled, UsageError
from .budget import DEFAULT_SHARE, resolve_budget
from ..formats.codecs import Dequantizer, dequantize_torch, payload_tensor, unpack_payload
from ..formats.constants import ALIGNMENT, align_up
from ..formats.index import Region
from ..formats.quantized import QuantizedTensor, holds_quantized, quantized_views
from ..formats.reader import StoreReader
from ..units import format_size, parse_size
from .arena import ExpertArena, slot_tensor
from .backends import ReadRequest, choose_backend
from .buffers import BufferPool
from .cache import TierCache
from .stats import StoreStats

Key = tuple[int, int]


@dataclass(frozen=True)
class HeldExpert:
    """An expert L1 holds, pinned for a caller that reads its slot by address (Store.hold_hits):
    `address` of the slot's first byte, the `region` it holds, and whether in stored form
    (`quantized`: the region's payload from byte 0, formats.quantized's layout) or decoded (its
    tensors one after another: arena.decoded_offsets); `layout`, what the caller's `wanted`
    returned for it (how it reads the slot). Valid until Store.release_held."""
    slot: int
    address: int
    region: Region
    quantized: bool
    layout: Any = None


class ResidentLease:
    """The L1 slots of a store's experts pinned at once, for a caller that reads them by address
    over many decode steps (CausalLM.generate), with none of the per-step store calls of
    hold_routed: `addresses[layer]` [E] int64, each expert's slot address in bytes, 0 where L1
    did not hold it when the lease was taken or last refreshed. Only taken where L1 has a slot
    for every expert of the store (Store.lease_resident): nothing is ever evicted then, so the
    pins take no slot a miss could need and the eviction policy has nothing to rank, and its
    bookkeeping of these hits is skipped; they are counted (count) as requests and L1 hits.
    Valid until release(); the addresses must not be read after it."""

    def __init__(self, store: "Store", addresses: dict[int, np.ndarray]):
        self.store = store
        self.addresses = addresses                  # all 0: Store.lease_resident fills them
        self._slots: list[int] = []                 # pinned for the lease
        self._released = False

    def count(self, n: int) -> None:
        """n experts were read through the lease: counted as requests and L1 hits."""
        self.store.stats_.add(requests=n, hits_l1=n)

    def refresh(self, layer: int) -> int:
        """Pin the experts of `layer` that L1 holds now and the lease did not (loaded by a step
        that took the store's usual path); returns how many were added."""
        with self.store._cv:
            self.store._check_open()
            return 0 if self._released else self._take_in_locked(layer)

    def _take_in_locked(self, layer: int) -> int:
        # refresh's work (and lease_resident's, per layer), with the store's _cv held: the experts
        # of `layer` L1 holds and the lease has no address for, pinned and their addresses set
        store, addrs = self.store, self.addresses[layer]
        added = []
        for e in np.flatnonzero(addrs == 0).tolist():
            slot = store.l1.peek((layer, e))
            if slot is not None:
                added.append(slot)
                addrs[e] = store.arena.slot_addr(slot)
        store.arena.pin_many(added)
        self._slots += added
        return len(added)

    def release(self) -> None:
        """Unpin every slot of the lease (once; later calls do nothing)."""
        with self.store._cv:
            if self._released:
                return
            self._released = True
            slots, self._slots = self._slots, []
            for addrs in self.addresses.values():
                addrs[:] = 0
        self.store.arena.unpin_many(slots)


#: an expert's tensors by name: torch tensors, or with keep_quantized its quantized matrices held
#: in their stored form
Experts = dict[str, "torch.Tensor | QuantizedTensor"]


@dataclass(eq=False)
class _Load:
    key: Key
    region: Region
    future: Future
    prefetch: bool
    counted_prefetch: bool = False      # its bytes count against prefetch_budget while in flight
    counted_demand: bool = False        # a demand read on the disk: prefetches wait until it lands
    started: float = 0.0
    tick: Optional[int] = None          # L1 recency stamp taken when it was requested
    chunks_left: int = 0
    error: Optional[BaseException] = None
    slot: Optional[int] = None          # its L1 slot (CPU arena); None: decode into new tensors
    cancelled: bool = False             # a wrong guess withdrawn: reads not yet started will not start
    bytes_done: int = 0                 # bytes its reads delivered so far
    l2_slot: Optional[int] = None       # an L2 hit: the host-arena slot holding its stored bytes
    device_buf: Optional[torch.Tensor] = None   # CUDA + kvikio: its stored bytes, read straight into device memory
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def urgent(self) -> bool:
        """A caller waits for it (the backend starts it before waiting prefetches)."""
        return not self.prefetch


def _is_plain(region: Region) -> bool:
    """Stored bytes are the decoded tensors' bytes: no quantization, delta, shuffle or zstd."""
    return not region.chain


def reads_to_device(device: torch.device, backend: str, region: Region, verify: bool) -> bool:
    """Whether an extent is read straight into device memory (GPUDirect Storage, or kvikio's
    compat mode) and used there, with no host stage: a CUDA device, the kvikio backend, an extent
    with no codec stage, and no checksum to take (xxh3 runs on the host)."""
    return device.type == "cuda" and backend == "kvikio" and _is_plain(region) and not verify


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device moestream can serve ('cpu' or 'cuda[:N]'); UsageError otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device={device!r}: not a device (use 'cpu' or 'cuda[:N]')") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device={device!r}: moestream runs on 'cpu' or 'cuda[:N]'")
    return dev


def _index(value, what: str) -> int:
    """An expert or layer index as an int: ints (numpy's too) pass; bools, floats and strings
    are refused rather than silently truncated or parsed."""
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r}: expected an integer index, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise UsageError(f"{what} {value!r}: expected an integer index, got {type(value).__name__}") from None


def _tensor_bytes(tensors: Experts) -> int:
    return sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for t in tensors.values())


class Store:
    """Experts of one store, served as torch tensors on `device`. Thread-safe; use as a context
    manager.

    Ownership: every result is a new dict. On a CPU device its tensors are views of the cache
    slot that holds the expert (no copy): the slot is not reused while any of them (or a view
    of them) is alive, so they stay valid after eviction; they are shared with later hits of
    the same expert, so treat them as read-only. On CUDA they are new tensors owned by the caller,
    complete when the future resolves, and marked (record_stream) as used by every stream fetch()
    was called from; a caller that passes them to yet another stream marks them itself.

    device_budget: bytes of decoded experts kept on `device` (L1): a size, "N%" of what is free, or
    None/"auto" (default): a quarter of free device memory (CUDA) or of available RAM (CPU); more
    than is free is a BudgetError naming both (storage/budget.py). On a CPU device it is
    preallocated as slots of one expert each (the largest decoded extent, 4096-aligned).
    host_budget: bytes of stored extents kept in host RAM (L2); 0 disables L2. Default: a
    quarter of available RAM (CUDA) or 0 (CPU, where L1 is host RAM already; there L2 holds only
    extents whose stored form differs from their L1 form: zstd, or int decoded on load).
    policy: "next-use" (default; evicts the expert needed furthest ahead, from the layer sweep,
    per-expert frequencies and the prefetcher's guesses: storage/cache.py), "least-stale", "lru"
    or "lfu" (with aging). `moestream bench cache` compares them on routing traces.
    io: "auto", "uring", "posix" or "kvikio".
    verify: check each extent's xxh3-64 before decoding it. On CUDA with io="kvikio", verify=False
    lets extents with no codec stage be read straight into device memory and used in place
    (GPUDirect Storage where the machine has it; stats()["device_reads"] counts them): the
    checksum runs on the host, so verifying needs the host stage.
    queue_depth: reads in flight in the backend; chunk_size: bytes per read request.
    prefetch_budget: bytes of prefetch reads in flight, and of prefetched experts not yet used
    that L1 may hold (default: 4 extents).
    pinned_experts: (layer, expert) keys never evicted from L1 (a hot set from a routing profile).
    dequantize: dequantizer for int extents (compute/ passes Numba kernels; default plain torch).
    keep_quantized: hold int8/int4 experts in every tier in their stored form (codes and fp16
    scales, formats.quantized.QuantizedTensor values in each result) instead of decoding them to
    bf16: the budgets then count those bytes (an int4 expert takes 0.28 of its bf16 size), and the
    caller multiplies them with a quantized kernel (compute/quant_kernels.py). Extents the kernels
    cannot read in place (delta-coded ones: formats/quantized.py) still decode to bf16."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 device_budget: int | str | None = None, host_budget: int | str | None = None,
                 policy: str = "next-use", io: str = "auto", verify: bool = True, queue_depth: int = 32,
                 chunk_size: int | str = 1 << 20, decode_threads: Optional[int] = None,
                 prefetch_budget: int | str | None = None, io_buffers: Optional[int] = None,
                 pinned_experts: Iterable[Key] = (), dequantize: Dequantizer = dequantize_torch,
                 keep_quantized: bool = False):
        self.device = parse_device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MoestreamError("device='cuda' but torch sees no CUDA device")
        if queue_depth < 1:
            raise ValueError(f"queue_depth={queue_depth}: must be at least 1")
        chunk = parse_size(chunk_size, "chunk_size")
        if chunk < ALIGNMENT or chunk % ALIGNMENT:
            raise ValueError(f"chunk_size={chunk_size}: must be a positive multiple of {ALIGNMENT}")
        self.chunk_size = chunk
        self.keep_quantized = bool(keep_quantized)
        self.reader = StoreReader(path, verify=verify)
        self._closed = False
        # what _setup creates, in order; _release closes whatever exists (a failed setup too)
        self.arena: Optional[ExpertArena] = None
        self.l2_arena: Optional[ExpertArena] = None
        self.pool: Optional[BufferPool] = None
        self.backend = None
        self._files: list = []
        self._decoders: Optional[ThreadPoolExecutor] = None
        self._dispatcher: Optional[threading.Thread] = None
        try:
            self._setup(device_budget, host_budget, policy, io, queue_depth, decode_threads, prefetch_budget,
                        io_buffers, pinned_experts, dequantize)
        except BaseException:
            self._release()
            raise

    def _setup(self, device_budget, host_budget, policy, io, queue_depth, decode_threads, prefetch_budget,
               io_buffers, pinned_experts, dequantize) -> None:
        idx = self.reader.index
        self.index = idx
        self._dequantize = dequantize
        #: bytes the largest expert takes in a tier once loaded (decoded, or its quantized payload)
        self.max_decoded = max(self.held_length(r) for r in idx.extents.values())
        self.max_padded = max(r.padded_length for r in idx.extents.values())
        cuda = self.device.type == "cuda"
        avail = psutil.virtual_memory().available
        dev_free = torch.cuda.mem_get_info(self.device)[0] if cuda else avail
        l1 = resolve_budget(device_budget, "device_budget", free=dev_free,
                            where="of GPU memory free" if cuda else "of RAM available")
        # on a CPU L1 is host RAM already: the host tier is off unless asked for, and shares the RAM
        l2 = resolve_budget(host_budget, "host_budget", free=avail if cuda else max(0, avail - l1.bytes),
                            where="of RAM available" + ("" if cuda else " beside the device tier"),
                            default_share=DEFAULT_SHARE if cuda else None)
        #: how each budget was chosen, in words (generate prints them)
        self.budget_notes = {"device": l1.how, "host": l2.how}
        device_budget, host_budget = l1.bytes, l2.bytes
        # a CPU slot holds a decoded expert, or a plain extent's padded stored bytes read into it
        # with O_DIRECT (then every slot must start 4096-aligned); 64-byte aligned otherwise
        plain = [r.padded_length for r in idx.extents.values() if self._reads_into_slot(r)]
        self.slot_size = align_up(max([self.max_decoded] + plain), ALIGNMENT if plain else 64)
        need = self.max_decoded if cuda else self.slot_size
        if device_budget < need:
            what = "decoded" if need == self.max_decoded else f"decoded, in its {ALIGNMENT}-aligned slot"
            raise BudgetError(f"device_budget {format_size(device_budget)} is smaller than one expert "
                              f"({format_size(need)} {what}); give at least that")
        if 0 < host_budget < self.max_padded:
            raise BudgetError(f"host_budget {format_size(host_budget)} is smaller than one stored expert "
                              f"({format_size(self.max_padded)}); give at least that, or 0 to disable the host tier")
        pinned = set()
        for key in pinned_experts:
            try:
                layer, expert = key
            except (TypeError, ValueError):
                raise UsageError(f"pinned_experts: {key!r} is not a (layer, expert) pair") from None
            key = (_index(layer, "pinned layer"), _index(expert, "pinned expert"))
            if key not in idx.extents:
                raise UsageError(f"pinned_experts: the store has no layer {layer} expert {expert} (MoE layers "
                                 f"{list(idx.moe_layers)} x {idx.experts_per_layer} experts)")
            pinned.add(key)
        sweep = list(idx.moe_layers)
        if cuda:
            l1_budget = device_budget
        else:
            self.arena = ExpertArena(self.slot_size, device_budget // self.slot_size)
            l1_budget = self.arena.nbytes
        self.l1: TierCache[Key] = TierCache("device", l1_budget, policy, pinned=pinned, sweep=sweep)
        l2_slots = host_budget // self.max_padded
        if l2_slots:
            self.l2_arena = ExpertArena(self.max_padded, l2_slots, pin=cuda)
        self.l2: TierCache[Key] = TierCache("host", l2_slots * self.max_padded, policy, sweep=sweep)
        threads = decode_threads or max(2, min(8, os.cpu_count() or 2))
        self.pool = BufferPool(self.max_padded, io_buffers or threads + 2, pin=cuda)
        self.stats_ = StoreStats(l1_budget=l1_budget, l2_budget=self.l2.budget, io_buffer_bytes=self.pool.nbytes)
        registered = [(self.pool.addr, self.pool.nbytes)] + ([(self.arena.addr, self.arena.nbytes)] if self.arena else [])
        self.backend, reason = choose_backend(io, device=str(self.device), queue_depth=queue_depth,
                                              registered=registered)
        self.stats_.backend = self.backend.name
        self.stats_.backend_reason = reason
        notes = set()
        for p in self.reader.files:   # the backend owns its files (fds, or kvikio CuFiles)
            handle, note = self.backend.open(p)
            self._files.append(handle)
            if note:
                notes.add(note)
        self.stats_.direct_io = not notes and hasattr(os, "O_DIRECT")
        self.stats_.direct_io_note = "; ".join(sorted(notes))
        self._decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moestream-decode")
        self.prefetch_budget = parse_size(prefetch_budget, "prefetch_budget") if prefetch_budget is not None \
            else 4 * self.max_padded
        self._cv = threading.Condition()
        self._demand: deque[_Load] = deque()
        self._prefetch: deque[_Load] = deque()
        self._pending: dict[Key, _Load] = {}
        self._prefetched_unused: set[Key] = set()
        self._prefetch_inflight = 0
        self._demand_reading = 0   # demand loads whose reads have not all landed
        self._routed: tuple[int, frozenset] = (-1, frozenset())   # the layer routed last, its experts
        self._thread_state = threading.local()   # CUDA: each decode thread's own stream
        self._consumer_streams: set = set()       # CUDA: the streams fetch() was called on
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="moestream-dispatch", daemon=True)
        self._dispatcher.start()

    # ---- public API --------------------------------------------------------------------------
    def holds_quantized(self, region: Region) -> bool:
        """Whether this Store holds `region` in its quantized stored form (keep_quantized)."""
        return self.keep_quantized and holds_quantized(region)

    def held_length(self, region: Region) -> int:
        """Bytes `region`'s expert takes in a tier once loaded: its quantized payload when held in
        stored form, else its decoded tensors."""
        return region.raw_length if self.holds_quantized(region) else region.decoded_length

    def _reads_into_slot(self, region: Region) -> bool:
        """Whether the extent's stored bytes are what its slot holds (no codec stage, or a
        quantized payload held as stored with no zstd over it): read straight into the slot."""
        return _is_plain(region) or (self.holds_quantized(region) and len(region.chain) == 1)

    @property
    def config(self) -> dict:
        return self.reader.config

    @property
    def layers(self) -> list[int]:
        return self.reader.layers

    @property
    def experts_per_layer(self) -> int:
        return self.reader.experts_per_layer

    def fetch(self, layer: int, experts: Iterable[int]) -> list["Future[Experts]"]:
        """Start loading experts of `layer`; returns one future per expert, in the order asked.
        Never blocks on I/O. A future's result is {tensor name: tensor on device} (see the class
        docstring for ownership)."""
        out = []
        for _, got in self._fetch_many(layer, experts):
            if isinstance(got, Future):
                out.append(got)
            else:
                f: Future = Future()
                f.set_result(got)
                out.append(f)
        return out

    def fetch_ready(self, layer: int, experts: Iterable[int]) -> tuple[dict[int, Experts], dict["Future[Experts]", int]]:
        """fetch, split by what is cached: ({expert: tensors} of those in L1, handed out at once;
        {future: expert} of the others, loading). The decode loop computes the first without a
        future and a wait per expert: at decode most experts are hits, and their futures were
        most of a resident layer's bookkeeping (compute/models/common.py: stream_experts)."""
        ready, pending = {}, {}
        for e, got in self._fetch_many(layer, experts):
            if isinstance(got, Future):
                pending[got] = e
            else:
                ready[e] = got
        return ready, pending

    def _fetch_many(self, layer: int, experts: Iterable[int]) -> "list[tuple[int, Experts | Future[Experts]]]":
        """What fetch and fetch_ready share: (expert, its tensors when L1 holds it, else the
        future of its load), in the order asked."""
        out = []
        layer = _index(layer, "layer")
        experts = [_index(e, "expert") for e in experts]
        if self.device.type == "cuda":
            self._consumer_streams.add(torch.cuda.current_stream(self.device))
        with self._cv:
            self._check_open()
            self.l1.visit(layer)
            queued = len(self._demand)
            for e in experts:
                key = (layer, e)
                out.append((e, self._fetch_locked(key, self.reader.extent(*key))))
            hits = sum(not isinstance(x, Future) for _, x in out)
            self.stats_.add(requests=len(experts), hits_l1=hits)
            if len(self._demand) != queued:
                # only new demand reads concern the dispatcher: waking it for hits would cost
                # every cached expert a thread switch
                self._cv.notify_all()
        return out

    @property
    def holds_by_address(self) -> bool:
        """Whether hold_hits can hand out experts by address: a CPU store, whose L1 is an arena."""
        return self.arena is not None

    def hold_hits(self, layer: int, experts: Iterable[int],
                  wanted: Optional[Callable[[int, Region, bool], Any]] = None) -> dict[int, HeldExpert]:
        """Those of `experts` of `layer` that L1 holds now (and for which `wanted(expert, region,
        in stored form)`, when given, returns something true: kept as HeldExpert.layout), each
        slot pinned (never evicted or reused) until release_held: for a caller that reads the
        bytes by address, with no tensors made (a hand-out's views and their release cost ~6 us an
        expert, more than a decode step's kernel spends on it). Counted as requests and L1 hits,
        as fetch counts them; the experts not held are left alone (fetch those). {} where the
        store has no arena (holds_by_address)."""
        if self.arena is None:
            return {}
        layer = _index(layer, "layer")
        found: dict[Key, tuple[Region, bool, Any]] = {}
        with self._cv:
            self._check_open()
            self.l1.visit(layer)
            for e in experts:
                key = (layer, _index(e, "expert"))
                if self.l1.peek(key) is None:
                    continue
                region = self.index.extents[key]
                quantized = self.holds_quantized(region)
                layout = True if wanted is None else wanted(key[1], region, quantized)
                if layout:
                    found[key] = region, quantized, layout
            slots = self._pin_hits_locked(list(found))
        held = {key[1]: HeldExpert(slot, self.arena.slot_addr(slot), *found[key])
                for key, slot in zip(found, slots)}
        if held:
            self.stats_.add(requests=len(held), hits_l1=len(held))
        return held

    def release_held(self, held: dict[int, HeldExpert]) -> None:
        """Unpin the slots hold_hits pinned (once each): their experts may be evicted again."""
        self.arena.unpin_many([h.slot for h in held.values()])

    def note_routing(self, layer: int, experts: Iterable[int]) -> int:
        """The router of `layer` chose `experts` for this decode step. Feeds the next-use policy's
        per-expert frequencies and cancels queued prefetches of `layer` that guessed other
        experts. Returns how many prefetches were cancelled."""
        layer = _index(layer, "layer")
        chosen = frozenset(_index(e, "expert") for e in experts)
        with self._cv:
            wrong = self._note_routing_locked(layer, chosen)
        self.stats_.add(prefetch_cancelled=wrong)
        return wrong

    def _note_routing_locked(self, layer: int, chosen: frozenset) -> int:
        # note_routing's work, with self._cv held; returns how many prefetches it cancelled
        keys = [(layer, e) for e in chosen]
        self.l1.visit(layer, keys)
        if self.l2.budget:     # an L2 that holds nothing has no eviction to rank
            self.l2.visit(layer, keys)
        self._routed = (layer, chosen)
        wrong = [ld for ld in self._pending.values()
                 if ld.prefetch and not ld.cancelled and ld.key[0] == layer and ld.key[1] not in chosen]
        for ld in wrong:
            if ld in self._prefetch:   # still queued: dropped
                self._prefetch.remove(ld)
                del self._pending[ld.key]
                ld.future.set_exception(MoestreamError("prefetch cancelled: the router chose otherwise"))
            else:                      # dispatched: its reads not yet started never start
                ld.cancelled = True
        return len(wrong)

    def hold_routed(self, layer: int, experts: Sequence[int]) -> Optional[tuple[list[int], list[int]]]:
        """A decode step's whole routing when L1 holds every one of `experts` (distinct) of
        `layer`: note_routing and hold_hits in one lock, for a caller that reads the slots by
        address and already knows each expert's layout in them. Returns (slots, their addresses
        in bytes), in the order of `experts`, each slot pinned until release_slots; or None, with
        nothing noted, held or counted, when the store has no arena or L1 misses any of them (the
        caller then takes note_routing and fetch as usual)."""
        if self.arena is None:
            return None
        layer = _index(layer, "layer")
        keys = [(layer, _index(e, "expert")) for e in experts]
        with self._cv:
            self._check_open()
            peek = self.l1.peek
            if any(peek(key) is None for key in keys):
                return None
            wrong = self._note_routing_locked(layer, frozenset(e for _, e in keys))
            slots = self._pin_hits_locked(keys)
        self.stats_.add(prefetch_cancelled=wrong, requests=len(keys), hits_l1=len(keys))
        return slots, [self.arena.slot_addr(s) for s in slots]

    def _pin_hits_locked(self, keys: list[Key]) -> list[int]:
        # hold_hits' and hold_routed's: the L1 slots of `keys` (all held), each access counted by
        # the policy under one lock and each slot pinned under another; with self._cv held
        slots = self.l1.get_many(keys)
        self.arena.pin_many(slots)
        if self._prefetched_unused:
            for key in keys:
                self._note_prefetch_use(key)
        return slots

    def lease_resident(self) -> Optional[ResidentLease]:
        """A ResidentLease of every expert L1 holds now (the others 0, for refresh), or None where
        the store has no arena or L1's slots cannot hold every expert of the store (then hits are
        ranked for eviction, and pinning a layer's slots for long would take them from misses)."""
        if self.arena is None or self.arena.count < len(self.index.extents):
            return None
        width = self.index.experts_per_layer
        lease = ResidentLease(self, {layer: np.zeros(width, np.int64) for layer in self.index.moe_layers})
        with self._cv:
            self._check_open()
            for layer in lease.addresses:
                lease._take_in_locked(layer)
        return lease

    def release_slots(self, slots: list[int]) -> None:
        """Unpin the slots hold_routed pinned."""
        self.arena.unpin_many(slots)

    def get(self, layer: int, expert: int) -> Experts:
        """Blocking fetch of one expert."""
        (fut,) = self.fetch(layer, [expert])
        t0 = time.perf_counter()
        try:
            return fut.result()
        finally:
            self.stats_.add(stall_seconds=time.perf_counter() - t0)

    def as_completed(self, futures: Iterable["Future[Experts]"]) -> Iterator["Future[Experts]"]:
        """Yield futures as they complete (arrival order), counting the time spent blocked
        as stall time."""
        t0 = time.perf_counter()
        for f in _as_completed(list(futures)):
            self.stats_.add(stall_seconds=time.perf_counter() - t0)
            yield f
            t0 = time.perf_counter()

    def wait_first(self, futures: Iterable["Future[Experts]"]) -> "Future[Experts]":
        """Block until one of `futures` completes and return it (time blocked counts as stall)."""
        t0 = time.perf_counter()
        done, _ = _wait(list(futures), return_when=FIRST_COMPLETED)
        self.stats_.add(stall_seconds=time.perf_counter() - t0)
        return next(iter(done))

    @property
    def prefetching(self) -> bool:
        """Whether prefetched experts are being read, checksummed or decoded right now: work of
        the Store's threads that overlaps the caller's compute. Unlocked: a momentary answer,
        for compute to size its thread pool by."""
        return self._prefetch_inflight > 0

    @property
    def expert_slots(self) -> int:
        """How many of the largest decoded experts fit in the device budget (at least 1)."""
        if self.arena is not None:
            return self.arena.count
        return max(1, self.l1.budget // self.max_decoded)

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Queue experts to be loaded ahead of need, behind demand reads and within
        prefetch_budget bytes in flight. A prefetch never evicts an expert of its own layer
        (the one about to be computed) and is dropped when no other slot can be had. Returns
        how many were queued (0 for cached ones)."""
        n = 0
        layer = _index(layer, "layer")
        experts = [_index(e, "expert") for e in experts]
        with self._cv:
            self._check_open()
            self.l1.expect([(layer, e) for e in experts])
            for e in experts:
                key = (layer, e)
                region = self.reader.extent(*key)
                if key in self.l1 or key in self._pending:
                    continue
                load = _Load(key, region, Future(), prefetch=True)
                load.future.set_running_or_notify_cancel()
                self._pending[key] = load
                self._prefetch.append(load)
                n += 1
            self.stats_.add(prefetch_issued=n)
            self._cv.notify_all()
        return n

    def cancel_prefetch(self) -> int:
        """Drop queued prefetches that have not started reading. Returns how many."""
        n = self._drop_queued_prefetches("prefetch cancelled")
        self.stats_.add(prefetch_cancelled=n)
        return n

    def _drop_queued_prefetches(self, reason: str) -> int:
        with self._cv:
            n = len(self._prefetch)
            while self._prefetch:
                load = self._prefetch.popleft()
                self._pending.pop(load.key, None)
                load.future.set_exception(MoestreamError(reason))
            return n

    def dense(self) -> dict[str, torch.Tensor]:
        """Every dense tensor on `device` (read once; the caller keeps them)."""
        self._check_open()
        return {k: v.to(self.device) for k, v in self.reader.dense().items()}

    @property
    def path(self):
        """The store directory."""
        return self.reader.path

    @property
    def blobs(self) -> list[str]:
        """Names of the files the store carries (tokenizer files, generation_config.json)."""
        return sorted(self.reader.index.blobs)

    def blob(self, name: str) -> bytes:
        """A carried file's bytes; MoestreamError naming what is carried when it is not."""
        self._check_open()
        if name not in self.reader.index.blobs:
            raise MoestreamError(f"{self.path}: the store carries no {name} "
                                 f"(carried: {', '.join(self.blobs) or 'nothing'})")
        return self.reader.blob(name)

    def stats(self) -> dict:
        """A snapshot of every counter (StoreStats fields plus derived rates)."""
        self.stats_.l1_bytes, self.stats_.l1_peak, self.stats_.evictions_l1 = self.l1.used, self.l1.peak, self.l1.evictions
        self.stats_.l2_bytes, self.stats_.l2_peak, self.stats_.evictions_l2 = self.l2.used, self.l2.peak, self.l2.evictions
        return self.stats_.snapshot()

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._drop_queued_prefetches("store closed")
        self._release()

    def _release(self) -> None:
        """Stop the threads and close everything this Store opened, in reverse order (also after
        a failed construction: no thread or file descriptor outlives it)."""
        if self._dispatcher is not None:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            self._dispatcher.join()
        if self.backend is not None:
            self.backend.close()   # completes or fails every read in flight (kvikio: closes its CuFiles)
        if self._decoders is not None:
            self._decoders.shutdown(wait=True)
        for handle in self._files:
            self.backend.close_file(handle)
        self._files = []
        for resource in (self.pool, self.arena, self.l2_arena):
            if resource is not None:
                resource.close()
        self.reader.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals: lookup -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise MoestreamError(f"{self.reader.path}: the store is closed")

    def _hand_out(self, key: Key, value) -> Experts:
        """A result for an L1 entry: slot views (CPU) or the cached tensors in a new dict (CUDA)."""
        if self.arena is not None:
            region = self.index.extents[key]
            return self.arena.hand_out(value, region, quantized=self.holds_quantized(region))
        return dict(value)

    def _fetch_locked(self, key: Key, region: Region) -> "Experts | Future[Experts]":
        """An L1 hit's tensors (the caller counts the hit), or the future of its load."""
        cached = self.l1.get(key)
        if cached is not None:
            self._note_prefetch_use(key)
            return self._hand_out(key, cached)
        load = self._pending.get(key)
        if load is not None:
            self.stats_.add(joined_inflight=1)
            load.cancelled = False   # wanted after all: reads withdrawn meanwhile are issued again
            if load.prefetch:   # a guess asked for before it landed: used, late
                self.stats_.add(prefetch_used=1, prefetch_late=1)
                load.prefetch = False
                if load in self._prefetch:  # still queued: move it ahead as a demand read
                    self._prefetch.remove(load)
                    self._demand.append(load)
            return load.future
        load = _Load(key, region, Future(), prefetch=False, tick=self.l1.next_tick())
        load.future.set_running_or_notify_cancel()
        self._pending[key] = load
        if key in self.l2:
            self.stats_.add(hits_l2=1)
        else:
            self.stats_.add(misses=1)
        self._demand.append(load)
        return load.future

    def _note_prefetch_use(self, key: Key) -> None:
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self.stats_.add(prefetch_used=1)

    # ---- internals: slots --------------------------------------------------------------------
    def _claim_slot(self, arena: ExpertArena, cache: TierCache, keep=None) -> Optional[tuple[int, Optional[Key]]]:
        """A slot of `arena` for a new entry of `cache`: a free one, or the slot of the entry the
        policy evicts (never one a reader holds, nor one `keep` names). Returns (slot, evicted
        key or None), or None when no slot can be had. Called with self._cv held."""
        slot = arena.take()
        if slot is not None:
            return slot, None
        victim = cache.victim(exclude=lambda k: arena.pinned(cache.peek(k)) or (keep is not None and keep(k)))
        if victim is None:
            return None
        return cache.pop(victim), victim

    def _reserve_slot(self, load: _Load) -> bool:
        """Give `load` an L1 slot (CPU arena), evicting by policy. Called with self._cv held.
        False when every slot is held by callers (or, for a prefetch, by experts that must
        stay): a demand load is then decoded into new tensors and not cached."""
        layer = load.key[0]
        routed_layer, routed = self._routed

        def needed(k: Key) -> bool:  # a prefetch never evicts what the layer about to run, or the running one, needs
            return k[0] == layer or (k[0] == routed_layer and k[1] in routed)

        claimed = self._claim_slot(self.arena, self.l1, needed if load.prefetch else None)
        if claimed is None:
            return False
        load.slot, evicted = claimed
        if evicted is not None:
            self._evicted(evicted)
        return True

    def _evicted(self, key: Key) -> None:
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self.stats_.add(prefetch_wasted_bytes=self.index.extents[key].padded_length)

    # ---- internals: reads --------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._demand or self._prefetch_allowed())
                if self._demand:
                    load = self._demand.popleft()
                elif self._prefetch and not self._closed:
                    load = self._prefetch.popleft()
                elif self._closed:
                    return
                else:
                    continue
                if self.arena is not None and not self._reserve_slot(load):
                    if load.prefetch:
                        self._pending.pop(load.key, None)
                        self.stats_.add(prefetch_skipped=1)
                        load.future.set_exception(MoestreamError("prefetch skipped: no slot it may take"))
                        continue
                    self.stats_.add(uncached_decodes=1)
                if load.prefetch:
                    self._prefetch_inflight += load.region.padded_length
                    load.counted_prefetch = True
                l2_slot = self.l2.get(load.key) if self.l2.budget else None
                if l2_slot is not None:
                    self.l2_arena.pin(l2_slot)
                    load.l2_slot = l2_slot
                elif not load.prefetch:
                    self._demand_reading += 1
                    load.counted_demand = True
            if load.l2_slot is not None:
                self._submit_decode(load, None)
            elif load.slot is not None and self._reads_into_slot(load.region):
                self._issue(load, None)   # straight into the L1 slot
            elif reads_to_device(self.device, self.backend.name, load.region, self.reader.verify):
                load.device_buf = torch.empty(load.region.padded_length, dtype=torch.uint8, device=self.device)
                self._issue(load, None)   # straight into device memory
            else:
                self._issue(load, self.pool.acquire())
            # the load's future will hold its result, which pins its slot: keep no reference
            # here while waiting for the next one
            del load

    def _prefetch_allowed(self) -> bool:
        # A prefetch waits until no demand read is queued or on the disk: a read in flight
        # cannot be overtaken, so a guess issued ahead of the layer's own misses would delay
        # them (measured: prefetch made decode slower until this rule). Once the misses have
        # landed the disk is idle while they are computed, which is when guesses should read.
        if not self._prefetch or self._demand or self._demand_reading:
            return False
        # one prefetch may always run when none does, even if a single extent exceeds the budget
        size = self._prefetch[0].region.padded_length
        return self._prefetch_inflight == 0 or self._prefetch_inflight + size <= self.prefetch_budget

    def _issue(self, load: _Load, slab) -> None:
        """Read the padded extent into `slab`, or into the load's L1 slot when slab is None."""
        r = load.region
        fd, path = self._files[r.file], str(self.reader.files[r.file])
        offsets = list(range(0, r.padded_length, self.chunk_size))
        load.chunks_left = len(offsets)
        load.started = time.perf_counter()
        self.stats_.add(reads=1)
        if slab is not None:
            base_addr, view, buf_index = slab.addr, slab.view, 0
        elif load.device_buf is not None:   # kvikio takes device tensors; no registered buffer
            self.stats_.add(device_reads=1)
            base_addr, view, buf_index = 0, load.device_buf, None
        else:
            base_addr, view, buf_index = self.arena.slot_addr(load.slot), self.arena.slot_view(load.slot), 1
        for off in offsets:
            n = min(self.chunk_size, r.padded_length - off)
            need = min(n, max(0, r.length - off))
            # buf_index names the registered buffer the destination lies in (0 the pool, 1 the
            # arena, in the order given to choose_backend); a backend that registered none ignores it
            req = ReadRequest(fd, path, r.offset + off, n, view[off:off + n], addr=base_addr + off, need=need,
                              buf_index=buf_index, ticket=load)
            try:
                fut = self.backend.submit(req)
            except BaseException as e:  # backend closed or broken
                fut = Future()
                fut.set_exception(e)
            fut.add_done_callback(lambda f, load=load, slab=slab: self._chunk_done(load, slab, f))

    def _chunk_done(self, load: _Load, slab, fut: Future) -> None:
        with load.lock:
            exc = fut.exception()
            if exc is not None and load.error is None:
                load.error = exc
            elif exc is None:
                load.bytes_done += fut.result()
                self.stats_.add(bytes_read=fut.result())
            load.chunks_left -= 1
            last = load.chunks_left == 0
        if not last:
            return
        with self._cv:
            if load.counted_demand:
                load.counted_demand = False
                self._demand_reading -= 1
            again = isinstance(load.error, ReadCancelled) and not load.cancelled
            if again:   # withdrawn, then asked for before it ended: read it all again, as a demand
                load.error = None
                self._demand_reading += 1
                load.counted_demand = True
            self._cv.notify_all()
        if again:
            self._issue(load, slab)
            return
        self.stats_.add(read_seconds=time.perf_counter() - load.started, stored_bytes_read=load.region.length)
        if load.error is not None:
            if slab is not None:
                self.pool.release(slab)
            load.device_buf = None
            self._finish(load, error=load.error)
            return
        self._submit_decode(load, slab)

    def _submit_decode(self, load: _Load, slab) -> None:
        try:
            self._decoders.submit(self._decode, load, slab)
        except RuntimeError as e:  # decoders shut down
            if slab is not None:
                self.pool.release(slab)
            if load.l2_slot is not None:
                self.l2_arena.unpin(load.l2_slot)
            self._finish(load, error=e)

    # ---- internals: decode -------------------------------------------------------------------
    def _decode(self, load: _Load, slab) -> None:
        """Checksum and decode the stored bytes (in the L1 slot, a slab, an L2 slot, or device
        memory) into the load's L1 slot, or into new tensors when it has none."""
        t0 = time.perf_counter()
        r = load.region
        if load.l2_slot is not None:
            stored = self.l2_arena.slot_view(load.l2_slot)[:r.length]
        elif slab is not None:
            stored = slab.view[:r.length]
        elif load.device_buf is not None:   # never verified: see reads_to_device
            stored = load.device_buf[:r.length]
        else:
            stored = self.arena.slot_view(load.slot)[:r.length]
        try:
            if self.reader.verify and load.l2_slot is None:  # L2 bytes were checked when read
                self.reader.check(r, stored, load.key)      # ChecksumError naming file, offset, expert
            t1 = time.perf_counter()
            tensors = None
            if load.device_buf is not None:   # read where it is used: its tensors are views of it
                tensors = self.reader.decode(r, stored, load.key, device=self.device, alias=True)
                self._mark_consumers(tensors)
            elif slab is not None or load.l2_slot is not None:
                if self.device.type == "cuda":
                    tensors = self._decode_cuda(load, stored)
                elif self.holds_quantized(r):   # undo zstd; the codes stay codes
                    payload = unpack_payload(r, stored, path=str(self.reader.files[r.file]), extent=load.key)
                    if load.slot is not None:
                        np.frombuffer(self.arena.slot_view(load.slot), np.uint8, count=r.raw_length)[:] = payload
                    else:   # no slot to keep it in: a copy the caller owns
                        tensors = quantized_views(r, torch.from_numpy(payload.copy()))
                else:
                    out = slot_tensor(self.arena, load.slot) if load.slot is not None else None
                    tensors = self.reader.decode(r, stored, load.key, dequantize=self._dequantize, out=out)
                if slab is not None and self._keeps_in_l2(r):
                    self._put_l2(load.key, stored)
        except BaseException as e:
            self._release_sources(load, slab)
            self._finish(load, error=e)
            return
        self._release_sources(load, slab)
        self.stats_.add(bytes_decoded=self.held_length(r), checksum_seconds=t1 - t0,
                        decode_seconds=time.perf_counter() - t1)
        self._finish(load, tensors=tensors)

    def _decode_cuda(self, load: _Load, stored) -> Experts:
        """Copy (pinned host -> device) and dequantize one expert on this decode thread's own
        CUDA stream, then wait for that stream's event: only this expert's copy and kernels, never
        the caller's queued matmuls (a device or current-stream synchronize would wait for them
        too). The tensors are complete when handed out, so any stream may read them at once."""
        stream = getattr(self._thread_state, "stream", None)
        if stream is None:
            stream = self._thread_state.stream = torch.cuda.Stream(self.device)
        r = load.region
        with torch.cuda.stream(stream):
            try:
                if self.holds_quantized(r):   # codes and scales to the device as they are
                    payload = unpack_payload(r, stored, path=str(self.reader.files[r.file]), extent=load.key)
                    tensors = quantized_views(r, payload_tensor(payload).to(self.device, non_blocking=True))
                else:
                    tensors = self.reader.decode(r, stored, load.key, device=self.device,
                                                 dequantize=self._dequantize)
            finally:   # a failed decode too: its copies may be reading the pinned source
                done = torch.cuda.Event()
                done.record(stream)
                done.synchronize()   # the pinned source may be reused after this
        self._mark_consumers(tensors)
        return tensors

    def _mark_consumers(self, tensors: Experts) -> None:
        # the blocks were allocated on a Store thread's stream: without record_stream, freeing
        # them (on eviction) could let that stream reuse them while a caller's kernels still read them
        for consumer in list(self._consumer_streams):
            for t in tensors.values():
                (t.codes if isinstance(t, QuantizedTensor) else t).record_stream(consumer)   # one allocation

    def _release_sources(self, load: _Load, slab) -> None:
        load.device_buf = None   # its tensors, if any, keep the memory alive
        if slab is not None:
            self.pool.release(slab)
        if load.l2_slot is not None:
            self.l2_arena.unpin(load.l2_slot)
            load.l2_slot = None

    def _keeps_in_l2(self, r: Region) -> bool:
        # on a CPU device a plain extent's stored bytes are its L1 bytes: a copy adds nothing
        return bool(self.l2.budget) and not (self.arena is not None and _is_plain(r))

    def _put_l2(self, key: Key, stored) -> None:
        with self._cv:
            if key in self.l2:
                return
            claimed = self._claim_slot(self.l2_arena, self.l2)
            if claimed is None:
                return
            slot = claimed[0]
            self.l2_arena.pin(slot)
        try:
            self.l2_arena.slot_view(slot)[:len(stored)] = stored
        finally:
            self.l2_arena.unpin(slot)
        with self._cv:
            self.l2.put(key, slot, self.l2_arena.slot_size)

    def _finish(self, load: _Load, tensors: Optional[Experts] = None, error: Optional[BaseException] = None) -> None:
        result = None
        with self._cv:
            cached = False
            try:
                if self._pending.get(load.key) is load:
                    del self._pending[load.key]
                if load.counted_prefetch:
                    self._prefetch_inflight -= load.region.padded_length
                if error is not None and load.cancelled:
                    self.stats_.add(prefetch_wasted_bytes=load.bytes_done)
                if error is None:
                    if load.slot is not None:
                        self.l1.put(load.key, load.slot, self.arena.slot_size, tick=load.tick)
                        cached = True
                        result = self._hand_out(load.key, load.slot)
                    else:
                        if self.arena is None:  # CUDA: cache the new tensors
                            for k in self.l1.put(load.key, tensors, _tensor_bytes(tensors), tick=load.tick):
                                self._evicted(k)
                        result = dict(tensors)
                    if load.prefetch:
                        self._prefetched_unused.add(load.key)
            except BaseException as e:   # whatever fails here, the caller's future must still end
                error, result = e, None
            finally:
                if error is not None and load.slot is not None and not cached:
                    self.arena.give(load.slot)   # never cached: its slot is free again
                self._cv.notify_all()
        # the result pins its slot: once the future has it, this thread keeps no reference (a
        # caller that drops the result right away must find the slot free again)
        fut, load.future = load.future, None
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
            del result

def open(path: str | os.PathLike, *, device: str = "cpu", device_budget: int | str | None = None,
         host_budget: int | str | None = None, policy: str = "next-use", io: str = "auto", verify: bool = True,
         **options) -> Store:
    """Open a store for streaming experts (see `Store` for every option)."""
    return Store(path, device=device, device_budget=device_budget, host_budget=host_budget, policy=policy, io=io,
                 verify=verify, **options)
