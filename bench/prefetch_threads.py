"""Whether Numba's threads should follow ComputeThreads (one core left to the store while its
prefetches are in flight, as torch's count does) or keep every core, as they do: `bench decode`'s
system (default `best`: bf16, next-use, prefetch from the simulated
85 %-accurate predictor) at a budget of 25 % of the experts, each run in a fresh process, the two
taking turns (ABBA), no memory limit (speed only; reads are O_DIRECT, so the page cache plays no
part). Uses the store and trace `moestream bench decode --quick --workdir DIR` built.

    .venv/bin/python bench/prefetch_threads.py --workdir /tmp/bd [--system best] [--rounds 6]"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys
from pathlib import Path
from moestream.bench import decode as D
from moestream.compute import threads
from moestream.formats.reader import StoreReader
work, system, follow = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if follow:              # Numba's count set as torch's is (moestream leaves Numba's alone)
    import numba
    torch_part, full = threads.ComputeThreads.adjust, numba.get_num_threads()
    def adjust(self, store_busy):
        torch_part(self, store_busy)
        n = max(1, full - 1) if store_busy else full
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
    threads.ComputeThreads.adjust = adjust
base, expert_bytes = D.common_spec(work, 2, log=lambda *a: None)
spec = D.system_spec(base, system, int(0.25 * expert_bytes))
q = D.SYSTEM_QUANT.get(system)
if q:
    with StoreReader(work / f"qwen3moe-2L-{q}.moe") as r:
        ext = list(r.index.extents.values())
    spec = dict(spec, store=str(work / f"qwen3moe-2L-{q}.moe"), extent_bytes=max(x.padded_length for x in ext),
                dense_quant=D.SYSTEM_DENSE_QUANT.get(system, "auto"))
r = D.run_system(spec)
print(json.dumps({k: r[k] for k in ("tokens_per_s", "hits_l1", "stall_seconds", "expert_matmul_seconds", "bytes_read")}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="bench decode's --workdir (its store and trace)")
    p.add_argument("--system", default="best")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    work = Path(a.workdir) / "moestream-bench-decode"
    if not (work / "qwen3moe-2L.moe").exists():
        sys.exit(f"{work}: no 2-layer store; run `moestream bench decode --quick --workdir {a.workdir}` first")
    names = {"1": "Numba follows", "0": "Numba keeps all"}
    got: dict[str, list[float]] = {"1": [], "0": []}
    for r in range(a.rounds):
        for follow in ("1", "0") if r % 2 == 0 else ("0", "1"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(work), a.system, follow], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            got[follow].append(res["tokens_per_s"])
            print(f"round {r + 1} {names[follow]:>15}: {res['tokens_per_s']:6.2f} tok/s, {res['hits_l1']} hits, "
                  f"stall {res['stall_seconds']:.2f} s, matmul {res['expert_matmul_seconds']:.2f} s, "
                  f"{res['bytes_read'] / 2**20:.0f} MiB read", flush=True)
    wins = sum(f > k for f, k in zip(got["1"], got["0"]))
    for follow in ("1", "0"):
        v = got[follow]
        print(f"{names[follow]:>15}: median {statistics.median(v):.2f} tok/s ({min(v):.2f}-{max(v):.2f})")
    print(f"Numba following faster in {wins} of {a.rounds} rounds")


if __name__ == "__main__":
    main()
