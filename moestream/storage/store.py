"""The Store: experts on demand from a tiered cache (L1 device, L2 host, L3 file).

Data path of a miss: a dispatcher thread takes the next load (demand reads before prefetches;
prefetch bytes in flight bounded), borrows an aligned slab from the BufferPool and splits the
extent into `chunk_size` reads for the backend. When the last chunk lands, a decode worker
copies the stored bytes out of the slab (they become the L2 entry), gives the slab back,
checks the checksum, undoes zstd/shuffle/delta, dequantizes on the target device and puts
the tensors in L1. Reading of one expert thus overlaps the decoding of the previous ones.

L2 holds *stored* bytes (compressed, quantized), not decoded tensors: per byte of budget it
holds ratio-times more experts, and on a CPU device decoded L2 entries would duplicate L1
(measured by bench/l2_tier.py; figures and caveats in docs/STORAGE.md)."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait
from concurrent.futures import as_completed as _as_completed
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import psutil
import torch

from ..errors import BudgetError, MoestreamError
from ..formats.codecs import Dequantizer, dequantize_torch
from ..formats.constants import ALIGNMENT
from ..formats.index import Region
from ..formats.reader import StoreReader
from ..units import format_size, parse_size
from .backends import ReadRequest, choose_backend, open_direct
from .buffers import BufferPool
from .cache import TierCache
from .stats import StoreStats

Key = tuple[int, int]
Experts = dict[str, torch.Tensor]


@dataclass
class _Load:
    key: Key
    region: Region
    future: Future
    prefetch: bool
    counted_prefetch: bool = False      # its bytes count against prefetch_budget while in flight
    started: float = 0.0
    chunks_left: int = 0
    error: Optional[BaseException] = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _tensor_bytes(tensors: Experts) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Store:
    """Experts of one store, served as torch tensors on `device`. Thread-safe; use as a context
    manager. Tensors handed out are owned by the caller and stay valid after eviction.

    device_budget: bytes of decoded experts kept on `device` (L1). Default: a quarter of free
    device memory (CUDA) or of available RAM (CPU).
    host_budget: bytes of stored extents kept in host RAM (L2); 0 disables L2. Default: a
    quarter of available RAM.
    policy: "lru" or "lfu" (with aging). io: "auto", "uring", "posix" or "kvikio".
    verify: check each extent's xxh3-64 before decoding it.
    queue_depth: reads in flight in the backend; chunk_size: bytes per read request.
    prefetch_budget: bytes of prefetch reads in flight (default: 4 extents).
    pinned_experts: (layer, expert) keys never evicted from L1 (a hot set from a routing profile).
    dequantize: dequantizer for int extents (compute/ passes Numba kernels; default plain torch)."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 device_budget: int | str | None = None, host_budget: int | str | None = None,
                 policy: str = "lru", io: str = "auto", verify: bool = True, queue_depth: int = 32,
                 chunk_size: int | str = 1 << 20, decode_threads: Optional[int] = None,
                 prefetch_budget: int | str | None = None, io_buffers: Optional[int] = None,
                 pinned_experts: Iterable[Key] = (), dequantize: Dequantizer = dequantize_torch):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MoestreamError("device='cuda' but torch sees no CUDA device")
        if queue_depth < 1:
            raise ValueError(f"queue_depth={queue_depth}: must be at least 1")
        chunk = parse_size(chunk_size, "chunk_size")
        if chunk < ALIGNMENT or chunk % ALIGNMENT:
            raise ValueError(f"chunk_size={chunk_size}: must be a positive multiple of {ALIGNMENT}")
        self.chunk_size = chunk
        self.reader = StoreReader(path, verify=verify)
        self._closed = False
        try:
            self._setup(device_budget, host_budget, policy, io, queue_depth, decode_threads, prefetch_budget,
                        io_buffers, pinned_experts, dequantize)
        except BaseException:
            self.reader.close()
            raise

    def _setup(self, device_budget, host_budget, policy, io, queue_depth, decode_threads, prefetch_budget,
               io_buffers, pinned_experts, dequantize) -> None:
        idx = self.reader.index
        self.index = idx
        self._dequantize = dequantize
        self.max_decoded = max(r.decoded_length for r in idx.extents.values())
        self.max_padded = max(r.padded_length for r in idx.extents.values())
        avail = psutil.virtual_memory().available
        if device_budget is None:
            device_budget = (torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else avail) // 4
        if host_budget is None:
            host_budget = avail // 4
        device_budget = parse_size(device_budget, "device_budget")
        host_budget = parse_size(host_budget, "host_budget")
        if device_budget < self.max_decoded:
            raise BudgetError(f"device_budget {format_size(device_budget)} is smaller than one expert "
                              f"({format_size(self.max_decoded)} decoded); give at least that")
        max_stored = max(r.length for r in idx.extents.values())
        if 0 < host_budget < max_stored:
            raise BudgetError(f"host_budget {format_size(host_budget)} is smaller than one stored expert "
                              f"({format_size(max_stored)}); give at least that, or 0 to disable the host tier")
        pinned = set(pinned_experts)
        self.l1: TierCache[Key] = TierCache("device", device_budget, policy, pinned=pinned)
        self.l2: TierCache[Key] = TierCache("host", host_budget, policy)
        threads = decode_threads or max(2, min(8, os.cpu_count() or 2))
        self.pool = BufferPool(self.max_padded, io_buffers or threads + 2, pin=self.device.type == "cuda")
        self.stats_ = StoreStats(l1_budget=device_budget, l2_budget=host_budget, io_buffer_bytes=self.pool.nbytes)
        self.backend, reason = choose_backend(io, device=str(self.device), queue_depth=queue_depth,
                                              registered=[(self.pool.addr, self.pool.nbytes)])
        self.stats_.backend = self.backend.name
        self.stats_.backend_reason = reason
        self._fds: list[int] = []
        notes = set()
        for p in self.reader.files:
            fd, note = open_direct(p)
            self._fds.append(fd)
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
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="moestream-dispatch", daemon=True)
        self._dispatcher.start()

    # ---- public API --------------------------------------------------------------------------
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
        Never blocks on I/O. A future's result is {tensor name: tensor on device}."""
        out = []
        with self._cv:
            self._check_open()
            for e in experts:
                key = (layer, int(e))
                region = self.reader.extent(*key)
                self.stats_.add(requests=1)
                out.append(self._fetch_locked(key, region))
            self._cv.notify_all()
        return out

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
    def expert_slots(self) -> int:
        """How many of the largest decoded experts fit in the device budget (at least 1)."""
        return max(1, self.l1.budget // self.max_decoded)

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Queue experts to be loaded ahead of need, behind demand reads and within
        prefetch_budget bytes in flight. Returns how many were queued (0 for cached ones)."""
        n = 0
        with self._cv:
            self._check_open()
            for e in experts:
                key = (layer, int(e))
                region = self.reader.extent(*key)
                if key in self.l1 or key in self._pending:
                    continue
                load = _Load(key, region, Future(), prefetch=True)
                load.future.set_running_or_notify_cancel()
                self._pending[key] = load
                stored = self.l2.get(key)
                if stored is not None:
                    self._decoders.submit(self._decode, load, stored, from_l2=True)
                else:
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
        return {k: v.to(self.device) for k, v in self.reader.dense().items()}

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
        self._dispatcher.join()
        self.backend.close()
        self._decoders.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self.pool.close()
        self.reader.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise MoestreamError("store is closed")

    def _fetch_locked(self, key: Key, region: Region) -> "Future[Experts]":
        cached = self.l1.get(key)
        if cached is not None:
            self.stats_.add(hits_l1=1)
            self._note_prefetch_use(key)
            f: Future = Future()
            f.set_result(cached)
            return f
        load = self._pending.get(key)
        if load is not None:
            self.stats_.add(joined_inflight=1)
            if load.prefetch:
                self._note_prefetch_use(key)
                load.prefetch = False
                if load in self._prefetch:  # still queued: move it ahead as a demand read
                    self._prefetch.remove(load)
                    self._demand.append(load)
            return load.future
        load = _Load(key, region, Future(), prefetch=False)
        load.future.set_running_or_notify_cancel()
        self._pending[key] = load
        stored = self.l2.get(key)
        if stored is not None:
            self.stats_.add(hits_l2=1)
            self._decoders.submit(self._decode, load, stored, from_l2=True)
        else:
            self.stats_.add(misses=1)
            self._demand.append(load)
        return load.future

    def _note_prefetch_use(self, key: Key) -> None:
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self.stats_.add(prefetch_used=1)

    def _dispatch_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._demand or self._prefetch_allowed())
                if self._demand:
                    load = self._demand.popleft()
                elif self._prefetch and not self._closed:
                    load = self._prefetch.popleft()
                    self._prefetch_inflight += load.region.padded_length
                    load.counted_prefetch = True
                elif self._closed:
                    return
                else:
                    continue
            slab = self.pool.acquire()
            self._issue(load, slab)

    def _prefetch_allowed(self) -> bool:
        # one prefetch may always run when none does, even if a single extent exceeds the budget
        if not self._prefetch:
            return False
        size = self._prefetch[0].region.padded_length
        return self._prefetch_inflight == 0 or self._prefetch_inflight + size <= self.prefetch_budget

    def _issue(self, load: _Load, slab) -> None:
        r = load.region
        fd, path = self._fds[r.file], str(self.reader.files[r.file])
        offsets = list(range(0, r.padded_length, self.chunk_size))
        load.chunks_left = len(offsets)
        load.started = time.perf_counter()
        self.stats_.add(reads=1)
        kv = self.backend.name == "kvikio"
        for off in offsets:
            n = min(self.chunk_size, r.padded_length - off)
            need = min(n, max(0, r.length - off))
            dest = slab.tensor[off:off + n].numpy() if kv else slab.view[off:off + n]
            req = ReadRequest(fd, path, r.offset + off, n, dest, addr=slab.addr + off, need=need,
                              buf_index=0 if getattr(self.backend, "registered", False) else None)
            try:
                fut = self.backend.submit(req)
            except BaseException as e:  # backend closed or broken
                fut = Future()
                fut.set_exception(e)
            fut.add_done_callback(lambda f, load=load, slab=slab, n=n: self._chunk_done(load, slab, f, n))

    def _chunk_done(self, load: _Load, slab, fut: Future, n: int) -> None:
        with load.lock:
            exc = fut.exception()
            if exc is not None and load.error is None:
                load.error = exc
            elif exc is None:
                self.stats_.add(bytes_read=fut.result())
            load.chunks_left -= 1
            last = load.chunks_left == 0
        if not last:
            return
        self.stats_.add(read_seconds=time.perf_counter() - load.started)
        if load.error is not None:
            self.pool.release(slab)
            self._finish(load, error=load.error)
            return
        try:
            self._decoders.submit(self._decode, load, slab)
        except RuntimeError as e:  # decoders shut down
            self.pool.release(slab)
            self._finish(load, error=e)

    def _decode(self, load: _Load, source, from_l2: bool = False) -> None:
        t0 = time.perf_counter()
        r = load.region
        if from_l2:
            stored = source
        else:  # the copy out of the slab is the L2 entry; the slab goes back at once
            try:
                stored = bytes(source.view[:r.length])
            finally:
                self.pool.release(source)
            self.stats_.add(stored_bytes_read=r.length)
        try:
            if self.reader.verify:
                self.reader.check(r, stored, load.key)
            tensors = self.reader.decode(r, stored, load.key, device=self.device, dequantize=self._dequantize)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except BaseException as e:
            self._finish(load, error=e)
            return
        nbytes = _tensor_bytes(tensors)
        self.stats_.add(bytes_decoded=nbytes, decode_seconds=time.perf_counter() - t0)
        if not from_l2 and self.l2.budget:
            self.l2.put(load.key, stored, len(stored))
        self.l1.put(load.key, tensors, nbytes)
        self._finish(load, result=tensors)

    def _finish(self, load: _Load, result: Optional[Experts] = None, error: Optional[BaseException] = None) -> None:
        with self._cv:
            if self._pending.get(load.key) is load:
                del self._pending[load.key]
            if load.counted_prefetch:
                self._prefetch_inflight -= load.region.padded_length
            if load.prefetch and error is None:
                self._prefetched_unused.add(load.key)
            self._cv.notify_all()
        if error is not None:
            load.future.set_exception(error)
        else:
            load.future.set_result(result)


def open(path: str | os.PathLike, *, device: str = "cpu", device_budget: int | str | None = None,
         host_budget: int | str | None = None, policy: str = "lru", io: str = "auto", verify: bool = True,
         **options) -> Store:
    """Open a store for streaming experts (see `Store` for every option)."""
    return Store(path, device=device, device_budget=device_budget, host_budget=host_budget, policy=policy, io=io,
                 verify=verify, **options)
