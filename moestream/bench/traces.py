"""Routing traces for the cache benchmarks: recorded from the trained routing model reading
held-out text, and synthetic ones calibrated to them for the shapes of large models.

The synthetic generator has three knobs, each matching one statistic of a profile
(formats/profile.py):
- skew: expert popularity per layer is Zipf(skew) over a random permutation (coverage curve);
- reuse: each expert of the previous token at that layer is kept with this chance (the share
  of reuses at distance 1);
- cross: each expert is, with this chance, the fixed partner of one of the token's experts at
  the layer before (cross-layer predictability: how often the most frequent successor is right).
`calibrate` fits the three on a profile by a grid search at the profile's own shape; the same
values then generate traces of any shape (e.g. 48 layers x 128 experts, top-8)."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..formats.profile import build_profile
from ..formats.trace import RoutingTrace


#: `calibrate` on the trained routing model's four held-out traces (build/profile-heldout.json;
#: bench/results/bench_cache_8L_dev_2026-11-23.json, "synthetic_parameters"): what `bench decode`
#: replays at Qwen3-30B-A3B's shape.
CALIBRATED = {"skew": 1.6, "reuse": 0.1, "cross": 0.15}
#: Accuracy of the simulated next-layer predictor's top-k (`simulated_guess`): the published
#: one-layer-ahead figures (82.6 % for a linear probe) and what fitted probes reach on the routing
#: model (87.0 %, docs/CACHING.md). `bench decode` prefetches with it, `bench cache` guesses
#: synthetic traces' layers.
PREFETCH_ACCURACY = 0.85
#: Chance that one more guess beyond the top-k names an expert the top-k missed: on the routing
#: model the probes' third guess catches 62 % of what their top-2 miss one layer ahead (87.0 % ->
#: 95.1 %), 55 % for the first layer's guess from the embedding (86.7 % -> 94 %; docs/CACHING.md).
#: Measured on 32 experts, top-2: for a top-8 model of 128 experts it is an assumption
EXTRA_RECALL = 0.6


def synthetic_trace(tokens: int, layers: int, experts: int, top_k: int, *, skew: float = 1.0, reuse: float = 0.3,
                    cross: float = 0.0, seed: int = 0) -> RoutingTrace:
    """A decode trace (one token per step) drawn as the module docstring says."""
    if top_k > experts:
        raise ValueError(f"top_k={top_k} exceeds experts={experts}")
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, experts + 1) ** skew
    perm = [rng.permutation(experts) for _ in range(layers)]
    probs = np.zeros((layers, experts))
    for l in range(layers):
        probs[l, perm[l]] = pop / pop.sum()
    partner = [rng.permutation(experts) for _ in range(layers)]     # expert at l-1 -> its partner at l
    out = np.zeros((tokens, layers, top_k), np.int64)
    for t in range(tokens):
        for l in range(layers):
            chosen: list[int] = []
            if t:
                chosen = [int(e) for e in out[t - 1, l] if rng.random() < reuse]
            if l:
                for e in out[t, l - 1]:
                    p = int(partner[l][e])
                    if len(chosen) < top_k and p not in chosen and rng.random() < cross:
                        chosen.append(p)
            if len(chosen) < top_k:
                p = probs[l].copy()
                p[chosen] = 0.0
                chosen += rng.choice(experts, size=top_k - len(chosen), replace=False, p=p / p.sum()).tolist()
            out[t, l] = chosen
    weights = np.full(out.shape, 1.0 / top_k, np.float32)
    return RoutingTrace(tuple(range(layers)), experts, np.arange(tokens), out, weights, None,
                        {"synthetic": {"skew": skew, "reuse": reuse, "cross": cross, "seed": seed}})


def simulated_guess(truth: Sequence[int], experts: int, accuracy: float, rng, width: Optional[int] = None,
                    extra_recall: float = EXTRA_RECALL) -> list[int]:
    """A predictor's guess of `truth` (one token's experts at one layer), `width` experts (default
    len(truth)), most likely first: the first len(truth) each right with chance `accuracy`,
    otherwise an expert it did not choose; each further one, with chance `extra_recall`, an
    expert the first ones missed (while one is left), otherwise another it did not choose. No
    expert twice. `rng`: a random.Random or anything with .random() and .choice()."""
    truth = [int(e) for e in truth]
    width = len(truth) if width is None else width
    guess: list[int] = []
    missed: list[int] = []

    def other() -> Optional[int]:
        left = [o for o in range(experts) if o not in truth and o not in guess]
        return rng.choice(left) if left else None
    for e in truth[:width]:
        g = e if rng.random() < accuracy else other()
        if g is None:
            g = e
        if g != e:
            missed.append(e)
        guess.append(g)
    while len(guess) < min(width, experts):
        if missed and rng.random() < extra_recall:
            guess.append(missed.pop(0))
            continue
        g = other()
        guess.append(g if g is not None else missed.pop(0))
    return guess


def with_simulated_guesses(trace: RoutingTrace, accuracy: float = PREFETCH_ACCURACY, seed: int = 0,
                           width: Optional[int] = None) -> RoutingTrace:
    """`trace` with the guesses of a simulated predictor (`simulated_guess`, `width` experts,
    default the top-k) recorded for every layer, the first included (the forward guesses it from
    the token's embedding)."""
    import random
    rng = random.Random(seed)
    width = trace.top_k if width is None else width
    pred = np.full(trace.experts.shape[:2] + (min(width, trace.num_experts),), -1, np.int64)
    for t in range(trace.tokens):
        for i in range(len(trace.layers)):
            pred[t, i] = simulated_guess(trace.experts[t, i].tolist(), trace.num_experts, accuracy, rng, width)
    meta = dict(trace.meta, simulated_guesses={"accuracy": accuracy, "width": int(pred.shape[2]),
                                               "extra_recall": EXTRA_RECALL, "seed": seed})
    return dataclasses.replace(trace, predicted=pred, confidence=None, meta=meta)


def trace_statistics(profile: dict[str, Any]) -> np.ndarray:
    """The statistics calibration matches: top-10 % and top-20 % coverage, the mean share of
    reuses at distance 1, the mean cross-layer predictability."""
    at1 = np.mean([r["at_1"] for r in profile["reuse"].values()])
    cross = np.mean(profile["cross_layer"]) if profile["cross_layer"] else 0.0
    return np.array([profile["coverage"]["top_10%"], profile["coverage"]["top_20%"], at1, cross])


def calibrate(profile: dict[str, Any], *, tokens: int = 300, seed: int = 0) -> dict[str, float]:
    """skew, reuse and cross whose synthetic traces at the profile's shape come closest to its
    statistics (grid search; a few seconds)."""
    layers, experts, k = len(profile["layers"]), profile["num_experts"], profile["top_k"]
    target = trace_statistics(profile)
    best: Optional[tuple[float, dict[str, float]]] = None
    for skew, reuse, cross in itertools.product((0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0), (0.0, 0.1, 0.2, 0.3, 0.45),
                                                (0.0, 0.15, 0.3, 0.5)):
        t = synthetic_trace(tokens, layers, experts, k, skew=skew, reuse=reuse, cross=cross, seed=seed)
        err = float(np.abs(trace_statistics(build_profile([t])) - target).sum())
        if best is None or err < best[0]:
            best = (err, {"skew": skew, "reuse": reuse, "cross": cross, "error": err})
    assert best is not None
    return best[1]


def record_text_trace(store: str | Path, texts: Sequence[str], *, tokens_per_text: int = 256,
                      device_budget: str | int = "1GiB", predictor=None, extra_guesses: int = 0) -> RoutingTrace:
    """The routing of the store's model reading `texts` token by token (teacher-forced decode:
    one token per step, KV cache kept), with the predictor's guesses of top-k + `extra_guesses`
    experts (its routers', or those of `predictor`: next-layer probes, compute/predictor.py)."""
    import torch
    from ..compute.generation import load_tokenizer
    from ..compute.loader import load_model
    from ..compute.models.common import KVCache
    from ..compute.routing import RoutingRecorder
    model = load_model(store, device_budget=device_budget, host_budget=0, predictor=predictor,
                       extra_guesses=extra_guesses)
    try:
        tok = load_tokenizer(model)
        rec = RoutingRecorder(model.store.index.moe_layers, model.cfg.num_experts, model.cfg.top_k)
        model.record_routing(rec)
        with torch.no_grad():
            for text in texts:
                ids = tok.encode(text).ids[:tokens_per_text]
                cache = KVCache(model.cfg.num_layers, 1, model.cfg.num_kv_heads, len(ids), model.cfg.head_dim,
                                model.embed_tokens.weight.dtype, "cpu")
                for pos, i in enumerate(ids):
                    model(torch.tensor([[i]]), cache, pos)
        return rec.trace({"store": str(store), "source": "teacher-forced held-out text", "texts": len(texts),
                          "tokens_per_text": tokens_per_text})
    finally:
        model.store.close()


def fit_text_probes(store: str | Path, tokens: int = 80000, width: Optional[int] = None):
    """Next-layer probes for the routing model, fitted on `tokens` tokens of its training text
    (every 7th training file, none of the held-out ones); `width` hidden units (default
    DEFAULT_PROBE_WIDTH; 0: linear)."""
    from ..compute.generation import load_tokenizer
    from ..compute.loader import load_model
    from ..compute.predictor import DEFAULT_PROBE_WIDTH, fit_probes, token_batches
    from .routing_model import TRAIN, corpus_text
    train, _ = corpus_text(TRAIN["corpus_bytes"], TRAIN["held_out_files"])
    model = load_model(store, device_budget="64MiB")
    try:
        return fit_probes(model, token_batches(load_tokenizer(model), train[::7], tokens=tokens),
                          width=DEFAULT_PROBE_WIDTH if width is None else width)
    finally:
        model.store.close()


def held_out_texts(n: int) -> list[str]:
    """`n` of the routing model's held-out standard-library files (never trained on)."""
    from .routing_model import TRAIN, corpus_text
    _, test = corpus_text(TRAIN["corpus_bytes"], TRAIN["held_out_files"])
    return [t for t in test if len(t) > 4000][:n]
