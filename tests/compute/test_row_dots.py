"""The LLVM-IR dot products of the CPU kernels (compute/row_dots.py) against numpy, for every
instruction set the host can run; the whole-row dots on rows that end exactly at a page the
process may not read (their masked last block must not touch it)."""
import ctypes
import mmap

import numpy as np
import pytest
from numba import njit

from moestream.compute.row_dots import (ROW_S8_DOTS, ROW_S8_I16_DOTS, ROW_U4_DOTS, S8_I16_ISAS, U4_DOTS, U4_ISAS,
                                        _dot_s8_f32, row_dot_bf16)


def _host_has(isa: str) -> bool:
    from llvmlite import binding
    f = binding.get_host_cpu_features()
    if isa in ("generic", "avx2"):
        return isa == "generic" or bool(f.get("avx2"))
    return bool(f.get(isa) and f.get("avx512f"))


ISAS = list(U4_ISAS)


@pytest.mark.parametrize("isa", ISAS)
def test_every_int4_dot_the_host_can_run_matches_numpy(isa):
    """Each instruction set's 64-weight int4 dot (the process's kernels use one, U4_ISA, so the
    others are checked here on their own), and the int8 dot, against numpy on extreme codes."""
    if not _host_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    dot = U4_DOTS[isa]

    @njit
    def run(c, e, o):
        return dot(c.ctypes.data, e.ctypes.data, o.ctypes.data)

    @njit
    def run8(w, x):
        return _dot_s8_f32(w.ctypes.data, x.ctypes.data)
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 256, 32).astype(np.uint8), np.full(32, 255, np.uint8), np.zeros(32, np.uint8)]
    for c in cases:
        for e, o in [(rng.integers(-127, 128, 32).astype(np.int8), rng.integers(-127, 128, 32).astype(np.int8)),
                     (np.full(32, -127, np.int8), np.full(32, 127, np.int8))]:
            want = int((c & 15).astype(np.int64) @ e.astype(np.int64) + (c >> 4).astype(np.int64) @ o.astype(np.int64))
            assert run(c, e, o) == want
    w, x = rng.integers(-127, 128, 64).astype(np.int8), rng.standard_normal(64).astype(np.float32)
    assert abs(run8(w, x) - float(w.astype(np.float64) @ x.astype(np.float64))) < 1e-3


class _GuardedArena:
    """Pages of memory followed by one the process may not touch: an array placed to end at the
    guard faults (the test process dies) if a kernel reads one byte past it."""

    def __init__(self, nbytes: int):
        self.size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.map = mmap.mmap(-1, self.size + mmap.PAGESIZE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(self.base + self.size, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()
        self.used = 0

    def at_end(self, a: np.ndarray) -> np.ndarray:
        """A copy of `a` whose last byte is the last byte before the guard page (each array gets
        its own page: `nbytes` covered them all)."""
        start = self.size - self.used - a.nbytes
        self.used += -(-a.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        view = np.frombuffer(self.map, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
        view[...] = a
        return view


def _f16(n, rng):
    return (rng.standard_normal(n) * 0.01).astype(np.float16)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == np.float16 else a      # Numba has no float16 arrays


#: group counts: one, partial units (1-3 of 4 groups at 32), a whole block, a block and a partial one
GROUP_COUNTS = [1, 2, 3, 5, 16, 21, 35]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("ng", GROUP_COUNTS)
def test_whole_row_int4_dot_matches_numpy_and_reads_nothing_past_the_row(isa, group, ng):
    if not _host_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    dot = ROW_U4_DOTS[(isa, group)]
    half = group // 2

    @njit
    def run(c, s, m, e, o, xs, xsum, ng):
        return dot(c.ctypes.data, s.ctypes.data, m.ctypes.data, e.ctypes.data, o.ctypes.data,
                   xs.ctypes.data, xsum.ctypes.data, ng, 0)
    rng = np.random.default_rng(ng)
    arena = _GuardedArena(16 * mmap.PAGESIZE + 7 * 64 * ng)
    c = rng.integers(0, 256, half * ng).astype(np.uint8)
    c[:half] = 255                                     # the extreme codes and activations too
    e, o = (rng.integers(-127, 128, half * ng).astype(np.int8) for _ in range(2))
    e[:half], o[:half] = -127, 127
    s, m = _f16(ng, rng), _f16(ng, rng)
    xs, xsum = rng.random(ng).astype(np.float32), rng.standard_normal(ng).astype(np.float32)
    args = [arena.at_end(_bits(a)) for a in (c, s, m, e, o, xs, xsum)]
    isum = ((c & 15).astype(np.int64) * e + (c >> 4).astype(np.int64) * o).reshape(ng, half).sum(1)
    want = float((isum * s.astype(np.float64) * xs + m.astype(np.float64) * xsum).sum())
    got = run(*args, ng)
    assert abs(got - want) <= 1e-5 * (np.abs(isum * s.astype(np.float64) * xs).sum() + np.abs(m * xsum).sum())


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("ng", GROUP_COUNTS)
def test_whole_row_int8_and_bf16_dots_match_numpy_and_read_nothing_past_the_row(group, ng):
    dot = ROW_S8_DOTS[group]

    @njit
    def run8(w, s, x, ng):
        return dot(w.ctypes.data, s.ctypes.data, x.ctypes.data, ng, 0)

    @njit
    def run16(w, x, chunks):
        return row_dot_bf16(w.ctypes.data, x.ctypes.data, chunks, 0)
    rng = np.random.default_rng(ng)
    arena = _GuardedArena(8 * mmap.PAGESIZE + 8 * 64 * ng)
    w = rng.integers(-127, 128, group * ng).astype(np.int8)
    s, x = _f16(ng, rng), rng.standard_normal(group * ng).astype(np.float32)
    want = float(((w.astype(np.float64) * x).reshape(ng, group).sum(1) * s.astype(np.float64)).sum())
    got = run8(arena.at_end(w), arena.at_end(_bits(s)), arena.at_end(x), ng)
    assert abs(got - want) <= 1e-5 * float(np.abs((w * x).reshape(ng, group).sum(1) * s).sum() + 1e-30)
    bf, x = (rng.standard_normal(64 * ng).astype(np.float32) for _ in range(2))
    bits = (bf.view(np.uint32) >> 16).astype(np.uint16)            # truncated to bf16
    wf = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    want16 = float(wf @ x)
    got16 = run16(arena.at_end(bits), arena.at_end(x), ng)
    assert abs(got16 - want16) <= 1e-5 * float(np.abs(wf * x).sum())


@pytest.mark.parametrize("isa", S8_I16_ISAS)
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("ng", GROUP_COUNTS)
def test_whole_row_int8_times_int16_dot_matches_numpy_and_reads_nothing_past_the_row(isa, group, ng):
    """The int8 x int16 dot (AVX2 hosts' int8 kernels) of each instruction set: exact integer sums
    on extreme codes (-128 x -32767 in every lane of the first group), scaled per group."""
    if not _host_has(isa):
        pytest.skip(f"this CPU has no {isa}")
    dot = ROW_S8_I16_DOTS[(isa, group)]

    @njit
    def run(w, s, x, xs, ng):
        return dot(w.ctypes.data, s.ctypes.data, x.ctypes.data, xs.ctypes.data, ng, 0)
    rng = np.random.default_rng(100 + ng)
    arena = _GuardedArena(8 * mmap.PAGESIZE + 8 * 64 * ng)
    w = rng.integers(-128, 128, group * ng).astype(np.int8)
    x = rng.integers(-32767, 32768, group * ng).astype(np.int16)
    w[:group], x[:group] = -128, -32767
    s, xs = _f16(ng, rng), rng.random(ng).astype(np.float32)
    isum = (w.astype(np.int64) * x).reshape(ng, group).sum(1)
    want = float((isum * s.astype(np.float64) * xs).sum())
    got = run(arena.at_end(w), arena.at_end(_bits(s)), arena.at_end(x), arena.at_end(xs), ng)
    assert abs(got - want) <= 1e-5 * float(np.abs(isum * s.astype(np.float64) * xs).sum())
