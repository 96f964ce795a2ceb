"""Routing profiles: what `moestream profile TRACE... -o PROFILE.json` writes and
`moestream convert --profile` reads.

PROFILE.json (UTF-8 JSON object):

    format          "moestream-profile-1"
    layers          [int]            MoE layer ids, sweep order
    num_experts     int              experts per layer
    top_k           int
    tokens          int              token rows in the traces
    traces          [str]            the trace files
    counts          [[int]]          activations per layer position and expert [L][E]
    coverage        {"top_1%": f..}  share of activations taken by the most used 1/5/10/20/50 %
                                     of (layer, expert) pairs
    coverage_curve  [f] * 100        the same at 1 %, 2 %, ... 100 %
    reuse           {layer: {...}}   per layer: distances in steps between consecutive uses of
                                     one expert: median, p90, share at distance 1, histogram by
                                     powers of two ("1", "2", "4", ... upper bounds)
    cross_layer     [f] * (L-1)      for each pair of consecutive layers, the share of layer l+1's
                                     activations that the most frequent successor of the token's
                                     layer-l experts predicts (1 / E-ish for independent layers)
    predictor       only for traces with guesses: the next-layer predictor against the router's
                    real choice, per confidence threshold ("0.3": guesses whose router
                    probability is >= 0.3): precision (share of guesses the router chose),
                    recall (share of the router's choices guessed), guesses per token, overall
                    and per layer
    hot             [[layer, expert, count]]  every pair, most used first"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import FormatError
from .trace import RoutingTrace

PROFILE_FORMAT = "moestream-profile-1"


def coverage_curve(counts: np.ndarray, points: int = 100) -> list[float]:
    """Share of activations taken by the top 1/points, 2/points, ... of the (layer, expert) pairs."""
    c = np.sort(np.asarray(counts, np.float64).reshape(-1))[::-1]
    cum = np.cumsum(c) / max(c.sum(), 1.0)
    return [float(cum[max(1, int(round(i / points * c.size))) - 1]) for i in range(1, points + 1)]


def reuse_distances(trace: RoutingTrace, position: int) -> np.ndarray:
    """Steps between consecutive uses of the same expert at one layer position (all experts)."""
    last: dict[int, int] = {}
    out = []
    for step, experts in zip(trace.step.tolist(), trace.experts[:, position].tolist()):
        for e in set(experts):
            if e in last and step != last[e]:
                out.append(step - last[e])
            last[e] = step
    return np.asarray(out, np.int64)


def cross_layer_predictability(trace: RoutingTrace) -> list[float]:
    """Per consecutive layer pair: the share of next-layer activations hit by guessing, for each
    expert of the token at layer l, its most frequent successor (counted over the whole trace)."""
    e = trace.num_experts
    out = []
    for i in range(len(trace.layers) - 1):
        co = np.zeros((e, e), np.int64)
        a, b = trace.experts[:, i], trace.experts[:, i + 1]
        for j in range(trace.top_k):
            for k in range(trace.top_k):
                np.add.at(co, (a[:, j], b[:, k]), 1)
        best = co.argmax(axis=1)                                       # successor of each expert
        guesses = best[a]                                              # [N, K]
        hit = np.array([[g in set(row) for g in gs] for gs, row in zip(guesses.tolist(), b.tolist())])
        out.append(float(hit.mean()) if hit.size else 0.0)
    return out


PREDICTOR_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def predictor_quality(traces: Sequence[RoutingTrace], thresholds=PREDICTOR_THRESHOLDS) -> Optional[dict[str, Any]]:
    """Precision and recall of the recorded next-layer guesses (see the module docstring)."""
    traces = [t for t in traces if t.predicted is not None]
    if not traces:
        return None
    first = traces[0]

    def score(positions, thr):
        guessed = hit = actual = 0
        for t in traces:
            for i in positions:
                g, a = t.predicted[:, i], t.experts[:, i]
                ok = g >= 0
                if t.confidence is not None:
                    ok &= t.confidence[:, i] >= thr
                rows = (t.predicted[:, i] >= 0).any(axis=1)      # rows where the layer was predicted at all
                actual += int(rows.sum()) * t.top_k
                guessed += int(ok.sum())
                hit += int(sum(len(set(x[m]) & set(y)) for x, m, y in zip(g[rows], ok[rows], a[rows])))
        n = sum(int((t.predicted[:, positions] >= 0).any(axis=(1, 2)).sum()) for t in traces)
        return {"precision": hit / guessed if guessed else None, "recall": hit / actual if actual else None,
                "guesses_per_token": guessed / n if n else 0.0}

    predicted = [i for i in range(len(first.layers)) if any((t.predicted[:, i] >= 0).any() for t in traces)]
    return {f"{thr:g}": {"all": score(predicted, thr),
                         "per_layer": {str(first.layers[i]): score([i], thr) for i in predicted}}
            for thr in thresholds}


def build_profile(traces: Sequence[RoutingTrace], names: Sequence[str] = ()) -> dict[str, Any]:
    """The profile of one or more traces of the same model."""
    if not traces:
        raise ValueError("no traces to profile")
    first = traces[0]
    for t, name in zip(traces[1:], list(names[1:]) + [""] * len(traces)):
        if (t.layers, t.num_experts, t.top_k) != (first.layers, first.num_experts, first.top_k):
            raise FormatError(f"{name or 'trace'}: layers/experts/top-k differ from the first trace's")
    counts = sum(t.counts() for t in traces)
    reuse = {}
    for i, layer in enumerate(first.layers):
        d = np.concatenate([reuse_distances(t, i) for t in traces])
        hist: dict[str, int] = {}
        for v in d.tolist():
            b = 1 << max(0, (v - 1).bit_length())
            hist[str(b)] = hist.get(str(b), 0) + 1
        reuse[str(layer)] = {"uses": int(counts[i].sum()), "reuses": int(d.size),
                             "median": float(np.median(d)) if d.size else None,
                             "p90": float(np.percentile(d, 90)) if d.size else None,
                             "at_1": float((d == 1).mean()) if d.size else 0.0,
                             "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}
    cross = np.mean([cross_layer_predictability(t) for t in traces], axis=0).tolist() if len(first.layers) > 1 else []
    curve = coverage_curve(counts)
    order = np.argsort(-counts.reshape(-1), kind="stable")
    e = first.num_experts
    return {"format": PROFILE_FORMAT, "layers": list(first.layers), "num_experts": e, "top_k": first.top_k,
            "tokens": int(sum(t.tokens for t in traces)), "traces": [str(n) for n in names],
            "counts": counts.tolist(),
            "coverage": {f"top_{p}%": curve[p - 1] for p in (1, 5, 10, 20, 50)}, "coverage_curve": curve,
            "reuse": reuse, "cross_layer": cross, "predictor": predictor_quality(traces),
            "hot": [[int(first.layers[i // e]), int(i % e), int(counts.reshape(-1)[i])] for i in order]}


def save_profile(profile: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the profile whole or not at all (formats/atomic.py)."""
    from .atomic import write_atomic
    write_atomic(path, lambda f: f.write(json.dumps(profile, indent=1).encode()))


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a profile; FormatError naming the file and the field otherwise."""
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a JSON routing profile ({e})") from None
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
        raise FormatError(f"{path}: not a moestream routing profile (format is not {PROFILE_FORMAT!r})")
    try:
        layers, e = [int(x) for x in d["layers"]], int(d["num_experts"])
        hot = [(int(l), int(x), int(c)) for l, x, c in d["hot"]]
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{path}: field {err} is missing or malformed") from None
    if any(l not in layers or not 0 <= x < e or c < 0 for l, x, c in hot):
        raise FormatError(f"{path}: 'hot' names a layer or expert outside the profile's {len(layers)} layers x {e} experts")
    d["layers"], d["num_experts"], d["hot"] = layers, e, hot
    return d


def hot_experts(profile: dict[str, Any], fraction: float) -> set[tuple[int, int]]:
    """The most used `fraction` of the profile's (layer, expert) pairs."""
    n = int(round(fraction * len(profile["layers"]) * profile["num_experts"]))
    return {(l, x) for l, x, _ in profile["hot"][:n]}
