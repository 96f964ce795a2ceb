"""Peak resident memory of `moestream convert` on a checkpoint of several GB.

    .venv/bin/python bench/convert_rss.py --size 2.2GB --workdir /work

Writes a synthetic bf16 Mixtral-style checkpoint (6 MiB experts) tensor by tensor, converts it
in a child process per --quant, and reports the child's peak RSS (ru_maxrss) against the
checkpoint size and the largest tensor."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from moestream.formats.hf_checkpoint import HFCheckpoint
from moestream.bench.io import synthetic_checkpoint
from moestream.units import format_size, parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2.2GB")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quant", action="append", default=None)
    a = ap.parse_args()
    with synthetic_checkpoint(parse_size(a.size), a.workdir) as (src, tmp):
        ck = HFCheckpoint(src)
        total = sum(t.length for t in ck.tensors.values())
        largest = max(t.length for t in ck.tensors.values())
        expert = 3 * max(t.length for t in ck.tensors.values() if ".experts." in t.name)
        print(f"checkpoint {format_size(total)} ({total} bytes), largest tensor {format_size(largest)}, "
              f"one expert {format_size(expert)}")
        idle = _child_peak([sys.executable, "-c", "import moestream.formats.convert, torch, numpy, zstandard"])
        print(f"python + imports alone: peak RSS {format_size(idle)}")
        for quant in a.quant or ["keep", "int4"]:
            t0 = time.perf_counter()
            peak = _child_peak([sys.executable, "-m", "moestream.cli", "convert", str(src), str(tmp / quant),
                                "--quant", quant, "--quiet"])
            dt = time.perf_counter() - t0
            print(f"convert --quant {quant:>4}: peak RSS {format_size(peak)} = {peak / total:.3f} of the checkpoint, "
                  f"{(peak - idle) / expert:.1f} experts above the imports; {total / dt / 1e6:.0f} MB/s")
            shutil.rmtree(tmp / quant)


def _child_peak(cmd: list[str]) -> int:
    """Peak RSS in bytes of one child process (wait4's rusage, so only that child counts)."""
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return usage.ru_maxrss * 1024


if __name__ == "__main__":
    main()
