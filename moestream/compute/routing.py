"""Recording a model's routing as it runs (`moestream generate --trace FILE`)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..formats.trace import RoutingTrace


class RoutingRecorder:
    """Collects, per forward call (a step), each MoE layer's top-k experts and weights per token
    row, and the next-layer predictor's guesses. Attach with `CausalLM.record_routing`."""

    def __init__(self, layers: tuple[int, ...], num_experts: int, top_k: int):
        self.layers, self.num_experts, self.top_k = tuple(layers), num_experts, top_k
        self._pos = {layer: i for i, layer in enumerate(self.layers)}
        self._steps: list[tuple] = []   # per step: rows, experts, weights, predicted, confidence
        self._rows = 0

    def start_step(self, rows: int) -> None:
        """A forward call over `rows` token rows (batch x tokens) begins."""
        shape = (rows, len(self.layers), self.top_k)
        self._steps.append((rows, np.zeros(shape, np.int16), np.zeros(shape, np.float16), np.full(shape, -1, np.int16),
                            np.zeros(shape, np.float16)))

    def record(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """The router of `layer` chose experts [N, K] with weights [N, K] for this step's rows."""
        e, w = self._steps[-1][1:3]
        i = self._pos[layer]
        e[:, i] = experts.cpu().numpy()
        w[:, i] = weights.float().cpu().numpy()

    def predict(self, layer: int, experts: torch.Tensor, probs: torch.Tensor) -> None:
        """The predictor guessed experts [N, K] for `layer` one layer ahead, with router
        probabilities probs [N, K]."""
        i = self._pos[layer]
        self._steps[-1][3][:, i] = experts.cpu().numpy()
        self._steps[-1][4][:, i] = probs.float().cpu().numpy()

    def trace(self, meta: Optional[dict[str, Any]] = None) -> RoutingTrace:
        """Everything recorded so far as a RoutingTrace."""
        if not self._steps:
            shape = (0, len(self.layers), self.top_k)
            return RoutingTrace(self.layers, self.num_experts, np.zeros(0, np.int64), np.zeros(shape, np.int64),
                                np.zeros(shape, np.float32), None, dict(meta or {}))
        step = np.concatenate([np.full(rows, i, np.int64) for i, (rows, *_) in enumerate(self._steps)])
        experts, weights, predicted, confidence = (np.concatenate([s[j] for s in self._steps]) for j in (1, 2, 3, 4))
        guessed = bool((predicted >= 0).any())
        return RoutingTrace(self.layers, self.num_experts, step, experts.astype(np.int64), weights.astype(np.float32),
                            predicted.astype(np.int64) if guessed else None, dict(meta or {}),
                            confidence.astype(np.float32) if guessed else None)
