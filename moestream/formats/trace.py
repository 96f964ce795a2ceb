"""Routing traces: which experts each token was routed to, layer by layer, as recorded by
`moestream generate --trace FILE` or made by the synthetic generator (moestream.bench.traces).

A trace file is a NumPy .npz archive (compressed) with these arrays:

    format        uint8 [len("moestream-trace-1")]  the ASCII bytes of TRACE_FORMAT
    layers        int32 [L]        the MoE layer ids in the order a forward visits them
    step          int32 [N]        the forward call each token row belongs to (a prefill's rows
                                   share one step; each decode step is one row per sequence)
    experts       int16 [N, L, K]  the router's top-k experts of each token row at each layer
    weights       float16 [N, L, K] their routing weights
    predicted     int16 [N, L, G]  optional: the predictor's guess of that layer's experts, made
                                   before the layer runs (one layer earlier; the first layer's
                                   from the token's embedding), most likely first: G experts
                                   (the predictor's width: K, or more with generate
                                   --extra-guesses); -1 where none was made
    confidence    float16 [N, L, G] with predicted: the predicted probability of each guess
    meta          uint8 [...]      optional: UTF-8 JSON (store, prompt tokens, sampler...)

2 bytes per (token, layer, expert) for the ids, 2 for the weights: a 1000-token trace of a
94-layer top-8 model is 3 MB before compression."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import FormatError
from .npz import save_npz_atomic

TRACE_FORMAT = "moestream-trace-1"


@dataclass(frozen=True)
class RoutingTrace:
    """One routing trace. Arrays as in the module docstring; `num_experts` experts per layer."""
    layers: tuple[int, ...]
    num_experts: int
    step: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    predicted: Optional[np.ndarray] = None
    meta: dict[str, Any] = field(default_factory=dict)
    confidence: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = len(self.step)
        if self.experts.ndim != 3 or self.experts.shape[:2] != (n, len(self.layers)):
            raise FormatError(f"trace: experts has shape {self.experts.shape}, expected [{n}, {len(self.layers)}, K]")
        if self.weights.shape != self.experts.shape:
            raise FormatError(f"trace: weights has shape {self.weights.shape}, experts {self.experts.shape}")
        if self.predicted is not None:
            p = self.predicted
            if p.ndim != 3 or p.shape[:2] != self.experts.shape[:2] or p.shape[2] < 1:
                raise FormatError(f"trace: predicted has shape {p.shape}, expected [{n}, {len(self.layers)}, G]")
            if n and (p.min() < -1 or p.max() >= self.num_experts):
                raise FormatError(f"trace: guessed expert ids outside -1..{self.num_experts - 1}")
        if self.confidence is not None and (self.predicted is None or self.confidence.shape != self.predicted.shape):
            raise FormatError("trace: confidence needs predicted of the same shape")
        if n and (self.experts.min() < 0 or self.experts.max() >= self.num_experts):
            raise FormatError(f"trace: expert ids outside 0..{self.num_experts - 1}")
        if n and np.any(np.diff(self.step) < 0):
            raise FormatError("trace: steps are not in order")

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def tokens(self) -> int:
        return int(len(self.step))

    @property
    def guess_width(self) -> int:
        """Experts each recorded guess names (0 without guesses)."""
        return 0 if self.predicted is None else int(self.predicted.shape[2])

    def narrowed(self, width: int) -> "RoutingTrace":
        """This trace with each guess cut to its `width` most likely experts: what a predictor of
        that width would have guessed (guesses are recorded most likely first)."""
        if self.predicted is None or width >= self.guess_width:
            return self
        if width < 1:
            raise ValueError(f"guess width {width}: must be at least 1")
        conf = None if self.confidence is None else self.confidence[:, :, :width]
        return dataclasses.replace(self, predicted=self.predicted[:, :, :width], confidence=conf)

    def requests(self, threshold: float = 0.0) -> Iterator[tuple[int, list[int], Optional[list[int]]]]:
        """What a Store is asked, in order: (layer, sorted experts routed by any row of the
        step, experts the predictor guessed for it with confidence >= `threshold`, or None),
        step by step, layer by layer."""
        bounds = np.flatnonzero(np.diff(self.step)) + 1
        for rows in np.split(np.arange(self.tokens), bounds):
            if not len(rows):
                continue
            for i, layer in enumerate(self.layers):
                chosen = sorted(set(self.experts[rows, i].reshape(-1).tolist()))
                guess = None
                if self.predicted is not None:
                    g = self.predicted[rows, i].reshape(-1)
                    ok = g >= 0
                    if self.confidence is not None:
                        ok &= self.confidence[rows, i].reshape(-1) >= threshold
                    guess = sorted(set(g[ok].tolist())) if ok.any() else None
                yield int(layer), chosen, guess

    def counts(self) -> np.ndarray:
        """Activations per (layer position, expert): int64 [L, E]."""
        c = np.zeros((len(self.layers), self.num_experts), np.int64)
        for i in range(len(self.layers)):
            np.add.at(c[i], self.experts[:, i].reshape(-1).astype(np.int64), 1)
        return c

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace atomically (a temporary file renamed into place)."""
        arrays = {"format": np.frombuffer(TRACE_FORMAT.encode(), np.uint8),
                  "layers": np.asarray(self.layers, np.int32), "num_experts": np.asarray([self.num_experts], np.int32),
                  "step": self.step.astype(np.int32), "experts": self.experts.astype(np.int16),
                  "weights": self.weights.astype(np.float16),
                  "meta": np.frombuffer(json.dumps(self.meta).encode(), np.uint8)}
        if self.predicted is not None:
            arrays["predicted"] = self.predicted.astype(np.int16)
        if self.confidence is not None:
            arrays["confidence"] = self.confidence.astype(np.float16)
        save_npz_atomic(path, arrays, compressed=True)

    @staticmethod
    def load(path: str | os.PathLike) -> "RoutingTrace":
        """Read and check a trace file; FormatError naming the file when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or bytes(z["format"]).decode("ascii", "replace") != TRACE_FORMAT:
                    raise FormatError(f"{path}: not a moestream routing trace (no '{TRACE_FORMAT}' marker)")
                missing = {"layers", "num_experts", "step", "experts", "weights"} - set(z.files)
                if missing:
                    raise FormatError(f"{path}: trace lacks {', '.join(sorted(missing))}")
                meta = json.loads(bytes(z["meta"]).decode("utf-8")) if "meta" in z.files else {}
                return RoutingTrace(layers=tuple(int(x) for x in z["layers"]), num_experts=int(z["num_experts"][0]),
                                    step=z["step"].astype(np.int64), experts=z["experts"].astype(np.int64),
                                    weights=z["weights"].astype(np.float32),
                                    predicted=z["predicted"].astype(np.int64) if "predicted" in z.files else None,
                                    meta=meta, confidence=z["confidence"].astype(np.float32)
                                    if "confidence" in z.files else None)
        except FormatError as e:
            if str(e).startswith(str(path)):
                raise
            raise FormatError(f"{path}: {e}") from None
        except (zipfile.BadZipFile, ValueError, KeyError, EOFError, io.UnsupportedOperation) as e:
            raise FormatError(f"{path}: not a readable trace file ({e})") from None
