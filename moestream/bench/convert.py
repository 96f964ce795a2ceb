"""`moestream bench convert`: how fast `moestream convert` turns a checkpoint into a store, against
the two things that can bound it, measured in the same run on the same disk:

- the disk: fio's sequential read of the checkpoint file and sequential write of a file as large
  (io_uring, O_DIRECT, 1 MiB requests, depth 16); conversion reads every input byte once and
  writes about as many (`keep`) or fewer (`int4`);
- the cores: the encode rate, input bytes per second of `encode_region` (cast, quantize, delta
  against the layer's mean, shuffle, zstd, xxh3: the converter's own options) on experts already in
  memory, with as many threads as the converter uses.

The checkpoint is synthetic (Mixtral-style bf16, N(0, 0.02) weights, layers of 128 experts of
4 MiB: bench/io.py).
Each conversion runs in a child process (its wall time, CPU time and peak RSS are its own) after
the page cache is dropped (root only; the report says when it was not). Reported per quant: input
GB/s = checkpoint bytes / wall seconds, that over the slower of fio's read and write, that over
the encode rate, that over the same-disk bound 1 / (1/read + (store bytes / input bytes)/write)
(reads and writes sharing one device's bandwidth), and the CPU use (CPU seconds / wall seconds /
cores: 1.0 = every core busy)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UsageError
from .io import drop_page_cache, run_fio, write_synthetic_checkpoint

QUANTS = ("keep", "int4")
EXPERT_MIB, EXPERTS_PER_LAYER = 4, 128
FIO_BS, FIO_DEPTH = 1 << 20, 16

# the child: one conversion, its own wall time, CPU time and peak RSS
_CHILD = r"""
import json, resource, sys, time
import moestream
src, out, quant = sys.argv[1:4]
import moestream.engines, moestream.formats.convert, moestream.compute.loader   # imported before the clock starts
def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
c0, t0 = cpu(), time.perf_counter()
moestream.convert(src, out, quant=quant, progress=False)
wall, used = time.perf_counter() - t0, cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": wall, "cpu_seconds": used, "peak_rss_bytes": peak}))
"""


def encode_rate(quant: str, workers: int, *, experts: int = 8, expert_mib: int = EXPERT_MIB, seed: int = 0) -> float:
    """Input bytes per second (GB/s) that `workers` threads encode, as the converter does for
    `quant` (delta candidate against a base included), on `experts` bf16 experts in memory."""
    from ..formats.codecs import EncodeOptions, encode_region
    from ..formats.constants import DEFAULT_GROUP_SIZE, DEFAULT_ZSTD_LEVEL, DEFAULT_ZSTD_MIN_SAVING
    hidden = 1024
    inter = expert_mib * (1 << 20) // (3 * hidden * 2)
    rng = np.random.default_rng(seed)
    shapes = {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}

    def bf16(shape):
        x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02
        return ((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)
    tensors = [[(t, "bf16", s, bf16(s)) for t, s in shapes.items()] for _ in range(experts)]
    base = {t: bf16(s) for t, s in shapes.items()}
    opts = EncodeOptions(quant=None if quant == "keep" else quant, group_size=DEFAULT_GROUP_SIZE, delta=True,
                         zstd_level=DEFAULT_ZSTD_LEVEL, zstd_min_saving=DEFAULT_ZSTD_MIN_SAVING)
    nbytes = sum(x[3].nbytes for e in tensors for x in e)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda e: encode_region(e, opts, base, "bf16"), tensors[:workers]))   # warm up
        t0 = time.perf_counter()
        list(pool.map(lambda e: encode_region(e, opts, base, "bf16"), tensors))
        return nbytes / (time.perf_counter() - t0) / 1e9


def bench_convert(size: int, *, workdir: Optional[str] = None, quants=QUANTS, progress=print) -> dict[str, Any]:
    """Build a synthetic checkpoint of about `size` bytes under `workdir`, measure fio and the
    encode rate, convert it once per quant; returns every figure as plain data."""
    from ..formats.convert import encode_workers
    tmp = Path(tempfile.mkdtemp(prefix="moestream-bench-convert-", dir=workdir))
    cores = os.cpu_count() or 1
    workers = encode_workers()
    d: dict[str, Any] = {"machine": {"cores": cores, "platform": platform.platform(), "workdir": str(tmp)},
                         "encode_threads": workers}
    try:
        progress(f"writing a synthetic bf16 checkpoint of {size / 2**30:.1f} GiB in {tmp}")
        # layers of 128 experts of 4 MiB (Qwen3-30B-A3B's are 128 of 4.5 MiB): the per-layer work
        # (a checkpoint fsync, the pipeline draining) weighs what it does in a real conversion
        # (a small --size takes fewer experts a layer, so that it still has several layers)
        experts = min(EXPERTS_PER_LAYER, max(8, size // (4 * EXPERT_MIB << 20)))
        d["experts_per_layer"] = experts
        src = write_synthetic_checkpoint(tmp / "ckpt", size, expert_mib=EXPERT_MIB, n_experts=experts)
        ckpt_file = src / "model.safetensors"
        d["input_bytes"] = input_bytes = ckpt_file.stat().st_size
        d["page_cache"] = "dropped before each measurement" if drop_page_cache() else \
            "not dropped (not root): reads may come from memory"
        progress("fio: sequential read of the checkpoint, sequential write of a file as large")
        read = run_fio(str(ckpt_file), rw="read", bs=FIO_BS, iodepth=FIO_DEPTH, size=input_bytes)
        drop_page_cache()
        write = run_fio(str(tmp / "fio-write"), rw="write", bs=FIO_BS, iodepth=FIO_DEPTH, size=input_bytes)
        (tmp / "fio-write").unlink(missing_ok=True)
        d["fio_seq_read"], d["fio_seq_write"] = read, write
        disk = min(x["gbps"] for x in (read, write)) if read and write and "gbps" in read and "gbps" in write else None
        d["disk_gbps"] = disk
        for quant in quants:
            progress(f"encode rate, --quant {quant}, {workers} threads")
            rate = encode_rate(quant, workers)
            drop_page_cache()
            progress(f"convert --quant {quant}")
            out = tmp / f"store-{quant}"
            r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), quant], capture_output=True,
                               text=True)
            if r.returncode != 0:
                d[quant] = {"error": r.stderr.strip()[-400:]}
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            gbps = input_bytes / m["seconds"] / 1e9
            store_bytes = sum(f.stat().st_size for f in out.iterdir())
            # the conversion reads the input and writes the store on one disk: if the device serves
            # both from one budget, input can go no faster than 1 / (1/read + (store/input)/write)
            same_disk = (1 / (1 / read["gbps"] + store_bytes / input_bytes / write["gbps"])) if disk else None
            m.update(input_gbps=gbps, encode_gbps=rate, vs_encode=gbps / rate,
                     vs_disk=gbps / disk if disk else None, same_disk_bound_gbps=same_disk,
                     vs_same_disk=gbps / same_disk if same_disk else None,
                     cpu_use=m["cpu_seconds"] / m["seconds"] / cores, store_bytes=store_bytes)
            # the bound: the cores when they were all busy, else whatever the disk allows
            m["bound"] = "cores" if m["cpu_use"] >= 0.9 else (
                "disk" if same_disk and m["vs_same_disk"] >= 0.8 else "the pipeline (neither disk nor cores full)")
            d[quant] = m
            _rm(out)
    finally:
        _rm(tmp)
    return d


def _rm(p: Path) -> None:
    import shutil
    shutil.rmtree(p, ignore_errors=True)


def format_table(d: dict[str, Any]) -> str:
    def g(x):
        return f"{x:.2f}" if isinstance(x, float) else "-"
    lines = [f"checkpoint: {d['input_bytes'] / 2**30:.2f} GiB synthetic bf16; page cache {d['page_cache']}",
             f"disk (fio, 1 MiB, depth {FIO_DEPTH}): sequential read {g((d['fio_seq_read'] or {}).get('gbps'))} GB/s, "
             f"write {g((d['fio_seq_write'] or {}).get('gbps'))} GB/s",
             f"cores: {d['machine']['cores']}, encode threads {d['encode_threads']}", "",
             "| --quant | input GB/s | / slower of read, write | / same-disk bound | encode GB/s | / encode | CPU use "
             "| peak RSS MiB | store GiB | bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for q in QUANTS:
        m = d.get(q)
        if m is None:
            continue
        if "error" in m:
            lines.append(f"| {q} | failed: {m['error'][-120:]} |")
            continue
        lines.append(f"| {q} | {g(m['input_gbps'])} | {g(m['vs_disk'])} | {g(m['vs_same_disk'])} | "
                     f"{g(m['encode_gbps'])} | {g(m['vs_encode'])} | "
                     f"{g(m['cpu_use'])} | {m['peak_rss_bytes'] / 2**20:.0f} | {m['store_bytes'] / 2**30:.2f} | "
                     f"{m['bound']} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="8GiB", help="bytes of the synthetic checkpoint (default 8GiB)")
    p.add_argument("--workdir", help="where the checkpoint and the stores are written (default: the system temp "
                                     "dir); the disk measured")
    p.add_argument("--quant", action="append", choices=QUANTS, help="limit to these (default: keep and int4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(a: argparse.Namespace) -> int:
    from ..units import parse_size
    try:
        size = parse_size(a.size)
    except ValueError as e:
        raise UsageError(f"--size {a.size}: {e}") from None
    if size < 64 << 20:
        raise UsageError(f"--size {a.size}: at least 64MiB")
    if a.workdir is not None and not os.path.isdir(a.workdir):
        raise UsageError(f"--workdir {a.workdir}: not a directory")
    log = (lambda msg: None) if getattr(a, "quiet", False) else (
        (lambda msg: print(msg, file=sys.stderr)) if a.json else print)
    d = bench_convert(size, workdir=a.workdir, quants=tuple(a.quant or QUANTS), progress=log)
    d["command"] = "moestream bench convert " + " ".join(sys.argv[3:])
    print(json.dumps(d, indent=2) if a.json else "\n" + format_table(d))
    return 0
