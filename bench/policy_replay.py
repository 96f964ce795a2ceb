"""Hit counts of the eviction policies (the Store's own TierCache objects) replayed on routing
sequences, against Belady's offline optimum. No I/O: the policy alone.

    .venv/bin/python bench/policy_replay.py --workdir /work

Sequences: the routing of a 600-token greedy run of a random Mixtral-style model (4 layers x 8
experts, top-2; the store bench/rss_long_run.py builds), 8 slots; synthetic Zipf traces
(moestream.bench.decode.synthetic_trace) of 2 layers (64 slots, 25 %) and 4 layers (51 slots,
10 %) x 128 experts, top-8. A precursor of the routing issue's `bench cache`."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moestream.bench.decode import synthetic_trace
from moestream.storage.cache import POLICIES, TierCache


def replay(seq, layers, slots, policy) -> int:
    """Hits of `policy` with `slots` experts on seq [(layer, chosen experts)], as the forward
    drives the Store: note the routing, then ask for each expert (served ones are not pinned)."""
    c = TierCache("device", slots, policy, sweep=layers)
    hits = 0
    for layer, chosen in seq:
        c.visit(layer, [(layer, e) for e in chosen])
        for e in chosen:
            if c.get((layer, e)) is not None:
                hits += 1
            else:
                if c.used + 1 > c.budget:
                    c.pop(c.victim())
                c.put((layer, e), True, 1)
    return hits


def belady(seq, slots) -> int:
    acc = [(l, e) for l, chosen in seq for e in chosen]
    nxt: dict = {}
    future = [0] * len(acc)
    for i in range(len(acc) - 1, -1, -1):
        future[i] = nxt.get(acc[i], 1 << 62)
        nxt[acc[i]] = i
    cache: dict = {}
    hits = 0
    for i, k in enumerate(acc):
        if k in cache:
            hits += 1
        elif len(cache) >= slots:
            del cache[max(cache, key=cache.get)]
        cache[k] = future[i]
    return hits


def greedy_routing(workdir: Path, tokens: int):
    import moestream
    from moestream.compute import load_model
    from moestream.demo import build_checkpoint
    ckpt, store = workdir / "moestream-rss-long-run" / "ckpt", workdir / "moestream-rss-long-run" / "store"
    if not (ckpt / "config.json").exists():
        build_checkpoint("mixtral", ckpt, hidden_size=256, moe_intermediate_size=512, num_hidden_layers=4,
                         vocab_size=512, max_position_embeddings=4096)
    if not store.exists():
        moestream.convert(ckpt, store, progress=False)
    model = load_model(store, device_budget="64MiB", host_budget=0)
    log = []
    real = model.store.note_routing
    model.store.note_routing = lambda layer, experts: (log.append((layer, tuple(experts))), real(layer, experts))[1]
    model.generate(torch.tensor([[1, 5, 9, 13]]), tokens)
    model.store.close()
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp")
    a = p.parse_args()
    t2 = synthetic_trace(308, 2, experts=128, top_k=8)
    t4 = synthetic_trace(300, 4, experts=128, top_k=8, seed=5)
    seqs = {"greedy run of a random model, 4L x 8, 8 slots": (greedy_routing(Path(a.workdir), 600), [0, 1, 2, 3], 8),
            "synthetic 2L x 128, 64 slots (25 %)": ([(l, tuple(t2[i, l].tolist())) for i in range(len(t2)) for l in range(2)],
                                                    [0, 1], 64),
            "synthetic 4L x 128, 51 slots (10 %)": ([(l, tuple(t4[i, l].tolist())) for i in range(len(t4)) for l in range(4)],
                                                    [0, 1, 2, 3], 51)}
    print(f"| sequence | requests | {' | '.join(POLICIES)} | Belady |\n|---|---:|" + "---:|" * (len(POLICIES) + 1))
    for name, (seq, layers, slots) in seqs.items():
        n = sum(len(c) for _, c in seq)
        cells = [f"{replay(seq, layers, slots, pol) / n:.1%}" for pol in POLICIES] + [f"{belady(seq, slots) / n:.1%}"]
        print(f"| {name} | {n} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
