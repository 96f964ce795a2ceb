"""Pictures of routing traces: a per-layer expert heat map (`moestream profile --plot`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..formats.trace import RoutingTrace


def plot_heat_map(traces: Sequence[RoutingTrace], path: str, title: str = "") -> np.ndarray:
    """Write a PNG: for each layer (rows) the share of its activations each expert took
    (columns, by expert id, left panel) and the same shares sorted, most used first (right panel:
    how skewed each layer is, which decides what a cache of a given size can hold). Returns the
    shares drawn, float [L, E]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = sum(t.counts() for t in traces).astype(np.float64)          # [L, E]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    layers = traces[0].layers
    fig, (by_id, ranked) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.35 * len(layers)), sharey=True)
    top = float(share.max()) or 1.0
    for ax, data, xlabel in ((by_id, share, "expert"), (ranked, -np.sort(-share, axis=1), "experts, most used first")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=top)
        ax.set_xlabel(xlabel)
    by_id.set_yticks(range(len(layers)), [str(l) for l in layers])
    by_id.set_ylabel("layer")
    tokens = sum(t.experts.shape[0] for t in traces)
    fig.suptitle(f"{title}{' - ' if title else ''}{tokens} token rows, top-{traces[0].top_k} of "
                 f"{traces[0].num_experts} experts: share of each layer's activations", fontsize=9)
    fig.colorbar(im, ax=[by_id, ranked], fraction=0.03)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return share
