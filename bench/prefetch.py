"""Decode tokens/s with and without next-layer speculative prefetch, in one run.

    .venv/bin/python bench/prefetch.py --size 256MiB --budget-fraction 0.25 --workdir /work

A synthetic bf16 Mixtral-style model (6 MiB experts) is converted (--quant, default int4, no
zstd), then generated from with a device budget of a fraction of its decoded experts and no
host tier, alternating prefetch off/on for --repeat rounds; reports median tokens/s, stall
seconds and prefetch accuracy."""
from __future__ import annotations

import argparse
import statistics

import torch

import moestream
from moestream.compute import load_model
from moestream.formats import StoreReader
from moestream.bench.io import drop_page_cache, synthetic_checkpoint
from moestream.units import parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    with synthetic_checkpoint(parse_size(a.size), a.workdir) as (src, tmp):
        store = moestream.convert(src, tmp / "store", quant=a.quant, zstd_level=None, delta=False, progress=False)
        with StoreReader(store) as r:
            decoded = sum(reg.decoded_length for reg in r.index.extents.values())
        budget = int(decoded * a.budget_fraction)
        ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(a.repeat):
            for prefetch in (False, True):
                drop_page_cache()
                model = load_model(store, device=a.device, device_budget=budget, host_budget=0, prefetch=prefetch,
                                   dtype=torch.bfloat16 if a.device != "cpu" else torch.float32)
                timings: dict = {}
                model.generate(ids, a.tokens, timings=timings)
                st = model.store.stats()
                model.store.close()
                runs[prefetch].append({"tps": (timings["decode_tokens"] - 1) / timings["decode_seconds"],
                                       "stall": st["stall_seconds"], "acc": st["prefetch_accuracy"],
                                       "reads": st["reads"]})
        print(f"{a.quant} store, {decoded / 2**20:.0f} MiB of decoded experts, device budget {budget / 2**20:.0f} MiB, "
              f"{a.tokens} tokens, device {a.device}")
        for prefetch, rs in runs.items():
            acc = [r["acc"] for r in rs if r["acc"] is not None]
            print(f"prefetch {'on ' if prefetch else 'off'}: decode {statistics.median(r['tps'] for r in rs):.2f} tok/s "
                  f"(runs {', '.join('%.2f' % r['tps'] for r in rs)}), stall {statistics.median(r['stall'] for r in rs):.2f} s, "
                  f"reads {statistics.median(r['reads'] for r in rs):.0f}"
                  + (f", prefetch accuracy {statistics.median(acc):.2f}" if acc else ""))


if __name__ == "__main__":
    main()
