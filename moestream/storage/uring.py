"""A minimal io_uring ring over raw system calls (ctypes): setup, read SQEs, reaping CQEs,
registered buffers.

Why not PyPI `liburing`: its 2026.3.x wheels die with SIGILL (an uncatchable illegal
instruction) inside `Ring()` on CPUs without the instruction set they were built for (seen on
the AMD EPYC CI machines), and the older Cython release has a different API. The kernel ABI is
small and stable; ctypes releases the GIL for the duration of each `io_uring_enter`, so
decode threads keep running while the ring thread waits.

Memory ordering: the SQ tail is published before `io_uring_enter` (a syscall, hence a full
barrier), and CQEs are consumed only up to a CQ tail read after `io_uring_enter` returned."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from typing import Optional

_NR = {"x86_64": (425, 426, 427), "aarch64": (425, 426, 427)}
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1
IORING_ENTER_GETEVENTS = 1
IORING_OP_READ = 22
IORING_OP_READ_FIXED = 4
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
SQE_SIZE = 64
CQE_SIZE = 16


class _SqOff(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped",
                                               "array", "resv1")] + [("user_addr", ctypes.c_uint64)]


class _CqOff(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes",
                                               "flags", "resv1")] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("sq_entries", "cq_entries", "flags", "sq_thread_cpu",
                                               "sq_thread_idle", "features", "wq_fd")] + [
        ("resv", ctypes.c_uint32 * 3), ("sq_off", _SqOff), ("cq_off", _CqOff)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def supported() -> tuple[bool, str]:
    """Whether io_uring can be set up here, and why not."""
    if platform.machine() not in _NR:
        return False, f"no io_uring syscall numbers for {platform.machine()}"
    try:
        Ring(2).close()
    except OSError as e:
        reason = {errno.ENOSYS: "kernel without io_uring", errno.EPERM: "io_uring disabled (kernel.io_uring_disabled "
                  "or seccomp)"}.get(e.errno, e.strerror)
        return False, reason
    return True, "io_uring available"


class Ring:
    """One io_uring instance. Not thread-safe: one thread submits and reaps."""

    def __init__(self, entries: int = 32):
        self.setup_nr, self.enter_nr, self.register_nr = _NR.get(platform.machine(), (425, 426, 427))
        p = _Params()
        self.fd = _check(_syscall(ctypes.c_long(self.setup_nr), ctypes.c_uint(entries), ctypes.byref(p)),
                         "io_uring_setup")
        self.params = p
        try:
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * CQE_SIZE
            if p.features & IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQ_RING)
            self._cq = self._sq if p.features & IORING_FEAT_SINGLE_MMAP else mmap.mmap(
                self.fd, cq_size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_CQ_RING)
            self._sqes = mmap.mmap(self.fd, p.sq_entries * SQE_SIZE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        sq = ctypes.addressof(ctypes.c_char.from_buffer(self._sq))
        cq = ctypes.addressof(ctypes.c_char.from_buffer(self._cq))
        u32 = ctypes.POINTER(ctypes.c_uint32)
        self._sq_head = ctypes.cast(sq + p.sq_off.head, u32)
        self._sq_tail = ctypes.cast(sq + p.sq_off.tail, u32)
        self._sq_mask = ctypes.cast(sq + p.sq_off.ring_mask, u32)[0]
        self._sq_array = ctypes.cast(sq + p.sq_off.array, u32)
        self._cq_head = ctypes.cast(cq + p.cq_off.head, u32)
        self._cq_tail = ctypes.cast(cq + p.cq_off.tail, u32)
        self._cq_mask = ctypes.cast(cq + p.cq_off.ring_mask, u32)[0]
        self._cqes_off = p.cq_off.cqes
        self.entries = p.sq_entries
        self._pending = 0        # SQEs queued but not yet passed to io_uring_enter
        self._registered = False

    # ---- submission --------------------------------------------------------------------------
    def sq_space(self) -> int:
        return self.entries - (self._sq_tail[0] - self._sq_head[0]) % (1 << 32)

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int,
                  buf_index: Optional[int] = None) -> None:
        """Queue a read of `length` bytes at file `offset` into memory at `addr`. With
        `buf_index`, `addr` must lie inside that registered buffer (READ_FIXED)."""
        if self.sq_space() <= 0:
            raise RuntimeError("submission queue full")
        tail = self._sq_tail[0]
        idx = tail & self._sq_mask
        op = IORING_OP_READ if buf_index is None else IORING_OP_READ_FIXED
        _SQE.pack_into(self._sqes, idx * SQE_SIZE, op, 0, 0, fd, offset, addr, length, 0, user_data,
                       buf_index or 0, 0, 0, 0, 0)
        self._sq_array[idx] = idx
        self._sq_tail[0] = (tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def submit_and_wait(self, wait_nr: int = 0) -> int:
        """Pass queued SQEs to the kernel and wait for at least `wait_nr` completions (the GIL is
        released while waiting). Returns the number of SQEs consumed."""
        flags = IORING_ENTER_GETEVENTS if wait_nr else 0
        while True:
            rc = _syscall(ctypes.c_long(self.enter_nr), ctypes.c_uint(self.fd), ctypes.c_uint(self._pending),
                          ctypes.c_uint(wait_nr), ctypes.c_uint(flags), None, ctypes.c_size_t(0))
            if rc < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            _check(rc, "io_uring_enter")
            self._pending -= rc
            return rc

    # ---- completion --------------------------------------------------------------------------
    def reap(self) -> list[tuple[int, int]]:
        """All completions available now, as (user_data, res) pairs (res < 0 is -errno)."""
        out = []
        head = self._cq_head[0]
        tail = self._cq_tail[0]
        while head != tail:
            off = self._cqes_off + (head & self._cq_mask) * CQE_SIZE
            user_data, res = struct.unpack_from("<Qi", self._cq, off)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head[0] = head
        return out

    # ---- registered buffers ------------------------------------------------------------------
    def register_buffers(self, buffers: list[tuple[int, int]]) -> None:
        """Register (addr, length) buffers for READ_FIXED (pins them once instead of per read)."""
        arr = (_Iovec * len(buffers))(*[_Iovec(a, n) for a, n in buffers])
        _check(_syscall(ctypes.c_long(self.register_nr), ctypes.c_uint(self.fd), ctypes.c_uint(IORING_REGISTER_BUFFERS),
                        arr, ctypes.c_uint(len(buffers))), "io_uring_register(BUFFERS)")
        self._registered = True

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._registered:
            _syscall(ctypes.c_long(self.register_nr), ctypes.c_uint(self.fd), ctypes.c_uint(IORING_UNREGISTER_BUFFERS),
                     None, ctypes.c_uint(0))
        # the ctypes pointers into the maps must go before the maps can close
        for name in ("_sq_head", "_sq_tail", "_sq_array", "_cq_head", "_cq_tail"):
            setattr(self, name, None)
        for m in {id(self._sq): self._sq, id(self._cq): self._cq, id(self._sqes): self._sqes}.values():
            try:
                m.close()
            except BufferError:
                pass
        os.close(self.fd)
        self.fd = -1
