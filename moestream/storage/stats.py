"""Counters of every stage of the store; `Store.stats()` returns a snapshot."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class StoreStats:
    """All sizes in bytes, all times in seconds."""
    backend: str = ""
    backend_reason: str = ""
    direct_io: bool = False
    direct_io_note: str = ""
    requests: int = 0              # experts asked for by fetch/get
    hits_l1: int = 0               # served decoded from the device tier
    hits_l2: int = 0               # served from stored bytes in host memory (decode only)
    misses: int = 0                # read from the file (L3)
    joined_inflight: int = 0       # asked for while already being loaded (demand or prefetch)
    bytes_read: int = 0            # bytes the disk delivered (aligned extents, incl. padding)
    stored_bytes_read: int = 0     # the extents' stored bytes within bytes_read
    reads: int = 0                 # extent reads issued to the backend
    device_reads: int = 0          # ... of which read straight into device memory (kvikio, GPUDirect Storage)
    bytes_decoded: int = 0         # bytes of tensors produced by decoding
    checksum_seconds: float = 0.0  # xxh3 of stored bytes, summed over decode threads
    decode_seconds: float = 0.0    # undoing codecs and dequantizing, summed over decode threads
    uncached_decodes: int = 0      # misses decoded outside L1: every slot was held by callers
    read_seconds: float = 0.0      # summed over extents, submit to last byte
    stall_seconds: float = 0.0     # time callers spent blocked waiting for experts
    prefetch_issued: int = 0
    prefetch_used: int = 0         # prefetched experts later asked for
    prefetch_late: int = 0         # ... of which asked for while still being read (the caller waited for the rest)
    prefetch_cancelled: int = 0    # queued guesses dropped (the router chose otherwise, or cancel_prefetch)
    prefetch_skipped: int = 0      # guesses dropped because no slot could be taken without evicting a needed expert
    prefetch_wasted_bytes: int = 0 # bytes of prefetched experts evicted before any use
    evictions_l1: int = 0
    evictions_l2: int = 0
    l1_bytes: int = 0
    l1_budget: int = 0
    l1_peak: int = 0
    l2_bytes: int = 0
    l2_budget: int = 0
    l2_peak: int = 0
    io_buffer_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self.lock:
            d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}
        d["prefetch_accuracy"] = d["prefetch_used"] / d["prefetch_issued"] if d["prefetch_issued"] else None
        served = d["hits_l1"] + d["hits_l2"] + d["misses"]
        d["hit_rate_l1"] = d["hits_l1"] / served if served else None
        return d
