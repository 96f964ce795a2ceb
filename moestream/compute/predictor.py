"""Next-layer probes: for each MoE layer, a linear map from the residual stream one layer earlier
to that layer's router logits, fitted on the model's own activations over text.

The default next-layer guess applies layer l+1's router to layer l's residual (after layer l's
attention, before its MoE), as if the residual did not change in between. It does: on the
trained routing model the guess for the second MoE layer hits 13 % of the router's real top-2
(docs/CACHING.md). A probe learns the change instead of ignoring it: ridge regression from the
same input (layer l's residual normed by layer l+1's post-attention norm, the input the router
guess sees) to layer l+1's router logits. It costs one [H+1, E] GEMV per layer, like the router.

File (.npz, numpy's own format): `meta` (a JSON string: format, hidden size, experts, the
tokens and ridge it was fitted with) and one float32 array `layer_<L>` [hidden + 1, experts] per
predicted MoE layer L (the last row is the bias). Buffers belong to the probes object; the
model keeps torch views of them."""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import FormatError, UsageError
from ..formats.npz import save_npz_atomic

FORMAT = "moestream-next-layer-probes/1"


@dataclass(frozen=True)
class NextLayerProbes:
    """Per predicted MoE layer (the layer whose experts are guessed), its weights [H + 1, E]."""
    hidden_size: int
    num_experts: int
    weights: dict[int, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer, w in self.weights.items():
            if w.shape != (self.hidden_size + 1, self.num_experts) or w.dtype != np.float32:
                raise ValueError(f"probe of layer {layer}: {w.dtype} {w.shape}, expected float32 "
                                 f"{(self.hidden_size + 1, self.num_experts)}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the probes to `path` (.npz), atomically: a crash leaves the old file or none."""
        meta = dict(self.meta, format=FORMAT, hidden_size=self.hidden_size, num_experts=self.num_experts)
        save_npz_atomic(path, {"meta": np.array(json.dumps(meta)),
                               **{f"layer_{l}": w for l, w in self.weights.items()}})

    @staticmethod
    def load(path: str | os.PathLike) -> "NextLayerProbes":
        """Read probes written by `save`; FormatError naming the file for anything else."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                weights = {int(k[len("layer_"):]): z[k] for k in z.files if k.startswith("layer_")}
        except FileNotFoundError:
            raise UsageError(f"{path}: no such probes file (write one with moestream fit-predictor)") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: not a next-layer probes file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FormatError(f"{path}: not a next-layer probes file (format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT})")
        try:
            return NextLayerProbes(int(meta["hidden_size"]), int(meta["num_experts"]), weights, meta)
        except ValueError as e:
            raise FormatError(f"{path}: {e}") from None

    def check(self, hidden_size: int, num_experts: int, moe_layers: Iterable[int], where: str) -> None:
        """FormatError unless these probes fit a model of this shape."""
        if (hidden_size, num_experts) != (self.hidden_size, self.num_experts):
            raise FormatError(f"{where}: the probes are for hidden size {self.hidden_size} and {self.num_experts} "
                              f"experts, the model has {hidden_size} and {num_experts}")
        unknown = sorted(set(self.weights) - set(moe_layers))
        if unknown:
            raise FormatError(f"{where}: the probes are for layers {unknown}, which are not MoE layers of the model")


def ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> np.ndarray:
    """The least-squares map [H + 1, E] (last row: bias) from x [N, H] to y [N, E] with an L2
    penalty on the weights (not the bias), solved in float64."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    reg = penalty * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(x.T @ x + reg, x.T @ y.double()).float().numpy()


def probe_logits(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A probe w [H + 1, E] (last row: bias) applied to inputs x [N, H]: logits [N, E], float32."""
    return torch.addmm(w[-1], x.float(), w[:-1])


def top_k_hit(guess_logits: torch.Tensor, real_logits: torch.Tensor, k: int) -> float:
    """Share of the real top-k [N, k] that the guess's top-k hits: precision = recall for top-k
    guesses against top-k choices."""
    real = real_logits.topk(k, -1).indices
    guess = guess_logits.topk(k, -1).indices
    return (guess[:, :, None] == real[:, None, :]).any(-1).float().mean().item()


def score(model, probes: Optional["NextLayerProbes"], inputs: dict[int, torch.Tensor],
          logits: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per predicted layer: the top-k hit of its router's guess and of its probe (when there is
    one) on collected inputs/logits."""
    routers = {key: mlp.gate for key, mlp in model.moe_layers().items()}
    k = model.cfg.top_k
    out = {}
    with torch.no_grad():
        for key, x in inputs.items():
            gate = routers[key]
            row = {"router": top_k_hit(gate(x.to(gate.weight.dtype)).float(), logits[key], k)}
            if probes is not None and key in probes.weights:
                row["probe"] = top_k_hit(probe_logits(torch.from_numpy(probes.weights[key]), x), logits[key], k)
            out[key] = row
    return out


def collect(model, batches: Iterable[torch.Tensor], progress=None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run `model` (a moestream CausalLM) on token batches [B, T]; returns, per predicted MoE
    layer, the probe's inputs [N, H] (the previous layer's residual after its attention, normed
    by this layer's post-attention norm) and the router's logits there [N, E] (float32).
    progress(tokens) is called after each batch."""
    from .models.common import StreamingMoE
    pairs = [(i, layer) for i, layer in enumerate(model.layers) if i > 0 and isinstance(layer.mlp, StreamingMoE)]
    inputs: dict[int, list] = {layer.mlp.layer: [] for _, layer in pairs}
    logits: dict[int, list] = {layer.mlp.layer: [] for _, layer in pairs}
    hooks = []
    # with the predictor on, the next layer's norm and router also run on this layer's residual
    # (DecoderLayer.forward's guess): off while collecting, so each hook fires once per layer
    saved = model.prefetch_next_layer, model.recorder
    model.prefetch_next_layer, model.recorder = False, None
    for i, layer in pairs:
        prev, key = model.layers[i - 1], layer.mlp.layer

        def keep_input(mod, args, layer=layer, key=key):
            h = args[0].reshape(-1, args[0].shape[-1])
            # .forward: calling the module would fire the hook this loop puts on that same norm
            inputs[key].append(layer.post_attention_layernorm.forward(h).float())
        hooks.append(prev.post_attention_layernorm.register_forward_pre_hook(keep_input))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda mod, args, out, key=key: logits[key].append(out.reshape(-1, out.shape[-1]).float())))
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
                if progress is not None:
                    progress(ids.numel())
    finally:
        for h in hooks:
            h.remove()
        model.prefetch_next_layer, model.recorder = saved
    empty = [k for k, v in inputs.items() if not v]
    if empty:
        raise UsageError("no tokens to fit the probes on")
    return {k: torch.cat(v) for k, v in inputs.items()}, {k: torch.cat(v) for k, v in logits.items()}


def fit_probes(model, batches: Iterable[torch.Tensor], penalty: float = 1.0, progress=None) -> NextLayerProbes:
    """Probes for every MoE layer that has one before it, fitted on `batches` of token ids."""
    return probes_from(model, *collect(model, batches, progress), penalty)


def probes_from(model, inputs: dict[int, torch.Tensor], logits: dict[int, torch.Tensor],
                penalty: float = 1.0) -> NextLayerProbes:
    """Probes fitted on what `collect` returned (so the same activations can also be scored)."""
    weights = {k: ridge(inputs[k], logits[k], penalty) for k in inputs}
    n = len(next(iter(inputs.values())))
    return NextLayerProbes(model.cfg.hidden_size, model.cfg.num_experts, weights,
                           {"tokens": n, "ridge": penalty})


def token_batches(tokenizer, texts: Sequence[str], *, tokens: int, length: int = 256) -> list[torch.Tensor]:
    """Up to `tokens` token ids from `texts`, as [1, length] batches (shorter last pieces kept)."""
    out, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text).ids
        for start in range(0, len(ids), length):
            piece = ids[start:start + min(length, tokens - total)]
            if len(piece) < 2:
                break
            out.append(torch.tensor([piece]))
            total += len(piece)
            if total >= tokens:
                return out
    return out
