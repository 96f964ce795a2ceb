"""What should the host tier (L2) hold: stored extents or decoded tensors?

Measures, per expert of a synthetic bf16 checkpoint converted to each --quant: stored and
decoded sizes, the cold read time (uring, O_DIRECT, page cache dropped) and the decode time
from host bytes (checksum + zstd + dequant to bf16, on this CPU). Run:

    .venv/bin/python bench/l2_tier.py --size 256MiB
"""
from __future__ import annotations

import argparse
import statistics
import time

import moestream
from moestream.formats import StoreReader
from moestream.bench.io import drop_page_cache, synthetic_checkpoint
from moestream.units import parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    with synthetic_checkpoint(parse_size(a.size), a.workdir) as (src, tmp):
        print(f"{'quant':>6} {'stored MiB':>10} {'decoded MiB':>11} {'ratio':>6} {'read ms':>8} {'decode ms':>9} "
              f"{'read GB/s':>9} {'decode GB/s(out)':>16}")
        for quant in ["bf16", "int8", "int4"]:
            store = moestream.convert(src, tmp / quant, quant=quant, progress=False)
            with StoreReader(store) as r:
                keys = sorted(r.index.extents)
                drop_page_cache()
                # room for every expert (the CPU tier is preallocated: no larger than needed)
                every = len(keys) * (max(x.decoded_length for x in r.index.extents.values()) + 8192)
                with moestream.open(store, device_budget=every, host_budget=0, io="auto") as s:
                    t0 = time.perf_counter()
                    for f in s.as_completed([f for l in r.layers for f in s.fetch(l, range(r.experts_per_layer))]):
                        f.result()
                    wall = time.perf_counter() - t0
                    st = s.stats()
                read_ms = 1e3 * st["read_seconds"] / st["reads"]
                decode = []
                stored_sz, decoded_sz = [], []
                for k in keys:
                    reg = r.index.extents[k]
                    data = r.read_region(reg, k)
                    t0 = time.perf_counter()
                    r.check(reg, data, k)
                    out = r.decode(reg, data, k)
                    decode.append(time.perf_counter() - t0)
                    stored_sz.append(reg.length)
                    decoded_sz.append(sum(t.numel() * t.element_size() for t in out.values()))
            d_ms = 1e3 * statistics.median(decode)
            print(f"{quant:>6} {statistics.mean(stored_sz) / 2**20:>10.2f} {statistics.mean(decoded_sz) / 2**20:>11.2f} "
                  f"{statistics.mean(decoded_sz) / statistics.mean(stored_sz):>6.2f} {read_ms:>8.2f} {d_ms:>9.2f} "
                  f"{st['bytes_read'] / wall / 1e9:>9.2f} {statistics.mean(decoded_sz) / (d_ms / 1e3) / 1e9:>16.2f}")


if __name__ == "__main__":
    main()
