"""Decode steps of B sequences at once (CausalLM.decode_batch: what `moestream serve` runs per
step), every expert resident: aggregate tokens/s for each batch size. Run it with two source trees
in turn for a before/after (PYTHONPATH=/tmp/old ...), the same store, the same machine.

    .venv/bin/python bench/batch_decode.py STORE [--batches 1,2,4,8] [--steps 32] [--rounds 3]

Each sequence gets its own random prompt of 8-15 tokens (prefilled one by one, not timed), then
`--steps` decode steps of the whole batch feeding each sequence a new random token (as llama-bench
and `bench decode` do); the figure is tokens produced per second of decode steps, the median of
`--rounds` (all batch sizes take turns in each round)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import moestream
from moestream.bench.decode import load_every_expert


def step_rate(model, batch: int, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    lengths = [8 + (seed + i) % 8 for i in range(batch)]
    caches = [model.new_cache(max(lengths) + steps + 1) for _ in range(batch)]
    with torch.no_grad():
        for n, cache in zip(lengths, caches):
            model(torch.randint(0, model.cfg.vocab_size, (1, n), generator=g), cache, 0)
    positions = list(lengths)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = torch.randint(0, model.cfg.vocab_size, (batch,), generator=g).tolist()
        model.decode_batch(tokens, caches, positions)
        positions = [p + 1 for p in positions]
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    model = moestream.load_model(a.store, host_budget=0, device_budget="8GiB")
    load_every_expert(model.store)                        # every expert resident before timing
    step_rate(model, max(batches), 4, seed=99)            # compile and warm
    rates: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(a.rounds):
        for b in batches:
            rates[b].append(step_rate(model, b, a.steps, seed=r))
    print(f"{a.store} (moestream from {moestream.__file__.rsplit('/', 2)[0]}; {torch.get_num_threads()} threads)")
    for b in batches:
        print(f"  batch {b}: {statistics.median(rates[b]):7.1f} tok/s  ({', '.join(f'{x:.1f}' for x in rates[b])})")
    model.store.close()


if __name__ == "__main__":
    main()
