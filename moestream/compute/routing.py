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
        self._steps: list[list] = []    # per step: rows, experts, weights, predicted, confidence (None: no guess yet)
        self._rows = 0
        self._width: Optional[int] = None   # experts per guess, once one is made

    def start_step(self, rows: int) -> None:
        """A forward call over `rows` token rows (batch x tokens) begins."""
        shape = (rows, len(self.layers), self.top_k)
        # the guesses' arrays are made by the first guess of the step: their width is the predictor's
        self._steps.append([rows, np.zeros(shape, np.int16), np.zeros(shape, np.float16), None, None])

    def record(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """The router of `layer` chose experts [N, K] with weights [N, K] for this step's rows."""
        e, w = self._steps[-1][1:3]
        i = self._pos[layer]
        e[:, i] = experts.cpu().numpy()
        w[:, i] = weights.float().cpu().numpy()

    def predict(self, layer: int, experts: torch.Tensor, probs: torch.Tensor) -> None:
        """The predictor guessed experts [N, G] for `layer` before it ran, most likely first, with
        their predicted probabilities probs [N, G]. G (the predictor's width) is the same for
        every guess of a recording."""
        g = int(experts.shape[1])
        if self._width is None:
            self._width = g
        elif g != self._width:
            raise ValueError(f"guess of layer {layer}: {g} experts, earlier guesses named {self._width}")
        step = self._steps[-1]
        if step[3] is None:
            shape = (step[0], len(self.layers), g)
            step[3], step[4] = np.full(shape, -1, np.int16), np.zeros(shape, np.float16)
        i = self._pos[layer]
        step[3][:, i] = experts.cpu().numpy()
        step[4][:, i] = probs.float().cpu().numpy()

    def trace(self, meta: Optional[dict[str, Any]] = None) -> RoutingTrace:
        """Everything recorded so far as a RoutingTrace."""
        if not self._steps:
            shape = (0, len(self.layers), self.top_k)
            return RoutingTrace(self.layers, self.num_experts, np.zeros(0, np.int64), np.zeros(shape, np.int64),
                                np.zeros(shape, np.float32), None, dict(meta or {}))
        step = np.concatenate([np.full(rows, i, np.int64) for i, (rows, *_) in enumerate(self._steps)])
        experts, weights = (np.concatenate([s[j] for s in self._steps]) for j in (1, 2))
        if self._width is None:
            return RoutingTrace(self.layers, self.num_experts, step, experts.astype(np.int64), weights.astype(np.float32),
                                None, dict(meta or {}))
        none = lambda rows, fill, dtype: np.full((rows, len(self.layers), self._width), fill, dtype)
        predicted = np.concatenate([s[3] if s[3] is not None else none(s[0], -1, np.int16) for s in self._steps])
        confidence = np.concatenate([s[4] if s[4] is not None else none(s[0], 0, np.float16) for s in self._steps])
        return RoutingTrace(self.layers, self.num_experts, step, experts.astype(np.int64), weights.astype(np.float32),
                            predicted.astype(np.int64), dict(meta or {}), confidence.astype(np.float32))
