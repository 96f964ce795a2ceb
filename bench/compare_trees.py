"""Before/after in one sitting: the same forced-routing decode with two source trees of moestream
(e.g. a commit checked out with `git worktree add /tmp/old COMMIT`), each in a fresh process
inside one memory cgroup, page cache dropped first, taking turns.

    git worktree add /tmp/oldtree 4833e8e
    sudo .venv/bin/python bench/compare_trees.py --old /tmp/oldtree --new . --rounds 3

Uses the 2-layer store `moestream bench decode --quick` builds (--workdir), its synthetic trace,
a device budget of 25 % of the experts and no host tier, and each tree's own defaults (policy,
compute dtype). Only APIs both trees have: load_model, generate, StreamingMoE.route, store.stats.

With --systems (e.g. naive,lru,best-no-prefetch,best) each tree's own `bench decode` child runs
those systems instead (same store, trace, budget and cgroup limit as `bench decode`, the int8 and
int4 systems on their own stores; --layers picks the store), taking turns tree by tree and system
by system:

    sudo .venv/bin/python bench/compare_trees.py --old /tmp/oldtree --new . --systems naive,lru,best --layers 4

Each tree first runs once uncounted (per kind of store with --systems), so that neither pays
the compile of its Numba kernels inside a timed round."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from moestream.compute.loader import load_model
from moestream.compute.models.common import StreamingMoE
trace = np.load(sys.argv[2]); budget = int(sys.argv[3])
m = load_model(sys.argv[4], device_budget=budget, host_budget=0)
clock = {"s": 0, "n": 1}
for i, moe in enumerate(x for x in m.modules() if isinstance(x, StreamingMoE)):
    def route(h, logits=None, i=i):      # trees since 2026-12-07 pass the router's logits when they have them
        rows = torch.as_tensor(trace[clock["s"]:clock["s"] + clock["n"], i])
        return torch.full(rows.shape, 1 / rows.shape[1], dtype=h.dtype), rows
    moe.route = route
snap = {}
def hook(mod, args):
    clock["s"], clock["n"] = (int(args[2]) if len(args) > 2 else 0), int(args[0].shape[1])
    if clock["n"] == 1 and not snap:
        snap.update(m.store.stats())
m.register_forward_pre_hook(hook)
t = {}
m.generate(torch.arange(3, 11).reshape(1, 8), 64, timings=t)
st = m.store.stats()
print(json.dumps({"tokens_per_s": (t["decode_tokens"] - 1) / t["decode_seconds"], "hits_l1": st["hits_l1"] - snap["hits_l1"],
                  "requests": st["requests"] - snap["requests"], "stall_seconds": st["stall_seconds"] - snap["stall_seconds"],
                  "mib_read": (st["bytes_read"] - snap["bytes_read"]) / 2**20,
                  "peak_rss_mib": [int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True)
    p.add_argument("--new", default=".")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--no-limit", action="store_true", help="no memory cgroup (speed only)")
    p.add_argument("--systems", help="comma-separated `bench decode` systems, run by each tree's own bench child")
    p.add_argument("--layers", type=int, default=2, help="with --systems: the store's decoder layers (2 or 4)")
    a = p.parse_args()
    if a.systems:
        return compare_systems(a)
    import numpy as np
    from moestream.bench.decode import GiB, SHAPE, build_store, synthetic_trace
    from moestream.bench.io import drop_page_cache
    from moestream.formats import StoreReader
    work = Path(a.workdir) / "moestream-bench-decode"
    work.mkdir(parents=True, exist_ok=True)
    _, store = build_store(work, 2, print)
    with StoreReader(store) as r:
        budget = sum(x.decoded_length for x in r.index.extents.values()) // 4
    tmp = Path(tempfile.mkdtemp())
    np.save(tmp / "trace.npy", synthetic_trace(8 + 64 + 2, 2, experts=SHAPE["experts"], top_k=SHAPE["top_k"]))
    (tmp / "child.py").write_text(CHILD)
    cg = Path("/sys/fs/cgroup/memory") / f"moestream-compare-{os.getpid()}"
    use_cg = os.geteuid() == 0 and cg.parent.is_dir() and not a.no_limit
    if use_cg:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(budget + GiB))
    rows: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        # round 0 is a warm-up, not counted: each tree's first process compiles its kernels into
        # Numba's cache (the old tree's first run gave 7.5 tok/s against 74-86 after it, 2026-12-06)
        for rnd in range(-1, a.rounds):
            for name, tree in (("old", a.old), ("new", a.new)):
                drop_page_cache()
                out = subprocess.run([sys.executable, str(tmp / "child.py"), str(Path(tree).resolve()), str(tmp / "trace.npy"),
                                      str(budget), str(store)], capture_output=True, text=True,
                                     preexec_fn=(lambda: (cg / "cgroup.procs").write_text(str(os.getpid()))) if use_cg else None)
                if out.returncode == 0:
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                elif out.returncode == -9 and use_cg:
                    r = {"error": f"killed by the {(budget + GiB) >> 20} MiB memory limit"}
                else:
                    r = {"error": f"exit {out.returncode}: {out.stderr[-300:]}"}
                if rnd < 0:
                    print(f"warm-up {name}: {r}", flush=True)
                    continue
                rows[name].append(r)
                print(f"round {rnd + 1} {name}: {r}", flush=True)
    finally:
        if use_cg:
            cg.rmdir()
    for name, rs in rows.items():
        ok = sorted(r["tokens_per_s"] for r in rs if "error" not in r)
        if ok:
            print(f"{name} ({a.old if name == 'old' else a.new}): median {ok[(len(ok) - 1) // 2]:.2f} tok/s of "
                  f"{', '.join(f'{x:.2f}' for x in ok)}")


def compare_systems(a: argparse.Namespace) -> None:
    import statistics
    from moestream.bench import decode as D
    work = Path(a.workdir) / "moestream-bench-decode"
    work.mkdir(parents=True, exist_ok=True)
    base, expert_bytes = D.common_spec(work, a.layers)
    budget = expert_bytes // 4
    quant_store: dict[str, tuple[str, int]] = {}     # int8/int4: the store bench decode builds, its extent bytes
    for q in sorted({D.SYSTEM_QUANT[x] for x in a.systems.split(",") if x in D.SYSTEM_QUANT}):
        from moestream.formats.reader import StoreReader
        qs = D.build_store(work, a.layers, print, base["shape"], quant=q)[1]
        with StoreReader(qs) as r:
            quant_store[q] = (str(qs), max(x.padded_length for x in r.index.extents.values()))

    def spec_of(system: str) -> dict:
        # as bench decode's own_spec: a quantized system runs its own store and dense type
        spec = D.system_spec(base, system, budget)
        if system in D.BOUNDS + D.QUANT_BOUNDS:     # every expert in memory, as bench decode runs them
            spec.update(device_budget=D.resident_budget(expert_bytes, base["extent_bytes"]))
        if system in D.SYSTEM_QUANT:
            store, extent = quant_store[D.SYSTEM_QUANT[system]]
            spec.update(store=store, extent_bytes=extent, dense_quant=D.SYSTEM_DENSE_QUANT.get(system, "auto"))
        return spec
    limit = None if a.no_limit or not D.cgroup_available()[0] else budget + D.GiB
    rows: dict[tuple[str, str], list[float]] = {}
    for name, tree in (("old", a.old), ("new", a.new)):     # as bench decode: compiles, not counted
        for system in D.warm_up_systems(a.systems.split(",")):
            r = D.run_child(dict(spec_of(system), tokens=D.WARM_UP_TOKENS), None, tree=tree)   # resident: no limit
            print(f"warm-up {name} {system}: " + r.get("error", "done"), flush=True)
    for rnd in range(a.rounds):
        for name, tree in (("old", a.old), ("new", a.new)):
            for system in a.systems.split(","):
                bound = system in D.BOUNDS + D.QUANT_BOUNDS       # no limit: they need every expert
                r = D.run_child(spec_of(system), None if bound else limit, tree=tree)
                if "error" not in r:
                    rows.setdefault((name, system), []).append(r["tokens_per_s"])
                print(f"round {rnd + 1} {name} {system}: " + (r["error"] if "error" in r else
                      f"{r['tokens_per_s']:.2f} tok/s, stall {r['stall_seconds']:.2f} s, {r['hits_l1']} hits, "
                      f"{r['bytes_read'] / 2**20:.0f} MiB read"), flush=True)
    for (name, system), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{system:17s} {name}: median {statistics.median(v):.2f} tok/s of {', '.join(f'{x:.2f}' for x in v)}")


if __name__ == "__main__":
    main()
