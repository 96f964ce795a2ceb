"""Torch's intra-op thread count while the Store's own threads are working.

An expert's matmuls at decode are three GEMVs; torch runs each as a parallel region that ends
when its slowest thread does. The Store's reads (syscalls, completions), checksums and decodes
run on the same cores, so while any of them is in flight one of torch's threads shares its core
and every region waits for it. Measured on the 2-core development machine (bench/contention.py),
per expert of Qwen3-30B-A3B's shape:

    torch threads              2          1
    nothing else running       0.73 ms    1.17 ms
    an O_DIRECT read running   1.64 ms    1.27 ms

So while the store prefetches (its reads and checksums overlapping compute by design), compute
leaves one core to it, and takes it back as soon as no guess is in flight; with prefetch off
(the default) nothing changes. End to end, `bench decode` could not separate the effect from
the run-to-run noise of the shared disk (the same configuration varies 1.5x between runs).

Only torch's count is set. The expert and attention matmuls of a CPU decode step have since moved
to Numba kernels, whose count is left at every core: having it follow torch's was measured on
2026-12-08 (bench/prefetch_threads.py, `bench decode`'s `best` system at 25 %, 8 rounds taking
turns) at 23.5 against 23.0 tok/s (medians), faster in 4 of 8 rounds: the guesses landed in time
a little more often (hits +2 %, less stall) and the compute on one core took ~20 % longer, which
cancel out on two cores."""
from __future__ import annotations

import torch


class ComputeThreads:
    """Sets torch's intra-op threads to all but one while the store is busy, all otherwise.
    `full` is the count to use when idle (default: torch's count when first adjusted); a count
    set by someone else meanwhile is adopted as the new full count."""

    def __init__(self, full: int | None = None):
        self.full = full
        self.current: int | None = None

    def adjust(self, store_busy: bool) -> None:
        """All threads but one while `store_busy` (its prefetch work overlaps compute), all otherwise."""
        now = torch.get_num_threads()
        if self.full is None or (self.current is not None and now != self.current):
            self.full = now
        n = max(1, self.full - 1) if store_busy else self.full
        if n != now:
            torch.set_num_threads(n)
        self.current = n


#: one per process: torch's thread count is process-wide
COMPUTE_THREADS = ComputeThreads()
