"""The converter's zstd rule, before and after 2026-11-23, in one run: the same checkpoint
converted with `zstd_min_saving=0` (zstd wherever it saves a page: the old behaviour, which
stored lossless bf16 as shuffle+zstd) and with the default (zstd only where it halves the
bytes: bf16 stored raw), then for each store, alternating, `--repeat` times:

- Store.fetch cold: every expert once in random order, 16 in flight, results dropped, the page
  cache dropped first (root; otherwise said): decoded GB/s delivered, bytes read, and the CPU
  seconds of decoding on the Store's threads;
- with --routing-model: decode tok/s of the trained routing model (moestream.bench.routing_model)
  teacher-forced over 300 held-out tokens at a 25 % device budget (both stores of that model).

    sudo .venv/bin/python bench/zstd_min_saving.py [--size 1GiB] [--repeat 3] [--routing-model] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import moestream
from moestream.bench.decode import fetch_all
from moestream.bench.io import drop_page_cache, synthetic_checkpoint
from moestream.formats import StoreReader
from moestream.formats.inspect import chain_counts
from moestream.units import parse_size


def fetch_cold(store: Path) -> dict:
    with StoreReader(store) as r:
        keys = sorted(r.index.extents)
        decoded = sum(x.decoded_length for x in r.index.extents.values())
        one = max(x.decoded_length for x in r.index.extents.values())
    random.Random(0).shuffle(keys)
    dropped = drop_page_cache()
    with moestream.open(store, device_budget=32 * one, host_budget=0) as s:
        dt = fetch_all(s, keys)
        st = s.stats()
    return {"decoded_GBps": decoded / dt / 1e9, "read_MB": st["bytes_read"] / 1e6,
            "decode_cpu_s": st["decode_seconds"], "checksum_s": st["checksum_seconds"], "cold": dropped}


def chains(store: Path) -> str:
    with StoreReader(store) as r:
        return ", ".join(f"{k} ({n})" for k, n in chain_counts(r.index.extents.values()).items())


def routing_model_runs(work: Path, repeat: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from predictor_prefetch import run

    from moestream.bench import routing_model
    from moestream.bench.traces import held_out_texts
    from moestream.compute.generation import load_tokenizer
    store, total = routing_model.ensure_store()
    ckpt = routing_model.ensure()
    stores = {name: moestream.convert(ckpt, work / f"routing-{i}", zstd_min_saving=ms, progress=False)
              for i, (name, ms) in enumerate((("old rule (0)", 0.0), ("default (0.5)", 0.5)))}
    with moestream.open(store, device_budget="64MiB") as s:
        ids = load_tokenizer(s).encode(held_out_texts(1)[0]).ids[:300]
    runs: dict = {name: [] for name in stores}
    for _ in range(repeat):
        for name, path in stores.items():
            runs[name].append(run(path, ids, int(total * 0.25), False, 0.0))
    return {name: ({k: statistics.median(r[k] for r in rs) for k in ("tok_s", "stall_s", "reads")}, chains(stores[name]))
            for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="expert bytes of the synthetic bf16 checkpoint")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--routing-model", action="store_true", help="also decode the trained routing model")
    a = ap.parse_args()
    with synthetic_checkpoint(parse_size(a.size), a.workdir) as (src, tmp):
        stores = {"old rule (0)": moestream.convert(src, tmp / "old", zstd_min_saving=0.0, progress=False),
                  "default (0.5)": moestream.convert(src, tmp / "new", progress=False)}
        runs: dict = {name: [] for name in stores}
        for _ in range(a.repeat):
            for name, store in stores.items():
                runs[name].append(fetch_cold(store))
        cold = all(r["cold"] for rs in runs.values() for r in rs)
        print(f"Store.fetch of every expert once, random order, 16 in flight; synthetic bf16 checkpoint, "
              f"{a.size} of experts; page cache {'dropped' if cold else 'NOT dropped (not root)'}; medians of "
              f"{a.repeat} alternating runs")
        print("| zstd_min_saving | chains | decoded GB/s | MB read | decode CPU s | checksum s |\n|---|---|---:|---:|---:|---:|")
        for name, rs in runs.items():
            m = {k: statistics.median(r[k] for r in rs) for k in ("decoded_GBps", "read_MB", "decode_cpu_s", "checksum_s")}
            print(f"| {name} | {chains(stores[name])} | {m['decoded_GBps']:.2f} | {m['read_MB']:.0f} | "
                  f"{m['decode_cpu_s']:.2f} | {m['checksum_s']:.2f} |")
        if a.routing_model:
            print("\ntrained routing model, 300 held-out tokens teacher-forced, device budget 25 %, CPU")
            print("| zstd_min_saving | chains | tok/s | stall s | reads |\n|---|---|---:|---:|---:|")
            for name, (m, ch) in routing_model_runs(tmp, a.repeat).items():
                print(f"| {name} | {ch} | {m['tok_s']:.1f} | {m['stall_s']:.2f} | {m['reads']:.0f} |")


if __name__ == "__main__":
    main()
