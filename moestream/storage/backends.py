"""Read backends behind one small protocol: `submit(ReadRequest) -> Future[int]` (bytes read),
`close()`. Short reads are continued; failures become an exception on the future of the read
that failed, naming the file and offset.

- `UringBackend`: io_uring (uring.py), O_DIRECT, queue depth N, optional registered buffers.
- `PosixBackend`: os.preadv on a thread pool; works everywhere.
- `KvikioBackend`: kvikio.CuFile (GPUDirect Storage, or its compat mode) into device or host
  memory; CUDA machines only, imported lazily."""
from __future__ import annotations

import errno
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from ..errors import ReadCancelled, StoreIOError


@dataclass
class ReadRequest:
    """Read `length` bytes at `offset` of `fd` (opened from `path`) into `dest` (a writable
    memoryview at address `addr`, or for kvikio a device buffer). `need` is how many bytes
    must arrive: fewer only at end of file (an aligned read past the end of the last extent)."""
    fd: Any                           # the backend's handle for the file (an fd, or a kvikio CuFile)
    path: str
    offset: int
    length: int
    dest: Any                         # a writable memoryview (host), or a device array (kvikio)
    addr: int = 0
    need: Optional[int] = None
    buf_index: Optional[int] = None   # registered-buffer index (uring READ_FIXED)
    #: who asked, read when the request is about to start: `ticket.urgent` (a demand read: it
    #: goes ahead of waiting non-urgent ones) and `ticket.cancelled` (withdrawn: it fails with
    #: ReadCancelled instead of starting). None: urgent, never withdrawn.
    ticket: Any = None

    @property
    def urgent(self) -> bool:
        return self.ticket is None or bool(self.ticket.urgent)

    @property
    def cancelled(self) -> bool:
        return self.ticket is not None and bool(self.ticket.cancelled)


def _io_error(req: ReadRequest, err: int, done: int = 0) -> StoreIOError:
    what = os.strerror(err) if err else "unexpected end of file"
    hint = " (O_DIRECT needs 4096-aligned offsets, lengths and buffers)" if err == errno.EINVAL else ""
    return StoreIOError(f"{req.path}: read of {req.length} bytes at offset {req.offset} failed after {done} "
                        f"bytes: {what}{hint}")


def _cancelled(req: ReadRequest) -> ReadCancelled:
    return ReadCancelled(f"{req.path}: read of {req.length} bytes at offset {req.offset} withdrawn before it started")


def open_direct(path: str | os.PathLike) -> tuple[int, Optional[str]]:
    """Open `path` read-only with O_DIRECT. File systems that refuse it (tmpfs, some FUSE) get
    a buffered descriptor and a note saying so (None when O_DIRECT is on)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), None
    except OSError as e:
        return os.open(path, os.O_RDONLY), f"O_DIRECT refused by the file system ({e.strerror}): buffered reads"


class ReadBackend(Protocol):
    """A backend owns the files it reads (`open` gives a handle for ReadRequest.fd) and picks its
    own view of a request's destination."""
    name: str

    def open(self, path: str | os.PathLike) -> tuple[Any, Optional[str]]: ...

    def close_file(self, handle: Any) -> None: ...

    def submit(self, req: ReadRequest) -> "Future[int]": ...

    def close(self) -> None: ...


class _DirectFiles:
    """open/close_file for backends that read file descriptors opened with O_DIRECT."""

    def open(self, path: str | os.PathLike) -> tuple[int, Optional[str]]:
        return open_direct(path)

    def close_file(self, handle: int) -> None:
        os.close(handle)


class PosixBackend(_DirectFiles):
    """preadv on `threads` worker threads (the GIL is released during each read)."""
    name = "posix"

    def __init__(self, threads: int = 8):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moestream-pread")

    def _read(self, req: ReadRequest) -> int:
        if req.cancelled:
            raise _cancelled(req)
        need = req.length if req.need is None else req.need
        got = 0
        while got < req.length:
            try:
                n = os.preadv(req.fd, [req.dest[got:req.length]], req.offset + got)
            except InterruptedError:
                continue
            except OSError as e:
                raise _io_error(req, e.errno, got) from None
            if n == 0:
                if got >= need:
                    break
                raise _io_error(req, 0, got)
            got += n
        return got

    def submit(self, req: ReadRequest) -> "Future[int]":
        return self._pool.submit(self._read, req)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class UringBackend(_DirectFiles):
    """One thread owns an io_uring ring; up to `queue_depth` reads in flight. Requests wait in
    arrival order, except that an urgent one (a demand read) starts before every waiting
    non-urgent one (prefetches), and non-urgent reads take at most half the ring, so an urgent
    read never waits for a free entry behind a full ring of guesses. A withdrawn request fails
    with ReadCancelled when its turn comes instead of reading."""
    name = "uring"

    def __init__(self, queue_depth: int = 32, registered: Optional[list[tuple[int, int]]] = None):
        from .uring import Ring
        self.queue_depth = queue_depth
        self._ring = Ring(queue_depth)
        self.registered = False
        if registered:
            try:
                self._ring.register_buffers(registered)
                self.registered = True
            except OSError:
                self.registered = False  # e.g. RLIMIT_MEMLOCK too low: plain reads still work
        self._q: "queue.SimpleQueue[Optional[tuple[ReadRequest, Future]]]" = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="moestream-uring", daemon=True)
        self._thread.start()

    def submit(self, req: ReadRequest) -> "Future[int]":
        if self._closed:
            raise RuntimeError("backend is closed")
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._q.put((req, fut))
        return fut

    def _next(self, waiting: "deque[tuple[ReadRequest, Future]]", background: int) -> Optional[tuple[ReadRequest, Future]]:
        """The request to start next (withdrawn ones are failed on the way), or None."""
        for i, (req, fut) in enumerate(waiting):
            if req.urgent and not req.cancelled:
                del waiting[i]
                return req, fut
        while waiting and background < max(1, self.queue_depth // 2):
            req, fut = waiting.popleft()
            if req.cancelled:
                fut.set_exception(_cancelled(req))
                continue
            return req, fut
        return None

    def _loop(self) -> None:
        ring = self._ring
        states: dict[int, list] = {}   # user_data -> [req, future, bytes done]
        waiting: deque = deque()       # submitted, not yet in the ring
        next_id = 1
        stopping = False
        while True:
            block = not states and not waiting and not stopping
            while True:                # take everything submitted so far (block only when idle)
                try:
                    item = self._q.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    stopping = True
                else:
                    waiting.append(item)
            background = sum(1 for st in states.values() if not st[0].urgent)
            while len(states) < self.queue_depth:
                picked = self._next(waiting, background)
                if picked is None:
                    break
                req, fut = picked
                states[next_id] = [req, fut, 0]
                background += not req.urgent
                self._prep(next_id, req, 0)
                next_id += 1
            if not states:
                if stopping and not waiting:
                    break
                continue
            try:
                ring.submit_and_wait(1)
            except OSError as e:  # the ring itself failed: fail everything in flight
                for req, fut, done in states.values():
                    fut.set_exception(_io_error(req, e.errno, done))
                states.clear()
                continue
            for ud, res in ring.reap():
                st = states.get(ud)
                if st is None:
                    continue
                req, fut, done = st
                need = req.length if req.need is None else req.need
                if res < 0:
                    if res == -errno.EINTR or res == -errno.EAGAIN:
                        self._prep(ud, req, done)
                        continue
                    del states[ud]
                    fut.set_exception(_io_error(req, -res, done))
                    continue
                done += res
                st[2] = done
                if done >= req.length or (res == 0 and done >= need):
                    del states[ud]
                    fut.set_result(done)
                elif res == 0:
                    del states[ud]
                    fut.set_exception(_io_error(req, 0, done))
                else:  # short read: continue where it stopped
                    self._prep(ud, req, done)
        ring.close()

    def _prep(self, ud: int, req: ReadRequest, done: int) -> None:
        self._ring.prep_read(req.fd, req.addr + done, req.length - done, req.offset + done, ud,
                             req.buf_index if self.registered else None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join()


class KvikioBackend:
    """kvikio.CuFile reads (GPUDirect Storage where present, compat mode otherwise)."""
    name = "kvikio"

    def __init__(self, threads: int = 8):
        import kvikio  # noqa: F401  (lazy: only CUDA machines have it)
        self._kvikio = kvikio
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moestream-kvikio")
        import kvikio.defaults
        self.mode = "compat" if kvikio.defaults.is_compat_mode_preferred() else "gds"

    def _file(self, path: str):
        with self._lock:
            if path not in self._files:
                self._files[path] = self._kvikio.CuFile(path, "r")
            return self._files[path]

    def open(self, path: str | os.PathLike) -> tuple[Any, Optional[str]]:
        return self._file(str(path)), None

    def close_file(self, handle: Any) -> None:
        pass  # CuFiles are shared per path and closed with the backend

    def _read(self, req: ReadRequest) -> int:
        if req.cancelled:
            raise _cancelled(req)
        need = req.length if req.need is None else req.need
        # host destinations arrive as memoryviews (the Store's slabs and slots): kvikio wants arrays
        dest = np.frombuffer(req.dest, np.uint8) if isinstance(req.dest, memoryview) else req.dest
        try:
            f = req.fd if not isinstance(req.fd, int) else self._file(req.path)   # a handle from open()
            n = f.pread(dest, req.length, req.offset).get()
        except Exception as e:  # kvikio raises RuntimeError with the CUDA/cuFile message
            raise StoreIOError(f"{req.path}: kvikio read of {req.length} bytes at offset {req.offset} failed: {e}") from None
        if n < need:
            raise _io_error(req, 0, n)
        return n

    def submit(self, req: ReadRequest) -> "Future[int]":
        return self._pool.submit(self._read, req)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def kvikio_usable() -> tuple[bool, str]:
    try:
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        import kvikio  # noqa: F401
    except ImportError:
        return False, "kvikio is not installed (pip install 'moestream[gpu]')"
    import kvikio.defaults
    mode = "compat mode (POSIX reads + copy)" if kvikio.defaults.is_compat_mode_preferred() else "GPUDirect Storage"
    return True, f"CUDA device and kvikio present, {mode}"


def choose_backend(io: str = "auto", *, device: str = "cpu", queue_depth: int = 32, threads: int = 8,
                   registered: Optional[list[tuple[int, int]]] = None) -> tuple[ReadBackend, str]:
    """Pick a backend: `io` is "auto", "uring", "posix" or "kvikio" (MOESTREAM_IO overrides
    "auto"). Returns the backend and the reason it was chosen."""
    requested = io
    if io == "auto" and os.environ.get("MOESTREAM_IO"):
        io = os.environ["MOESTREAM_IO"]
        requested = f"MOESTREAM_IO={io}"
    if io not in ("auto", "uring", "posix", "kvikio"):
        raise ValueError(f"io={io!r}: choose auto, uring, posix or kvikio")
    from .uring import supported
    if io == "auto":
        notes = []
        if device.startswith("cuda"):
            ok, why = kvikio_usable()
            if ok:
                return KvikioBackend(threads), f"auto: {why}"
            notes.append(f"kvikio not used: {why}")
        ok, why = supported()
        if ok:
            return UringBackend(queue_depth, registered), "auto: " + "; ".join(notes + [why])
        return PosixBackend(threads), "auto: " + "; ".join(notes + [f"io_uring not used: {why}"])
    if io == "uring":
        ok, why = supported()
        if not ok:
            raise StoreIOError(f"io=uring requested but unavailable: {why}")
        return UringBackend(queue_depth, registered), f"requested ({requested})"
    if io == "kvikio":
        ok, why = kvikio_usable()
        if not ok:
            raise StoreIOError(f"io=kvikio requested but unavailable: {why}")
        return KvikioBackend(threads), f"requested ({requested})"
    return PosixBackend(threads), f"requested ({requested})"
