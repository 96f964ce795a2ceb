"""Page-aligned host memory for O_DIRECT reads: one anonymous mmap carved into equal slabs.
Pinned (cudaHostRegister) when CUDA is present, so host-to-device copies can be asynchronous.
No allocation happens per read: readers borrow a slab and give it back."""
from __future__ import annotations

import ctypes
import mmap
import threading
from dataclasses import dataclass

import torch

from ..formats.constants import ALIGNMENT, align_up


@dataclass(frozen=True)
class Slab:
    """One slab of the pool. `view` and `tensor` alias the same `size` bytes at address `addr`;
    both are valid only between `BufferPool.acquire` and `BufferPool.release`."""
    index: int
    addr: int
    size: int
    view: memoryview
    tensor: torch.Tensor


class AlignedMap:
    """`nbytes` (rounded up to 4096) of page-aligned anonymous memory, pinned (cudaHostRegister)
    when `pin` and CUDA is present, so host-to-device copies from it can be asynchronous."""

    def __init__(self, nbytes: int, *, pin: bool = False):
        self.nbytes = align_up(max(1, nbytes), ALIGNMENT)
        self.buffer = mmap.mmap(-1, self.nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.buffer)
        self.addr = ctypes.addressof(self._anchor)
        assert self.addr % mmap.PAGESIZE == 0
        self.pinned = False
        if pin and torch.cuda.is_available():
            rc = torch.cuda.cudart().cudaHostRegister(self.addr, self.nbytes, 0)
            self.pinned = int(rc) == 0

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.addr)
            self.pinned = False


class BufferPool:
    """`count` slabs of `slab_size` bytes (rounded up to 4096) in one aligned arena."""

    def __init__(self, slab_size: int, count: int, *, pin: bool = False):
        if count < 1 or slab_size < 1:
            raise ValueError("a buffer pool needs at least one slab of at least one byte")
        self.slab_size = align_up(slab_size, ALIGNMENT)
        self.count = count
        self.map = AlignedMap(self.slab_size * count, pin=pin)
        self.nbytes, self.addr = self.map.nbytes, self.map.addr
        whole = memoryview(self.map.buffer)
        arena = torch.frombuffer(self.map.buffer, dtype=torch.uint8)
        self.slabs = [Slab(i, self.addr + i * self.slab_size, self.slab_size,
                           whole[i * self.slab_size:(i + 1) * self.slab_size],
                           arena[i * self.slab_size:(i + 1) * self.slab_size]) for i in range(count)]
        self._free = list(reversed(range(count)))
        self._cv = threading.Condition()
        self.in_use_peak = 0

    @property
    def pinned(self) -> bool:
        return self.map.pinned

    def acquire(self, timeout: float | None = None) -> Slab:
        """Borrow a slab, waiting for one to be released if all are in use."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._free, timeout):
                raise TimeoutError("no free I/O buffer")
            slab = self.slabs[self._free.pop()]
            self.in_use_peak = max(self.in_use_peak, self.count - len(self._free))
            return slab

    def release(self, slab: Slab) -> None:
        with self._cv:
            assert slab.index not in self._free, "slab released twice"
            self._free.append(slab.index)
            self._cv.notify()

    @property
    def free(self) -> int:
        with self._cv:
            return len(self._free)

    def close(self) -> None:
        self.map.close()
