"""Stored size of the experts per codec, on a synthetic bf16 checkpoint (N(0, 0.02) weights).

    .venv/bin/python bench/codec_sizes.py --size 200MiB --workdir /work
"""
from __future__ import annotations

import argparse
import shutil

import moestream
from moestream.formats import StoreReader
from moestream.formats.inspect import chain_counts
from moestream.bench.io import synthetic_checkpoint
from moestream.units import parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="200MiB")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    with synthetic_checkpoint(parse_size(a.size), a.workdir) as (src, tmp):
        for quant in ("keep", "int8", "int4"):
            for zstd in (3, None):
                out = moestream.convert(src, tmp / f"{quant}-{zstd}", quant=quant, zstd_level=zstd, progress=False)
                with StoreReader(out) as r:
                    regs = list(r.index.extents.values())
                stored = sum(x.length for x in regs)
                source = sum(x.source_length for x in regs)
                chains = chain_counts(regs)
                print(f"{quant:>5} zstd={zstd!s:>4}: {stored / 2**20:8.1f} MiB of {source / 2**20:.1f} MiB source "
                      f"= {stored / source:.3f}  {chains}")
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
