"""Before/after in one sitting for the predictor's prefetch path: each source tree's own
bench/predictor_prefetch.py `run` (the routing model teacher-forced on held-out text, 25 % device
budget, page cache warm), with and without prefetch from the same fitted probes, each run in a
fresh process importing that tree's moestream, trees and systems taking turns; medians.

    git worktree add /tmp/oldtree COMMIT
    .venv/bin/python bench/predictor_prefetch_trees.py --old /tmp/oldtree --new . [--rounds 5]

The probes are fitted once (by the new tree) and given to both; a tree that does not guess the
first layer ignores its probe."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/bench"]
import moestream
assert moestream.__file__.startswith(tree), moestream.__file__
from predictor_prefetch import run
from moestream.bench import routing_model
from moestream.bench.traces import held_out_texts
from moestream.compute.generation import load_tokenizer
from moestream.compute.predictor import NextLayerProbes
store, total = routing_model.ensure_store(progress=False)
with moestream.open(store, device_budget="64MiB") as s:
    ids = load_tokenizer(s).encode(held_out_texts(1)[0]).ids[:int(sys.argv[3])]
pf = sys.argv[2] != "-"
print(json.dumps(run(store, ids, int(total * 0.25), pf, 0.0, NextLayerProbes.load(sys.argv[2]) if pf else None)))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="source tree before the change")
    p.add_argument("--new", default=".", help="source tree after it (default .)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=300)
    a = p.parse_args()
    trees = {"old": str(Path(a.old).resolve()), "new": str(Path(a.new).resolve())}
    from moestream.bench import routing_model
    from moestream.bench.traces import fit_text_probes
    store, _ = routing_model.ensure_store()
    with tempfile.TemporaryDirectory() as tmp:
        probes = Path(tmp) / "probes.npz"
        fit_text_probes(store).save(probes)
        runs: dict = {}
        for _ in range(a.rounds):
            for system, arg in (("no prefetch", "-"), ("prefetch (probes)", str(probes))):
                for name, tree in trees.items():
                    out = subprocess.run([sys.executable, "-c", CHILD, tree, arg, str(a.tokens)],
                                         capture_output=True, text=True, check=True)
                    runs.setdefault((system, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"old {trees['old']}, new {trees['new']}: the routing model, {a.tokens} held-out tokens teacher-forced, "
          f"device budget 25 %, CPU, page cache warm; medians of {a.rounds} runs taking turns")
    keys = list(next(iter(runs.values()))[0])
    print("| system | tree | " + " | ".join(keys) + " |\n|---|---|" + "---:|" * len(keys))
    for (system, name), rs in runs.items():
        print(f"| {system} | {name} | " + " | ".join(f"{statistics.median(r[k] for r in rs):.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
