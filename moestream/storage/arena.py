"""Preallocated host memory for decoded experts: the device tier (L1) of a CPU store.

One page-aligned anonymous mapping is carved into `count` equal slots, each large enough for
the biggest decoded expert and for its padded stored bytes. A slot belongs to one cached
expert. Reads of lossless extents land in the slot itself (O_DIRECT into the final tensor's
memory), int extents are dequantized from the read slab straight into it, so a miss allocates
nothing and copies nothing.

Ownership: tensors handed out by `hand_out` are views of the slot. Each hand-out exports the
slot through its own memoryview, watched by a finalizer: while any tensor derived from it is
alive (a view of a view counts too), the slot is *pinned* and cannot be reused. Eviction
therefore never changes a tensor a caller still holds; it only returns the slot once the
caller has let go."""
from __future__ import annotations

import functools
import threading
import weakref
import torch

from ..formats.codecs import TORCH_DTYPES
from ..formats.index import Region
from ..formats.quantized import quantized_views
from .buffers import AlignedMap


class ExpertArena:
    """`count` slots of `slot_size` bytes (a multiple of 4096) in one aligned mapping."""

    def __init__(self, slot_size: int, count: int, *, pin: bool = False):
        self.map = AlignedMap(slot_size * count, pin=pin)
        self.slot_size, self.count = slot_size, count
        self.addr, self.nbytes = self.map.addr, self.map.nbytes
        self._whole = memoryview(self.map.buffer)
        self._pins = [0] * count
        self._free = list(reversed(range(count)))   # slots no cache entry owns
        self._lock = threading.Lock()
        #: the weak references that watch hand-outs, by id: a weakref lives only while something holds it
        self._watches: dict[int, weakref.ref] = {}

    def slot_view(self, slot: int) -> memoryview:
        """The slot's bytes (writable); for readers and decoders that fill it."""
        return self._whole[slot * self.slot_size:(slot + 1) * self.slot_size]

    def slot_addr(self, slot: int) -> int:
        return self.addr + slot * self.slot_size

    def take(self) -> int | None:
        """A slot no cache entry owns, or None when every slot is owned."""
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        """Return a slot that `take` gave and that no cache entry owns any more."""
        with self._lock:
            self._free.append(slot)

    @property
    def free(self) -> int:
        """How many slots no cache entry (nor a load in flight) owns."""
        with self._lock:
            return len(self._free)

    def pinned(self, slot: int) -> bool:
        """Whether tensors handed out from `slot` are still alive somewhere."""
        return self._pins[slot] > 0

    def pin(self, slot: int) -> None:
        """Keep `slot` from being reused until `unpin` (e.g. while a decoder reads it)."""
        self.pin_many([slot])

    def unpin(self, slot: int) -> None:
        self.unpin_many([slot])

    def pin_many(self, slots: list[int]) -> None:
        """pin of each of `slots` (a slot may come twice: pinned twice), under one lock."""
        with self._lock:
            for slot in slots:
                self._pins[slot] += 1

    def unpin_many(self, slots: list[int]) -> None:
        """unpin of each of `slots`, under one lock."""
        with self._lock:
            for slot in slots:
                assert self._pins[slot] > 0, "slot unpinned more often than pinned"
                self._pins[slot] -= 1

    def hand_out(self, slot: int, region: Region, quantized: bool = False) -> dict:
        """Fresh tensors over the decoded tensors of `region` held in `slot` (a new dict each
        call: callers may modify the dict; the slot stays pinned while any tensor lives). With
        `quantized` the slot holds the region's quantized payload, handed out as QuantizedTensor
        views of it (formats/quantized.py)."""
        mv = self.slot_view(slot)
        self.pin(slot)
        # a plain weak reference with a callback: weakref.finalize cost 2.5 of a hand-out's 5.3 us
        # (its registry and exit hooks), and a resident layer hands out top-k experts every token
        ref = weakref.ref(mv, functools.partial(self._released, slot))
        self._watches[id(ref)] = ref
        if quantized:
            return quantized_views(region, torch.frombuffer(mv, dtype=torch.uint8, count=region.raw_length))
        return {t.name: torch.frombuffer(mv, dtype=TORCH_DTYPES[t.dtype], count=t.numel, offset=pos).view(t.shape)
                for t, pos in zip(region.tensors, decoded_offsets(region))}

    def _released(self, slot: int, ref: weakref.ref) -> None:
        """Every tensor of a hand-out of `slot` is gone (the weak reference's callback)."""
        self._watches.pop(id(ref), None)
        self.unpin(slot)

    def close(self) -> None:
        self.map.close()


@functools.lru_cache(maxsize=4096)
def decoded_offsets(region: Region) -> tuple[int, ...]:
    """Where each of `region`'s tensors starts in a slot that holds it decoded (bytes from the
    slot's start, in region.tensors' order: one after the other, each its numel x itemsize). A
    slot holding a region in stored form holds its payload from byte 0 (formats.quantized)."""
    out, pos = [], 0
    for t in region.tensors:
        out.append(pos)
        pos += t.numel * TORCH_DTYPES[t.dtype].itemsize
    return tuple(out)


def slot_tensor(arena: ExpertArena, slot: int) -> torch.Tensor:
    """A uint8 tensor over a whole slot, for decoders that fill it (not a hand-out: it does
    not pin the slot; the load that owns the slot keeps it)."""
    return torch.frombuffer(arena.slot_view(slot), dtype=torch.uint8)
