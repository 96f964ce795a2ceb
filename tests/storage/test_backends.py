"""Every backend returns the bytes a plain read returns; faults reach exactly their reads."""
import errno
import os
import random
import threading

import pytest

from moestream.errors import ReadCancelled, StoreIOError
from moestream.storage import BufferPool, PosixBackend, ReadRequest, UringBackend, backends
from moestream.storage.uring import supported

BACKENDS = ["posix"] + (["uring"] if supported()[0] else [])


def make_backend(name, pool=None, queue_depth=8):
    if name == "uring":
        return UringBackend(queue_depth, [(pool.addr, pool.nbytes)] if pool else None)
    return PosixBackend(4)


@pytest.fixture
def data_file(tmp_path):
    """A file whose size is not a multiple of 4096."""
    rng = random.Random(1)
    data = bytes(rng.getrandbits(8) for _ in range(20 * 4096 + 1234))
    p = tmp_path / "data.bin"
    p.write_bytes(data)
    return p, data


def open_direct(p):
    fd, note = backends.open_direct(p)
    return fd, note is None


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("registered", [False, True])
def test_random_extents_match_plain_read(data_file, name, registered):
    path, data = data_file
    fd, _ = open_direct(path)
    pool = BufferPool(4 * 4096, 6)
    be = make_backend(name, pool if registered else None)
    rng = random.Random(0)
    try:
        for _ in range(40):
            slabs = [pool.acquire() for _ in range(rng.randint(1, 6))]
            reqs = []
            for s in slabs:
                block = rng.randrange(0, len(data) // 4096 + 1)
                off = block * 4096
                n = rng.choice([4096, 8192, 16384])
                want = data[off:off + n]
                reqs.append((s, want, be.submit(ReadRequest(fd, str(path), off, n, s.view[:n], s.addr, need=len(want),
                                                            buf_index=0 if registered else None))))
            for s, want, fut in reqs:
                got = fut.result(timeout=10)
                assert got == len(want)
                assert bytes(s.view[:got]) == want
                pool.release(s)
        # the last, partial block: an aligned read past the end returns what is there
        s = pool.acquire()
        last = len(data) // 4096 * 4096
        assert be.submit(ReadRequest(fd, str(path), last, 4096, s.view[:4096], s.addr, need=1234)).result() == 1234
        assert bytes(s.view[:1234]) == data[last:]
        # asking for more than the file holds is an error naming the file and offset
        with pytest.raises(StoreIOError, match=rf"{path}.*offset {last}"):
            be.submit(ReadRequest(fd, str(path), last, 4096, s.view[:4096], s.addr, need=4096)).result()
        pool.release(s)
    finally:
        be.close()
        os.close(fd)
    assert pool.free == pool.count


@pytest.mark.parametrize("name", BACKENDS)
def test_misaligned_direct_read_fails_on_its_future_only(data_file, name):
    path, data = data_file
    fd, direct = open_direct(path)
    if not direct:
        pytest.skip("file system refuses O_DIRECT")
    pool = BufferPool(8192, 2)
    be = make_backend(name)
    a, b = pool.acquire(), pool.acquire()
    bad = be.submit(ReadRequest(fd, str(path), 100, 4096, a.view[:4096], a.addr))
    good = be.submit(ReadRequest(fd, str(path), 4096, 4096, b.view[:4096], b.addr))
    with pytest.raises(StoreIOError, match=r"offset 100 .*Invalid argument"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == 4096 and bytes(b.view[:4096]) == data[4096:8192]
    be.close()
    os.close(fd)


def test_posix_short_reads_and_eio_injected(data_file, monkeypatch):
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    real = os.preadv
    calls = {"n": 0}

    def faulty(fd_, bufs, offset):
        calls["n"] += 1
        if offset == 8 * 4096:
            raise OSError(errno.EIO, "Input/output error")
        view = bufs[0]
        return real(fd_, [view[: max(1, len(view) // 3)]], offset)  # always short

    monkeypatch.setattr(os, "preadv", faulty)
    pool = BufferPool(16384, 3)
    be = PosixBackend(2)
    s1, s2, s3 = pool.acquire(), pool.acquire(), pool.acquire()
    f1 = be.submit(ReadRequest(fd, str(path), 0, 16384, s1.view, s1.addr))
    f2 = be.submit(ReadRequest(fd, str(path), 8 * 4096, 4096, s2.view[:4096], s2.addr))
    f3 = be.submit(ReadRequest(fd, str(path), 4096, 8192, s3.view[:8192], s3.addr))
    assert f1.result() == 16384 and bytes(s1.view) == data[:16384]
    with pytest.raises(StoreIOError, match=rf"{path}: read of 4096 bytes at offset {8 * 4096} .*Input/output error"):
        f2.result()
    assert f3.result() == 8192 and bytes(s3.view[:8192]) == data[4096:12288]
    assert calls["n"] > 3  # the short reads were continued
    be.close()
    os.close(fd)


@pytest.mark.skipif("uring" not in BACKENDS, reason="io_uring unavailable")
def test_uring_short_reads_and_eio_injected(data_file, monkeypatch):
    """Short reads come from the kernel (requests capped in the SQE); EIO replaces one
    completion. The backend must continue the first and fail only the second's future."""
    from moestream.storage import uring
    path, data = data_file
    fd, _ = open_direct(path)
    real_prep, real_reap = uring.Ring.prep_read, uring.Ring.reap
    eio_offset = 12 * 4096
    ud_of_offset = {}

    def capped(self, fd_, addr, length, offset, user_data, buf_index=None):
        ud_of_offset[user_data] = offset
        return real_prep(self, fd_, addr, min(length, 4096), offset, user_data, buf_index)

    def reap(self):
        return [(ud, -errno.EIO if ud_of_offset.get(ud) == eio_offset else res) for ud, res in real_reap(self)]

    monkeypatch.setattr(uring.Ring, "prep_read", capped)
    monkeypatch.setattr(uring.Ring, "reap", reap)
    pool = BufferPool(16384, 3)
    be = UringBackend(4)
    s1, s2, s3 = pool.acquire(), pool.acquire(), pool.acquire()
    f1 = be.submit(ReadRequest(fd, str(path), 0, 16384, s1.view, s1.addr))
    f2 = be.submit(ReadRequest(fd, str(path), eio_offset, 8192, s2.view[:8192], s2.addr))
    f3 = be.submit(ReadRequest(fd, str(path), 4096, 16384, s3.view, s3.addr))
    assert f1.result(timeout=10) == 16384 and bytes(s1.view) == data[:16384]
    with pytest.raises(StoreIOError, match=rf"offset {eio_offset} .*Input/output error"):
        f2.result(timeout=10)
    assert f3.result(timeout=10) == 16384 and bytes(s3.view) == data[4096:4096 + 16384]
    be.close()
    os.close(fd)


@pytest.mark.parametrize("name", BACKENDS)
def test_many_concurrent_submitters(data_file, name):
    path, data = data_file
    fd, _ = open_direct(path)
    pool = BufferPool(4096, 16)
    be = make_backend(name, queue_depth=4)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(50):
            s = pool.acquire()
            off = rng.randrange(0, 20) * 4096
            try:
                assert be.submit(ReadRequest(fd, str(path), off, 4096, s.view, s.addr)).result(timeout=10) == 4096
                assert bytes(s.view) == data[off:off + 4096]
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
            finally:
                pool.release(s)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    be.close()
    os.close(fd)
    assert not errors


class Ticket:
    def __init__(self, urgent=True, cancelled=False):
        self.urgent, self.cancelled = urgent, cancelled


@pytest.mark.parametrize("name", BACKENDS)
def test_a_withdrawn_request_fails_instead_of_reading(data_file, name):
    path, data = data_file
    fd, _ = open_direct(path)
    pool = BufferPool(4096, 2)
    be = make_backend(name, pool)
    s1, s2 = pool.acquire(), pool.acquire()
    s2.view[:] = b"\0" * 4096
    kept = be.submit(ReadRequest(fd, str(path), 0, 4096, s1.view, s1.addr, buf_index=0, ticket=Ticket(False)))
    gone = be.submit(ReadRequest(fd, str(path), 4096, 4096, s2.view, s2.addr, buf_index=0,
                                 ticket=Ticket(False, cancelled=True)))
    assert kept.result(timeout=10) == 4096 and bytes(s1.view) == data[:4096]
    with pytest.raises(ReadCancelled, match=rf"{path.name}.*offset 4096"):
        gone.result(timeout=10)
    assert bytes(s2.view) == b"\0" * 4096          # nothing landed
    be.close()
    os.close(fd)


@pytest.mark.skipif(not supported()[0], reason="io_uring unavailable")
def test_uring_starts_an_urgent_read_before_waiting_guesses(data_file):
    """queue_depth 2: guesses may take one ring entry; the demand read submitted after six of
    them starts as soon as an entry frees, ahead of the five still waiting."""
    path, data = data_file
    fd, _ = open_direct(path)
    pool = BufferPool(4096, 7)
    be = make_backend("uring", pool, queue_depth=2)
    done: list[str] = []
    lock = threading.Lock()
    futs = []
    for i, urgent in enumerate([False] * 6 + [True]):
        s = pool.acquire()
        f = be.submit(ReadRequest(fd, str(path), i * 4096, 4096, s.view, s.addr, buf_index=0, ticket=Ticket(urgent)))
        f.add_done_callback(lambda _, i=i: (lock.acquire(), done.append(i), lock.release()))
        futs.append((f, s, i))
    for f, s, i in futs:
        assert f.result(timeout=10) == 4096 and bytes(s.view) == data[i * 4096:(i + 1) * 4096]
    be.close()
    os.close(fd)
    assert done.index(6) <= 2, done
