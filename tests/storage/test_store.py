"""The Store: correctness against StoreReader, budgets at every step, counters, prefetch,
faults, several consumers."""
import errno
import random
import threading
import time
from concurrent.futures import Future

import pytest
import torch

import moestream
from moestream.errors import BudgetError, StoreIOError
from moestream.formats import StoreReader
from moestream.storage import TierCache
from moestream.storage import open as open_store
from moestream.storage.uring import supported

IOS = ["posix"] + (["uring"] if supported()[0] else [])


@pytest.fixture(scope="module")
def stores(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {q: moestream.convert(checkpoints["mixtral"], root / q, quant=q, progress=False)
            for q in ["keep", "int4"]}


def expected(store):
    with StoreReader(store) as r:
        return {(l, e): r.expert(l, e) for l in r.layers for e in range(r.experts_per_layer)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("quant", ["keep", "int4"])
def test_fetch_matches_reader_under_eviction(stores, io, quant, monkeypatch):
    ref = expected(stores[quant])
    one = max(sum(t.numel() * t.element_size() for t in v.values()) for v in ref.values())
    worst = {"device": 0, "host": 0}
    real_put = TierCache.put

    def checked_put(self, key, value, nbytes, tick=None):  # the budget is checked after every insertion
        out = real_put(self, key, value, nbytes, tick)
        assert self.used <= self.budget
        worst[self.name] = max(worst[self.name], self.used)
        return out

    monkeypatch.setattr(TierCache, "put", checked_put)
    rng = random.Random(0)
    with open_store(stores[quant], io=io, device_budget=3 * one, host_budget=5 * one // 2, chunk_size=8192) as s:
        for step in range(300):
            layer = rng.choice(s.layers)
            experts = rng.sample(range(s.experts_per_layer), 2)
            futs = s.fetch(layer, experts)
            arrived = [f for f in s.as_completed(futs)]
            assert set(arrived) == set(futs)
            for e, f in zip(experts, futs):
                assert same(f.result(), ref[(layer, e)])
            assert s.l1.used <= 3 * one and s.l2.used <= 5 * one // 2
        st = s.stats()
    assert st["misses"] > 0 and st["hits_l1"] > 0 and st["evictions_l1"] > 0
    assert st["requests"] == 600 == st["hits_l1"] + st["hits_l2"] + st["misses"] + st["joined_inflight"]
    assert 0 < worst["device"] <= 3 * one and worst["host"] <= 5 * one // 2
    assert st["l1_peak"] <= 3 * one


def test_bytes_read_equal_the_extents_read(stores):
    """A known pattern: the first pass misses every key once, the second hits L1 only."""
    with StoreReader(stores["keep"]) as r:
        regions = {(l, e): r.extent(l, e) for l in r.layers for e in range(8)}
    keys = [(0, 1), (0, 5), (1, 2), (1, 7), (0, 1)]
    with open_store(stores["keep"], io="posix", device_budget="1GiB", host_budget=0) as s:
        for l, e in keys:
            s.get(l, e)
        st = s.stats()
    distinct = set(keys)
    assert st["misses"] == 4 and st["hits_l1"] == 1 and st["reads"] == 4
    assert st["bytes_read"] == sum(regions[k].padded_length for k in distinct)
    assert st["stored_bytes_read"] == sum(regions[k].length for k in distinct)
    assert st["bytes_decoded"] == sum(t.numel * 4 for k in distinct for t in regions[k].tensors)  # fp32 source


def test_l2_serves_after_l1_eviction(stores):
    ref = expected(stores["int4"])
    one = max(sum(t.numel() * t.element_size() for t in v.values()) for v in ref.values())
    with open_store(stores["int4"], io="posix", device_budget=one, host_budget="64MiB") as s:
        for e in range(4):
            s.get(0, e)
        assert same(s.get(0, 0), ref[(0, 0)])
        st = s.stats()
    assert st["misses"] == 4 and st["hits_l2"] == 1 and st["reads"] == 4


def test_budget_below_one_expert_is_refused(stores):
    with pytest.raises(BudgetError, match="smaller than one expert"):
        open_store(stores["keep"], device_budget="1KiB")
    with pytest.raises(BudgetError, match="host_budget"):
        open_store(stores["keep"], device_budget="1GiB", host_budget=100)
    with pytest.raises(ValueError, match="policy"):
        open_store(stores["keep"], policy="mru")


def test_backend_choice_is_visible_and_overridable(stores, monkeypatch):
    with open_store(stores["keep"]) as s:
        st = s.stats()
        assert st["backend"] in ("uring", "posix") and st["backend_reason"].startswith("auto")
    monkeypatch.setenv("MOESTREAM_IO", "posix")
    with open_store(stores["keep"]) as s:
        assert s.stats()["backend"] == "posix" and "MOESTREAM_IO" in s.stats()["backend_reason"]
    with pytest.raises(ValueError, match="io="):
        open_store(stores["keep"], io="aio")


class FaultyBackend:
    """Wraps a backend: EIO for reads at `eio_offsets`, completion delayed for `slow_offsets`."""

    def __init__(self, inner, eio_offsets=(), slow_offsets=(), delay=0.2):
        self.inner, self.name = inner, inner.name
        self.eio, self.slow, self.delay = set(eio_offsets), set(slow_offsets), delay

    def open(self, path):
        return self.inner.open(path)

    def close_file(self, handle):
        self.inner.close_file(handle)

    def submit(self, req):
        if req.offset in self.eio:
            f = Future()
            f.set_exception(StoreIOError(f"{req.path}: read of {req.length} bytes at offset {req.offset} failed: "
                                         f"{errno.errorcode[errno.EIO]}"))
            return f
        inner = self.inner.submit(req)
        if req.offset not in self.slow:
            return inner
        out = Future()
        inner.add_done_callback(lambda f: threading.Timer(self.delay, lambda: out.set_result(f.result())).start())
        return out

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("io", IOS)
def test_faults_reach_their_futures_only(stores, io):
    ref = expected(stores["keep"])
    with StoreReader(stores["keep"]) as r:
        bad, slow = r.extent(0, 3), r.extent(0, 4)
    s = open_store(stores["keep"], io=io, device_budget="1GiB", host_budget=0)
    s.backend = FaultyBackend(s.backend, eio_offsets={bad.offset}, slow_offsets={slow.offset})
    futs = s.fetch(0, [4, 3, 5, 6])
    order = []
    for f in s.as_completed(futs):
        order.append(futs.index(f))
    assert order[-1] == 0  # the delayed read arrives last: consumers see arrival order
    with pytest.raises(StoreIOError, match=rf"offset {bad.offset}"):
        futs[1].result()
    for i, e in [(0, 4), (2, 5), (3, 6)]:
        assert same(futs[i].result(), ref[(0, e)])
    s.backend.eio.clear()
    assert same(s.get(0, 3), ref[(0, 3)])  # a failed read is not cached: the next fetch retries
    s.close()
    assert s.pool.free == s.pool.count


def test_corrupt_extent_fails_its_future(stores, tmp_path):
    import shutil
    dst = tmp_path / "s"
    shutil.copytree(stores["keep"], dst)
    with StoreReader(dst) as r:
        reg = r.extent(1, 6)
    with open(dst / "experts-00000.moe", "r+b") as f:
        f.seek(reg.offset + 100)
        f.write(b"\x00\x01\x02")
    with open_store(dst, io="posix") as s:
        a, b = s.fetch(1, [5, 6])
        assert a.result()
        with pytest.raises(moestream.ChecksumError, match="layer 1 expert 6"):
            b.result()


def test_prefetch_is_bounded_lower_priority_and_cancellable(stores):
    with StoreReader(stores["keep"]) as r:
        size = r.extent(0, 0).padded_length
    with open_store(stores["keep"], io="posix", device_budget="1GiB", prefetch_budget=size, host_budget=0) as s:
        peak = {"v": 0}
        orig = s._issue

        def spy(load, slab):
            peak["v"] = max(peak["v"], s._prefetch_inflight)
            return orig(load, slab)
        s._issue = spy
        assert s.prefetch(1, range(8)) == 8
        s.get(0, 0)  # demand read goes ahead of the queued prefetches
        cancelled = s.cancel_prefetch()
        time.sleep(0.3)
        st = s.stats()
        assert cancelled >= 1 and st["prefetch_cancelled"] == cancelled
        assert peak["v"] <= size
        loaded = [e for e in range(8) if (1, e) in s.l1]
        assert len(loaded) == 8 - cancelled
        for e in loaded:
            s.get(1, e)
        assert s.stats()["prefetch_used"] == len(loaded) and s.stats()["hits_l1"] == len(loaded)


def test_several_consumers(stores):
    ref = expected(stores["int4"])
    errors = []
    with open_store(stores["int4"], io="auto", device_budget="300KiB", host_budget="200KiB") as s:
        def worker(seed):
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    l, es = rng.choice(s.layers), rng.sample(range(8), 3)
                    if rng.random() < 0.3:
                        s.prefetch(l, rng.sample(range(8), 2))
                    for e, f in zip(es, s.fetch(l, es)):
                        assert same(f.result(timeout=20), ref[(l, e)])
            except Exception as e:
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.l1.peak <= s.l1.budget and s.l2.peak <= s.l2.budget
    assert not errors, errors[:1]


def test_closed_store_refuses_work(stores):
    s = open_store(stores["keep"], io="posix")
    s.close()
    with pytest.raises(moestream.MoestreamError, match="closed"):
        s.fetch(0, [0])


def test_lfu_keeps_the_hot_expert(stores):
    ref = expected(stores["keep"])
    one = max(sum(t.numel() * t.element_size() for t in v.values()) for v in ref.values())
    with open_store(stores["keep"], io="posix", device_budget=2 * one, host_budget=0, policy="lfu") as s:
        for _ in range(5):
            s.get(0, 0)
        for e in range(1, 6):
            s.get(0, e)
        assert (0, 0) in s.l1
    with open_store(stores["keep"], io="posix", device_budget=2 * one, host_budget=0, policy="lru") as s:
        for _ in range(5):
            s.get(0, 0)
        for e in range(1, 6):
            s.get(0, e)
        assert (0, 0) not in s.l1


# ---- the zero-copy hot path: slots, ownership, the next-use policy, routing notes --------------

@pytest.fixture(scope="module")
def plain_store(checkpoints, tmp_path_factory):
    """Lossless, no zstd, no delta: every extent is plain (stored bytes == decoded bytes)."""
    return moestream.convert(checkpoints["mixtral"], tmp_path_factory.mktemp("plain") / "s", zstd_level=None,
                             delta=False, progress=False)


@pytest.mark.parametrize("io", IOS)
def test_plain_extents_are_read_straight_into_their_slot(plain_store, io):
    ref = expected(plain_store)
    with open_store(plain_store, io=io, device_budget=4 * 36864, host_budget=0) as s:
        for (l, e), want in ref.items():
            assert same(s.get(l, e), want)
        assert s.pool.in_use_peak == 0          # no slab: the reads landed in the L1 slots
        st = s.stats()
        assert st["misses"] == len(ref) and st["bytes_read"] == sum(
            s.index.extents[k].padded_length for k in ref) and st["uncached_decodes"] == 0


@pytest.mark.parametrize("store_kind", ["plain", "int4"])
def test_results_held_by_a_caller_survive_eviction(plain_store, stores, store_kind):
    path = plain_store if store_kind == "plain" else stores["int4"]
    ref = expected(path)
    with open_store(path, io="posix", device_budget=2 * 36864, host_budget=0) as s:
        held = s.get(0, 0)                     # its slot stays pinned while `held` lives
        w1 = held[next(iter(held))].t()        # a derived view counts too
        del held
        for e in range(1, 8):
            assert same(s.get(1, e), ref[(1, e)])
        assert torch.equal(w1.t(), ref[(0, 0)][next(iter(ref[(0, 0)]))])
        assert (0, 0) in s.l1 and s.stats()["uncached_decodes"] == 0
        del w1                                  # released: its slot can be reused now
        for e in range(1, 8):
            s.get(0, e)
        assert (0, 0) not in s.l1


def test_every_slot_held_falls_back_to_an_uncached_decode(plain_store):
    ref = expected(plain_store)
    with open_store(plain_store, io="posix", device_budget=2 * 36864, host_budget=0) as s:
        a, b = s.get(0, 0), s.get(0, 1)        # both slots held by the caller
        c = s.get(0, 2)
        assert same(c, ref[(0, 2)]) and same(a, ref[(0, 0)]) and same(b, ref[(0, 1)])
        assert s.stats()["uncached_decodes"] == 1 and (0, 2) not in s.l1
        assert s.l1.used <= s.l1.budget


def test_each_result_is_a_fresh_dict(stores):
    with open_store(stores["int4"], io="posix", device_budget="1MiB", host_budget=0) as s:
        first = s.get(0, 0)
        name = next(iter(first))
        first.pop(name)
        assert name in s.get(0, 0)             # the cache's entry did not lose the tensor


def test_fetch_ready_hands_out_hits_now_and_futures_for_the_rest(plain_store):
    ref = expected(plain_store)
    with open_store(plain_store, io="posix", device_budget="1MiB", host_budget=0) as s:
        s.get(0, 1)
        before = s.stats()
        ready, pending = s.fetch_ready(0, [2, 1, 3])
        assert list(ready) == [1] and same(ready[1], ref[(0, 1)])      # the cached one, no future
        assert sorted(pending.values()) == [2, 3] and all(isinstance(f, Future) for f in pending)
        for f, e in pending.items():
            assert same(f.result(), ref[(0, e)])
        after = s.stats()
        assert after["requests"] - before["requests"] == 3
        assert after["hits_l1"] - before["hits_l1"] == 1 and after["misses"] - before["misses"] == 2
        assert s.fetch_ready(0, [2, 3])[1] == {}                         # landed: both hits now


def test_next_use_beats_lru_on_the_layer_sweep(plain_store):
    """The decode sweep of `make demo` (a greedy run of a random model repeats its routing):
    6 experts per sweep, 5 slots. LRU evicts each expert just before the sweep comes back to
    it and never hits; next-use keeps all but one."""
    hits = {}
    for policy in ("lru", "next-use"):
        with open_store(plain_store, io="posix", device_budget=5 * 36864, host_budget=0, policy=policy) as s:
            for _ in range(20):
                for layer in s.layers:
                    s.note_routing(layer, [0, 1, 2])
                    for e in (0, 1, 2):
                        s.get(layer, e)          # computed and dropped, as the forward does
            hits[policy] = s.stats()["hits_l1"]
    assert hits["lru"] == 0 and hits["next-use"] >= 19 * 4, hits


def test_note_routing_cancels_wrong_guesses_and_prefetch_spares_its_layer(plain_store):
    with open_store(plain_store, io="posix", device_budget=4 * 36864, host_budget=0,
                    prefetch_budget=36864) as s:
        for e in (0, 1, 2, 3):
            s.get(1, e)                          # the cache is full of layer 1
        s.note_routing(0, [0])
        s.get(0, 0)                              # evicts one of layer 1 (a demand read may)
        before = {k for k in s.l1.keys() if k[0] == 1}
        queued = s.prefetch(1, [4, 5, 6, 7])     # guesses for layer 1: may not evict layer 1's experts
        cancelled = s.note_routing(1, [4])       # the router chose 4: queued 5, 6, 7 are dropped
        time.sleep(0.3)
        st = s.stats()
        assert queued == 4 and cancelled + st["prefetch_skipped"] >= 2
        assert st["prefetch_cancelled"] == cancelled
        assert len(before) == 3 and before <= set(s.l1.keys())  # no layer-1 expert was evicted by a guess


def test_a_failed_construction_leaks_no_thread_or_descriptor(stores, monkeypatch):
    import os
    import moestream.storage.store as store_module

    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    moestream.open(stores["keep"], io="posix").close()          # warm imports and lazy singletons
    threads, fds = threading.active_count(), open_fds()
    with pytest.raises(BudgetError):
        moestream.open(stores["keep"], device_budget="1KiB")      # fails early
    with pytest.raises(moestream.StoreIOError, match="kvikio"):
        moestream.open(stores["keep"], io="kvikio")              # fails choosing the backend

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("no decode threads today")
    monkeypatch.setattr(store_module, "ThreadPoolExecutor", Broken)
    for io in IOS:                                               # fails after the backend opened its files
        with pytest.raises(RuntimeError, match="no decode threads"):
            moestream.open(stores["keep"], io=io)
    assert threading.active_count() == threads and open_fds() == fds


def test_misses_allocate_nothing_that_stays(plain_store, stores):
    """RSS stays flat over many misses and evictions: slots, slabs and L2 entries are reused
    (bench/rss_long_run.py measures the same over a 2000-token generate)."""
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    for path in (plain_store, stores["int4"]):
        with open_store(path, io="posix", device_budget=3 * 36864, host_budget=4 * 36864) as s:
            rng = random.Random(0)

            def run(n):
                for _ in range(n):
                    s.get(rng.choice(s.layers), rng.randrange(s.experts_per_layer))
            run(200)
            before = rss()
            run(2000)
            assert rss() - before < 2 << 20, (path, rss() - before)
            st = s.stats()
            assert st["misses"] + st["hits_l2"] > 1000     # decoded again and again, from disk or L2


def test_a_failure_while_finishing_a_load_reaches_the_caller(plain_store, monkeypatch):
    def broken_put(self, *a, **k):
        raise RuntimeError("cache bookkeeping failed")

    with open_store(plain_store, io="posix", device_budget=4 * 36864, host_budget=0) as s:
        monkeypatch.setattr(TierCache, "put", broken_put)
        (fut,) = s.fetch(0, [1])
        with pytest.raises(RuntimeError, match="bookkeeping"):
            fut.result(timeout=30)            # an error, not a caller waiting forever
        monkeypatch.undo()
        assert same(s.get(0, 2), expected(plain_store)[(0, 2)])   # the Store still serves


class GatedBackend(FaultyBackend):
    """Holds every read until `release()`; `fail` makes held reads fail with EIO instead."""

    def __init__(self, inner):
        super().__init__(inner)
        self.held: list = []
        self.open_ = False
        self.fail = False
        self.lock = threading.Lock()

    def submit(self, req):
        with self.lock:
            if not self.open_:
                out = Future()
                self.held.append((req, out))
                return out
        return self.inner.submit(req)

    def release(self):
        with self.lock:
            self.open_ = True
            held, self.held = self.held, []
        for req, out in held:
            if self.fail:
                out.set_exception(StoreIOError(f"{req.path}: read at offset {req.offset} failed: EIO"))
                continue
            inner = self.inner.submit(req)
            inner.add_done_callback(lambda f, out=out: out.set_exception(f.exception()) if f.exception()
                                    else out.set_result(f.result()))


def wait_until(cond, timeout=10.0):
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("io", IOS)
def test_a_wrong_guess_in_flight_is_withdrawn_and_a_rerequested_one_still_lands(plain_store, io):
    ref = expected(plain_store)
    with open_store(plain_store, io=io, device_budget=8 * 36864, host_budget=0, chunk_size=8192,
                    prefetch_budget=4 * 36864) as s:
        gate = s.backend = GatedBackend(s.backend)
        free = s.arena.free
        assert s.prefetch(1, [4, 5, 6]) == 3
        wait_until(lambda: {r.ticket.key for r, _ in gate.held} == {(1, 4), (1, 5), (1, 6)})  # all dispatched
        assert s.note_routing(1, [4]) == 2            # 5 and 6 are on their way: withdrawn
        again = s.fetch(1, [6])[0]                     # ... but 6 is asked for after all
        gate.release()
        assert same(again.result(timeout=10), ref[(1, 6)])
        assert same(s.get(1, 4), ref[(1, 4)])
        wait_until(lambda: not s._pending)
        st = s.stats()
        assert (1, 5) not in s.l1 and st["prefetch_cancelled"] == 2
        assert st["prefetch_used"] == 2 and st["prefetch_late"] >= 1   # 6 was joined while it was read
        assert st["prefetch_wasted_bytes"] == 0       # its reads never started: nothing was read for it
        assert s.arena.free == free - 2               # 4 and 6 hold slots; 5's went back
        assert same(s.get(1, 5), ref[(1, 5)])         # a fresh load later


def test_prefetch_waits_for_the_demand_reads_in_flight(plain_store):
    ref = expected(plain_store)
    with open_store(plain_store, io="posix", device_budget=8 * 36864, host_budget=0) as s:
        gate = s.backend = GatedBackend(s.backend)
        demand = s.fetch(0, [0, 1])
        wait_until(lambda: len({r.ticket.key for r, _ in gate.held}) == 2)
        s.prefetch(1, [2, 3])
        time.sleep(0.2)
        assert {r.ticket.key for r, _ in gate.held} == {(0, 0), (0, 1)}   # the guesses wait
        gate.release()
        for f, e in zip(demand, (0, 1)):
            assert same(f.result(timeout=10), ref[(0, e)])
        wait_until(lambda: (1, 2) in s.l1 and (1, 3) in s.l1)


def test_a_failed_read_gives_its_slot_back(plain_store):
    with open_store(plain_store, io="posix", device_budget=3 * 36864, host_budget=0) as s:
        gate = s.backend = GatedBackend(s.backend)
        gate.fail = True
        fut = s.fetch(0, [0])[0]
        wait_until(lambda: gate.held)
        gate.release()
        with pytest.raises(StoreIOError, match="EIO"):
            fut.result(timeout=10)
        wait_until(lambda: not s._pending)
        assert s.arena.free == s.arena.count and (0, 0) not in s.l1


def test_only_plain_unverified_kvikio_cuda_reads_go_straight_to_the_device(plain_store, stores):
    from moestream.storage.store import reads_to_device
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with StoreReader(plain_store) as r:
        plain = r.extent(r.layers[0], 0)
    with StoreReader(stores["int4"]) as r:
        coded = r.extent(r.layers[0], 0)
    assert reads_to_device(cuda, "kvikio", plain, verify=False)
    assert not reads_to_device(cuda, "kvikio", plain, verify=True)      # xxh3 needs the bytes on the host
    assert not reads_to_device(cuda, "kvikio", coded, verify=False)     # codec stages are undone on the host
    assert not reads_to_device(cuda, "uring", plain, verify=False)
    assert not reads_to_device(cpu, "kvikio", plain, verify=False)


def test_plain_extents_decode_from_device_memory_as_views(plain_store, stores):
    # the meta device stands in for CUDA memory: the same code path, shapes and dtypes only
    with StoreReader(plain_store) as r:
        key = (r.layers[0], 1)
        region = r.extent(*key)
        want = r.expert(*key)
        buf = torch.empty(region.padded_length, dtype=torch.uint8, device="meta")
        got = r.decode(region, buf[:region.length], key, device="meta", alias=True)
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
        assert all(v.untyped_storage().nbytes() == buf.untyped_storage().nbytes() for v in got.values())
    with StoreReader(stores["int4"]) as r:
        region = r.extent(r.layers[0], 1)
        with pytest.raises(ValueError, match="only plain extents"):
            r.decode(region, torch.empty(region.length, dtype=torch.uint8, device="meta"), (r.layers[0], 1),
                     device="meta")


# ---- budgets as users give them (issue 26 item 2) ------------------------------------------------

def test_budgets_take_shares_and_auto_and_refuse_more_than_is_free():
    from moestream.errors import BudgetError, UsageError
    from moestream.storage.budget import resolve_budget
    free = 8 << 30
    assert resolve_budget(None, "device_budget", free=free, where="of RAM available").bytes == 2 << 30
    b = resolve_budget("auto", "device_budget", free=free, where="of RAM available")
    assert b.bytes == 2 << 30 and "25% of the 8.00 GiB of RAM available (the default)" == b.how
    assert resolve_budget("50%", "device_budget", free=free, where="x").bytes == 4 << 30
    assert resolve_budget(None, "host_budget", free=free, where="x", default_share=None).bytes == 0
    assert resolve_budget("1GiB", "host_budget", free=free, where="x").bytes == 1 << 30
    with pytest.raises(BudgetError, match=r"device_budget 12.00 GiB is more than the 8.00 GiB of RAM available"):
        resolve_budget("12GiB", "device_budget", free=free, where="of RAM available")
    with pytest.raises(UsageError, match=r"'150%' must lie in 0%..100%"):
        resolve_budget("150%", "device_budget", free=free, where="x")
    with pytest.raises(UsageError, match="cannot parse 'half%'"):
        resolve_budget("half%", "device_budget", free=free, where="x")


@pytest.mark.parametrize("quant", ["keep", "int4"])
def test_held_hits_are_pinned_counted_and_read_where_the_hand_out_reads(checkpoints, tmp_path, quant):
    """hold_hits: only L1 hits (and only those `wanted` takes), each slot pinned until
    release_held, so a load that needs a slot evicts another expert; counted as requests and
    hits; each held address is where the hand-out's tensors start (decoded tensors one after
    another; a quantized payload from byte 0)."""
    from moestream.formats.quantized import QuantizedTensor, plane_layout
    from moestream.storage.arena import decoded_offsets
    # group 16: the tiny experts' rows hold whole groups, so int4 is held in its stored form
    store = moestream.convert(checkpoints["mixtral"], tmp_path / quant, quant=quant, group_size=16, progress=False)
    kw = {"keep_quantized": True, "host_budget": 0}
    with open_store(store, device_budget="64MiB", **kw) as probe:
        slot_bytes = probe.arena.slot_size

    def first_addresses(s, e) -> dict:
        return {name: t.addresses()[0] if isinstance(t, QuantizedTensor) else t.data_ptr()
                for name, t in s.get(0, e).items()}

    with open_store(store, device_budget=3 * slot_bytes, **kw) as s:
        assert s.holds_by_address and s.expert_slots == 3
        for e in range(3):
            s.get(0, e)
        before = s.stats()
        held = s.hold_hits(0, [0, 1, 2, 3], wanted=lambda e, region, quantized: e != 2)
        assert sorted(held) == [0, 1]                      # 2 refused, 3 not in L1 (and not fetched)
        after = s.stats()
        assert after["requests"] - before["requests"] == 2 and after["hits_l1"] - before["hits_l1"] == 2
        assert after["misses"] == before["misses"]
        assert all(s.arena.pinned(h.slot) for h in held.values())
        for e, h in held.items():
            assert h.quantized == (quant == "int4") and h.region is s.index.extents[(0, e)]
            if h.quantized:
                want = {name: h.address + offsets[0] for name, spec, _, offsets, _, _ in plane_layout(h.region)
                        if spec is not None}
            else:
                want = {t.name: h.address + off for t, off in zip(h.region.tensors, decoded_offsets(h.region))}
            assert first_addresses(s, e) == want
        s.get(0, 3)                        # needs a slot: the unpinned expert 2 goes, not 0 or 1
        assert {k[1] for k in s.l1.keys() if k[0] == 0} == {0, 1, 3}
        s.release_held(held)
        assert not any(s.arena.pinned(h.slot) for h in held.values())


def test_a_resident_lease_pins_what_l1_holds_refreshes_counts_and_releases_once(checkpoints, tmp_path):
    """lease_resident: only where L1 has a slot for every expert (else None, nothing pinned); the
    addresses those of hold_hits, 0 for experts L1 does not hold; refresh takes in the ones loaded
    since; count adds requests and L1 hits; release unpins once and zeroes the addresses."""
    store = moestream.convert(checkpoints["mixtral"], tmp_path / "int4", quant="int4", group_size=16, progress=False)
    kw = {"keep_quantized": True, "host_budget": 0}
    with open_store(store, device_budget="64MiB", **kw) as probe:
        slot_bytes, experts = probe.arena.slot_size, len(probe.index.extents)
    with open_store(store, device_budget=(experts - 1) * slot_bytes, **kw) as s:
        s.get(0, 0)
        assert s.lease_resident() is None                            # one expert short of a slot each
        assert not any(s.arena.pinned(i) for i in range(s.arena.count))
    with open_store(store, device_budget=experts * slot_bytes, **kw) as s:
        s.get(0, 1)
        s.get(1, 2)
        lease = s.lease_resident()
        assert sorted(lease.addresses) == sorted(s.index.moe_layers)
        held = s.hold_hits(0, [1])
        assert lease.addresses[0][1] == held[1].address and lease.addresses[0][0] == 0
        s.release_held(held)
        assert s.arena.pinned(held[1].slot)                           # the lease's pin stays
        assert [int(a > 0) for a in lease.addresses[1]] == [int(e == 2) for e in range(s.index.experts_per_layer)]
        before = s.stats()
        lease.count(3)
        after = s.stats()
        assert after["requests"] - before["requests"] == 3 and after["hits_l1"] - before["hits_l1"] == 3
        assert after["misses"] == before["misses"]
        s.get(0, 3)
        assert lease.refresh(1) == 0 and lease.addresses[0][3] == 0   # another layer's: left alone
        assert lease.refresh(0) == 1 and lease.addresses[0][3] == s.hold_hits(0, [3])[3].address
        pinned = [i for i in range(s.arena.count) if s.arena.pinned(i)]
        assert len(pinned) == 3
        lease.release()
        lease.release()                                               # once only
        assert [i for i in range(s.arena.count) if s.arena.pinned(i)] == [s.hold_hits(0, [3])[3].slot]
        assert not any(a.any() for a in lease.addresses.values())
        assert lease.refresh(0) == 0
    with pytest.raises(moestream.errors.MoestreamError, match="closed"):
        s.lease_resident()


def test_a_routing_l1_holds_whole_is_noted_counted_and_pinned_at_once_else_left_alone(checkpoints, tmp_path):
    """hold_routed: with every routed expert in L1, the routing is noted (as note_routing notes
    it), the experts counted as requests and hits and their slots pinned until release_slots,
    the addresses those of hold_hits; with one of them missing, None and nothing noted,
    counted or pinned (the caller fetches as usual)."""
    store = moestream.convert(checkpoints["mixtral"], tmp_path / "int4", quant="int4", group_size=16, progress=False)
    kw = {"keep_quantized": True, "host_budget": 0}
    with open_store(store, device_budget="64MiB", **kw) as probe:
        slot_bytes = probe.arena.slot_size
    with open_store(store, device_budget=3 * slot_bytes, **kw) as s:
        for e in range(3):
            s.get(0, e)
        before, routed = s.stats(), s._routed
        assert s.hold_routed(0, [1, 3]) is None                      # 3 is not in L1
        assert s.stats() == before and s._routed == routed
        assert not any(s.arena.pinned(i) for i in range(s.arena.count))
        assert s.l1.keys() and (0, 3) not in s.l1.keys()              # and was not fetched
        slots, addresses = s.hold_routed(0, [2, 0])
        after = s.stats()
        assert after["requests"] - before["requests"] == 2 and after["hits_l1"] - before["hits_l1"] == 2
        assert s._routed == (0, frozenset({0, 2}))
        held = s.hold_hits(0, [2, 0])
        assert [held[2].slot, held[0].slot] == slots and [held[2].address, held[0].address] == addresses
        s.release_held(held)
        assert all(s.arena.pinned(slot) for slot in slots)
        s.get(0, 3)                        # needs a slot: the unpinned expert 1 goes, not 0 or 2
        assert {k[1] for k in s.l1.keys() if k[0] == 0} == {0, 2, 3}
        s.release_slots(slots)
        assert not any(s.arena.pinned(i) for i in range(s.arena.count))
        with pytest.raises(moestream.errors.UsageError, match="expert 1.5"):
            s.hold_routed(0, [1.5])
