"""Decode of shuffle+zstd bf16 extents with the byte-plane unshuffle (formats/codecs.py) against
numpy's transpose copy (the implementation before 2026-11-23), alternating in one run, on a
synthetic 64 MiB bf16 checkpoint (6 MiB experts). Stored bytes are read once; the checksum is not
timed. Run:

    .venv/bin/python bench/unshuffle.py
"""
import statistics
import time

import numpy as np

import moestream
from moestream.bench.io import synthetic_checkpoint
from moestream.formats import StoreReader, codecs

new = codecs.unshuffle


def old(buf, itemsize, out=None):
    r = np.ascontiguousarray(buf.reshape(itemsize, -1).T).reshape(-1)
    if out is not None:
        out[:] = r
        return out
    return r


with synthetic_checkpoint(64 << 20, None) as (src, tmp):
    store = moestream.convert(src, tmp / "bf16", quant="bf16", progress=False)
    with StoreReader(store) as r:
        keys = [(l, e) for l in r.layers for e in range(r.experts_per_layer)][:8]
        stored = {k: r.read_region(r.extent(*k)) for k in keys}
        reg = r.extent(*keys[0])
        print("chain", reg.chain, "decoded MiB", reg.decoded_length / 2**20)
        res = {"old": [], "new": []}
        for rep in range(5):
            for name, f in (("old", old), ("new", new)):
                codecs.unshuffle = f
                t0 = time.perf_counter()
                for k in keys:
                    r.decode(r.extent(*k), stored[k], k)
                res[name].append((time.perf_counter() - t0) / len(keys) * 1e3)
        med = {k: statistics.median(v) for k, v in res.items()}
        print("ms per extent (checksum excluded), median of 5 alternating:", {k: round(v, 2) for k, v in med.items()},
              "speedup", round(med["old"] / med["new"], 2))
