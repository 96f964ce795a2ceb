"""Next-layer probes: for each MoE layer, a small map from the residual stream one layer earlier
to that layer's router logits, fitted on the model's own activations over text.

The default next-layer guess applies layer l+1's router to layer l's residual (after layer l's
attention, before its MoE), as if the residual did not change in between. It does: on the
trained routing model the guess for the second MoE layer hits 13 % of the router's real top-2
(docs/CACHING.md). A probe learns the change instead of ignoring it: ridge regression from the
same input (layer l's residual normed by layer l+1's post-attention norm, the input the router
guess sees) to layer l+1's router logits, one [H+1, E] GEMV per layer like the router. The
change is not linear (layer l's experts make it), and a probe with one hidden layer of D units
(GELU), fitted by gradient descent on the squared error, learns more of it: on the routing model
89 % of the router's top-2 against 86.5 % for ridge (docs/CACHING.md), for one more [H+1, D] GEMV.
It needs more text than ridge to get there (80 k tokens; at 20 k both reach 86.5 %).

The first MoE layer has no layer before it: its guess (and its probe) starts from the token's
embedding, normed by its post-attention norm, before its attention runs. There the probe hits
86.7 % of the router's top-2 on the routing model, the router itself 68 % (docs/CACHING.md).

File (.npz, numpy's own format): `meta` (a JSON string: format, hidden size, experts, the
tokens and the fit's settings) and per predicted MoE layer L one float32 array `layer_<L>`, the
output map [D + 1, experts] (D = hidden size for a linear probe), and for a probe with a hidden
layer `hidden_<L>` [hidden size + 1, D]. The last row of each map is its bias. Format /1 (linear
probes only) is read too. Buffers belong to the probes object; the model keeps torch views of
them."""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError, UsageError
from ..formats.npz import save_npz_atomic

FORMAT = "moestream-next-layer-probes/2"
READS = ("moestream-next-layer-probes/1", FORMAT)
#: Hidden units of a fitted probe (`fit-predictor --hidden`; 0: a linear probe by ridge regression)
DEFAULT_PROBE_WIDTH = 256
#: Passes over the fitting tokens when a probe has a hidden layer (AdamW, cosine schedule)
PROBE_EPOCHS = 8


@dataclass(frozen=True)
class NextLayerProbes:
    """Per predicted MoE layer (the layer whose experts are guessed), its output map `weights`
    [D + 1, E], and for a probe with a hidden layer of D units its `hidden` map [H + 1, D]."""
    hidden_size: int
    num_experts: int
    weights: dict[int, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    hidden: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in set(self.hidden) - set(self.weights):
            raise ValueError(f"probe of layer {layer}: a hidden map without an output map")
        for layer, w in self.weights.items():
            h = self.hidden.get(layer)
            if h is not None and (h.ndim != 2 or h.shape[0] != self.hidden_size + 1 or h.dtype != np.float32):
                raise ValueError(f"probe of layer {layer}: hidden map {h.dtype} {h.shape}, expected float32 "
                                 f"({self.hidden_size + 1}, units)")
            rows = self.hidden_size + 1 if h is None else h.shape[1] + 1
            if w.shape != (rows, self.num_experts) or w.dtype != np.float32:
                raise ValueError(f"probe of layer {layer}: {w.dtype} {w.shape}, expected float32 "
                                 f"{(rows, self.num_experts)}")

    def maps(self, layer: int) -> tuple[np.ndarray, ...]:
        """The probe of `layer` as its affine maps in order (GELU between them)."""
        return (self.hidden[layer], self.weights[layer]) if layer in self.hidden else (self.weights[layer],)

    def save(self, path: str | os.PathLike) -> None:
        """Write the probes to `path` (.npz), atomically: a crash leaves the old file or none."""
        meta = dict(self.meta, format=FORMAT, hidden_size=self.hidden_size, num_experts=self.num_experts)
        save_npz_atomic(path, {"meta": np.array(json.dumps(meta)),
                               **{f"layer_{l}": w for l, w in self.weights.items()},
                               **{f"hidden_{l}": h for l, h in self.hidden.items()}})

    @staticmethod
    def load(path: str | os.PathLike) -> "NextLayerProbes":
        """Read probes written by `save`; FormatError naming the file for anything else."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                weights = {int(k[len("layer_"):]): z[k] for k in z.files if k.startswith("layer_")}
                hidden = {int(k[len("hidden_"):]): z[k] for k in z.files if k.startswith("hidden_")}
        except FileNotFoundError:
            raise UsageError(f"{path}: no such probes file (write one with moestream fit-predictor)") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: not a next-layer probes file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") not in READS:
            raise FormatError(f"{path}: not a next-layer probes file (format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT})")
        try:
            return NextLayerProbes(int(meta["hidden_size"]), int(meta["num_experts"]), weights, meta, hidden)
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


def probe_logits(maps: "torch.Tensor | Sequence[torch.Tensor]", x: torch.Tensor) -> torch.Tensor:
    """A probe (its affine maps in order, each [in + 1, out] with the bias last, GELU between;
    one tensor for a linear probe) applied to inputs x [N, H]: logits [N, E], float32."""
    h = x.float()
    for i, w in enumerate((maps,) if isinstance(maps, torch.Tensor) else maps):
        if i:
            h = F.gelu(h)
        h = torch.addmm(w[-1], h, w[:-1])
    return h


def fit_mlp(x: torch.Tensor, y: torch.Tensor, width: int, *, epochs: int = PROBE_EPOCHS,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A probe with one hidden layer of `width` GELU units from x [N, H] to y [N, E], fitted by
    AdamW on the squared error (batches of 512, cosine schedule, deterministic `seed`).
    Returns its maps: hidden [H + 1, width], output [width + 1, E], float32."""
    gen = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    hid = torch.nn.Linear(x.shape[1], width)
    out = torch.nn.Linear(width, y.shape[1])
    with torch.no_grad():      # seeded init, not torch's global generator
        for lin in (hid, out):
            bound = lin.in_features ** -0.5
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
    params = [*hid.parameters(), *out.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    batch = 512
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                idx = order[i:i + batch]
                loss = F.mse_loss(out(F.gelu(hid(x[idx]))), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        pack = lambda lin: torch.cat([lin.weight.T, lin.bias[None]]).contiguous().numpy()
        return pack(hid), pack(out)


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
                maps = [torch.from_numpy(m) for m in probes.maps(key)]
                row["probe"] = top_k_hit(probe_logits(maps, x), logits[key], k)
            out[key] = row
    return out


def collect(model, batches: Iterable[torch.Tensor], progress=None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run `model` (a moestream CausalLM) on token batches [B, T]; returns, per MoE layer, the
    probe's inputs [N, H] (the previous layer's residual after its attention, or for the first
    layer the token's embedding, normed by this layer's post-attention norm) and the router's
    logits there [N, E] (float32).
    progress(tokens) is called after each batch."""
    from .models.common import StreamingMoE
    pairs = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, StreamingMoE)]
    inputs: dict[int, list] = {layer.mlp.layer: [] for _, layer in pairs}
    logits: dict[int, list] = {layer.mlp.layer: [] for _, layer in pairs}
    hooks = []
    # with the predictor on, the next layer's norm and router also run on this layer's residual
    # (DecoderLayer.forward's guess): off while collecting, so each hook fires once per layer
    saved = model.prefetch_next_layer, model.recorder
    model.prefetch_next_layer, model.recorder = False, None
    for i, layer in pairs:
        key = layer.mlp.layer

        def keep_input(h, layer=layer, key=key):
            h = h.reshape(-1, h.shape[-1])
            # .forward: calling the module would fire the hook this loop puts on that same norm
            inputs[key].append(layer.post_attention_layernorm.forward(h).float())
        if i == 0:   # the first layer's guess is made from the token's embedding (CausalLM.forward)
            hooks.append(model.embed_tokens.register_forward_hook(lambda mod, args, out, f=keep_input: f(out)))
        else:        # the others' from the layer before's residual after its attention
            hooks.append(model.layers[i - 1].post_attention_layernorm.register_forward_pre_hook(
                lambda mod, args, f=keep_input: f(args[0])))
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


def fit_probes(model, batches: Iterable[torch.Tensor], penalty: float = 1.0, progress=None, *,
               width: int = DEFAULT_PROBE_WIDTH) -> NextLayerProbes:
    """Probes for every MoE layer (the first one's from the embedding), fitted on `batches` of token ids."""
    return probes_from(model, *collect(model, batches, progress), penalty, width=width)


def probes_from(model, inputs: dict[int, torch.Tensor], logits: dict[int, torch.Tensor],
                penalty: float = 1.0, *, width: int = DEFAULT_PROBE_WIDTH, progress=None) -> NextLayerProbes:
    """Probes fitted on what `collect` returned (so the same activations can also be scored):
    with a hidden layer of `width` units (fit_mlp), or linear by ridge regression with L2
    `penalty` when width is 0. progress(1) is called after each layer's probe."""
    n = len(next(iter(inputs.values())))

    def each(fit):
        out = {}
        for k in inputs:
            out[k] = fit(k)
            if progress is not None:
                progress(1)
        return out
    if width <= 0:
        weights = each(lambda k: ridge(inputs[k], logits[k], penalty))
        return NextLayerProbes(model.cfg.hidden_size, model.cfg.num_experts, weights, {"tokens": n, "ridge": penalty})
    fitted = each(lambda k: fit_mlp(inputs[k], logits[k], width))
    return NextLayerProbes(model.cfg.hidden_size, model.cfg.num_experts, {k: o for k, (_, o) in fitted.items()},
                           {"tokens": n, "hidden": width, "epochs": PROBE_EPOCHS},
                           {k: h for k, (h, _) in fitted.items()})


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
