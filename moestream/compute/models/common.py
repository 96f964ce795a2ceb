"""Building blocks shared by the model families: RMSNorm, rotary embeddings, grouped-query
attention with a KV cache, the dense SwiGLU MLP, and the streaming MoE block whose experts come
only from the Store. Shapes in comments: B batch, T tokens, N tokens in the batch (B*T),
H hidden, A active experts per token, E experts, D head dim."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MoestreamError, UsageError
from ...formats.quantized import QuantizedTensor
from .. import decode_layer, decode_moe, decode_ops
from ..sampling import sample
from ..predictor import probe_logits
from ..decode_moe import held_decode_output
from ..quant_kernels import (QUANT_KERNELS, LinearPlan, RoutedExpert, fuse_rows, held_layout, kernel_takes_rows,
                             linear_plan, moe_layer, moe_layer_at, moe_layer_fits, quant_linear)
from ..threads import COMPUTE_THREADS


@dataclass
class ModelConfig:
    """What the forward needs from a Hugging Face config (all families)."""
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    dense_intermediate_size: int = 0          # MLP of layers that are not MoE (Qwen mlp_only_layers)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    clip_qkv: Optional[float] = None
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")   # gate, up, down
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @staticmethod
    def from_hf(hf: dict[str, Any], family, moe_layers, num_experts: int) -> "ModelConfig":
        """From a checked Hugging Face config and the family record (formats.families.Family)."""
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        eos = hf.get("eos_token_id")
        return ModelConfig(
            family=family.name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            num_experts=num_experts, top_k=hf["num_experts_per_tok"],
            norm_topk_prob=family.renormalises(hf),
            moe_layers=tuple(moe_layers), dense_intermediate_size=hf.get("intermediate_size", 0),
            rope_theta=float(theta), rope_scaling=rope, max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), clip_qkv=hf.get("clip_qkv"),
            expert_names=family.gate_up_down, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = decode_ops.rms_norm(x, self.weight, self.eps)     # a decode step's bf16 rows: one call
        if fused is not None:
            return fused
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the attention scaling factor for the config's rope type."""
    d = cfg.head_dim
    # on the CPU even while the model is built on the meta device: these are config, not weights,
    # and arange on meta imports torch._dynamo (1.5 s of every start-up, measured)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv.float(), 1.0
    if rope_type == "linear":
        return (inv / cfg.rope_scaling["factor"]).float(), 1.0
    if rope_type == "yarn":
        factor = cfg.rope_scaling["factor"]
        orig = cfg.rope_scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
        beta_fast, beta_slow = cfg.rope_scaling.get("beta_fast", 32), cfg.rope_scaling.get("beta_slow", 1)

        def dim_for(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low = max(math.floor(dim_for(beta_fast)), 0)
        high = min(math.ceil(dim_for(beta_slow)), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float64, device="cpu") - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        mscale = cfg.rope_scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv.float(), float(mscale)
    raise MoestreamError(f"rope type {rope_type!r} is not supported (default, linear, yarn)")


#: positions whose decode-step cos and sin a Rotary keeps (~1 KB each with D = 128); past them
#: it forgets all and starts again
ROPE_MEMO_POSITIONS = 8192


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]          # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                             # [T, D]
        return emb.cos() * self.scale, emb.sin() * self.scale

    def at(self, position: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, D] in `dtype` of one position (a decode step): what forward gives for
        [position], rounded to `dtype`, computed by it once and then kept (ten torch ops, ~30 us
        a token, otherwise). Shared: callers must not write to them."""
        inv = self.inv_freq
        key = (position, dtype, inv.device, inv.data_ptr())     # a moved or cast inv_freq: computed again
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= ROPE_MEMO_POSITIONS:
                self._memo.clear()
            cos, sin = self(torch.tensor([position], device=inv.device))
            hit = self._memo[key] = (cos.to(dtype), sin.to(dtype))
        return hit


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] rotated by the half-split convention of the HF checkpoints."""
    fused = decode_ops.rotary(x, cos, sin)                        # a decode step's bf16 heads: one call
    if fused is not None:
        return fused
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


#: each KVCache's serial number: the fused decode calls remember the one they checked by it (an
#: id() can come back for a new cache once the old one is freed)
_CACHE_SERIALS = itertools.count(1)


class KVCache:
    """Per-layer keys and values, preallocated for `max_len` positions: [B, kv_heads, max_len, D].

    frozen: the cache of one CausalLM.generate call, or of one request of the server (whose
    scheduler thread owns the model), during which the model's weights, modules and hooks do not
    change: the fused decode calls check their plans and this cache's tensors on its first decode
    step only, not on each (~0.15 ms of Python a layer, at a 2-layer model's ~7 ms token); the
    position is checked on every step. Other callers (the transformers plug) leave it off."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 frozen: bool = False):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len
        self.frozen = frozen
        self.serial = next(_CACHE_SERIALS)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise MoestreamError(f"sequence of {end} tokens exceeds the KV cache ({self.max_len})")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention. qk_norm: None, "head" (RMSNorm over D, Qwen3) or "full" (over
    heads*D before the head split, OLMoE). qkv_bias: Qwen2."""

    def __init__(self, cfg: ModelConfig, layer: int, *, qkv_bias: bool = False, qk_norm: Optional[str] = None):
        super().__init__()
        self.layer, self.cfg, self.qk_norm = layer, cfg, qk_norm
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(cfg.num_heads * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, cfg.rms_norm_eps)
        #: q, k and v in one module (fuse_projections), None until then
        self.qkv_proj: Optional[nn.Module] = None

    def fuse_projections(self) -> bool:
        """Compute q, k and v by one matmul over their stacked weights (quant_kernels.fuse_rows;
        q_proj, k_proj and v_proj become views of it). Called by the loader once the weights are in
        their final form; False where the three cannot be fused."""
        parts = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_proj = fuse_rows(parts)
        self.qkv_sizes = [m.out_features for m in parts]
        return self.qkv_proj is not None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Optional[KVCache],
                start: int) -> torch.Tensor:
        return self.o_proj(self.attend(*self.project(x), rope, cache, start))

    def forward_ragged(self, x: torch.Tensor, ropes: list, caches: list[KVCache], starts: list[int]) -> torch.Tensor:
        """One decode token of each of B sequences, x [B, 1, H], each at its own position with its
        own KV cache. Where the CPU kernels take the projections' B rows (row by row, as they take
        one: the same values as B separate calls), q/k/v and o are computed once over all B, a read
        of their weights per step instead of one per sequence; elsewhere sequence by sequence."""
        b = x.shape[0]
        projections = [self.qkv_proj] if self.qkv_proj is not None else [self.q_proj, self.k_proj, self.v_proj]
        if b == 1 or not all(kernel_takes_rows(m, b) for m in projections + [self.o_proj]):
            return torch.cat([self(x[i:i + 1], ropes[i], caches[i], starts[i]) for i in range(b)])
        q, k, v = self.project(x)                                                   # [B, 1, heads*D]
        return self.o_proj(torch.cat([self.attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], ropes[i], caches[i], starts[i])
                                      for i in range(b)]))                          # [B, 1, H]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, heads*D], k and v [B, T, kv_heads*D]."""
        if self.qkv_proj is not None:
            return tuple(self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               cache: Optional[KVCache], start: int) -> torch.Tensor:
        """The attention of projected q, k, v [B, T, heads*D] at positions start.. (their rope),
        the new keys and values written to `cache` -> [B, T, heads*D], before o_proj."""
        b, t, _ = q.shape
        d = self.cfg.head_dim
        cos, sin = rope
        if t == 1 and cache is not None and self.qk_norm != "full" and self.cfg.clip_qkv is None:
            # a decode step: norms, rotary, the cache write and attention in one kernel call
            # (fifteen torch ops and their dispatch, ~0.1 ms a layer, otherwise)
            norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "head" else (None, None)
            out = decode_ops.attend_one(q, k, v, *norms, self.cfg.rms_norm_eps, cos, sin, cache.k[self.layer],
                                        cache.v[self.layer], start)                # [1, 1, heads*D]
            if out is not None:
                return out
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-self.cfg.clip_qkv, self.cfg.clip_qkv) for z in (q, k, v))
        q = q.reshape(b, t, -1, d)
        k = k.reshape(b, t, -1, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.reshape(b, t, -1, d).transpose(1, 2)   # [B, heads, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)                         # [B, kv, start+T, D]
        kv_heads = k.shape[1]
        if t == 1:
            # one query position (decode) sees every position: each kv head's group of query heads
            # attends as that many query rows of one head, in place. torch's CPU SDPA with
            # enable_gqa takes its math path in bf16: 217 us a layer at 41 positions and 2.1 ms at
            # 512, against 28 and 117 us this way (2026-12-06, 32 query and 4 kv heads of 128)
            out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, -1, d), k, v)   # [B, kv, heads/kv, D]
            return out.reshape(b, 1, -1)
        # causal over [start, start+T) against every earlier position
        pos_q = torch.arange(start, start + t, device=q.device)[:, None]
        mask = torch.arange(k.shape[2], device=q.device)[None, :] <= pos_q          # [T, total]
        # enable_gqa: each kv head serves its group of query heads in place; repeat_interleave
        # copied the whole cache every step (0.8 ms a layer at 400 tokens, 15 ms at 2000)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=kv_heads != q.shape[1])   # [B, heads, T, D]
        return out.transpose(1, 2).reshape(b, t, -1)


class DenseMLP(nn.Module):
    """SwiGLU MLP held in memory: shared experts and dense layers."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StreamingMoE(nn.Module):
    """Router in memory, experts from the Store. The experts chosen by any token of the batch
    are fetched at once; each is computed as soon as its future completes (arrival order), and
    its weighted output is accumulated into the tokens routed to it."""

    def __init__(self, cfg: ModelConfig, layer: int, store):
        super().__init__()
        self.cfg, self.layer, self.store = cfg, layer, store
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        #: seconds spent in this layer's expert matmuls and their accumulation (for benchmarks)
        self.expert_seconds = 0.0
        #: a compute.routing.RoutingRecorder while routing is recorded
        self.recorder = None
        #: (layer, experts) to prefetch once this layer's own reads are queued (set by
        #: DecoderLayer for its next-layer guesses; used by one forward, then cleared)
        self.prefetch_next: Optional[tuple[int, list[int]]] = None
        #: a fitted next-layer probe, its affine maps in order (compute/predictor.py), that
        #: replaces this router in guess(): the router assumes the residual does not change in between
        self.probe: Optional[tuple[torch.Tensor, ...]] = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> logits [N, E] float32, rounded to x's dtype as a router held in x's dtype
        makes them (on a CPU the loader holds a bf16 router as a Bf16DecodeLinear, an fp16 one in
        float32: torch's half-precision GEMV of this small a matrix took 3x its float32 one)."""
        return self.gate(x.to(self.gate.weight.dtype)).to(x.dtype).float()   # a module call: hooks see it

    def route(self, x: torch.Tensor, logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> routing weights [N, A] in x's dtype and experts [N, A]; `logits` [N, E]
        float32: the router's, where the caller has computed them (else the router runs here)."""
        if logits is None:
            logits = self.router_logits(x)                                       # [N, E]
        chosen = decode_ops.softmax_topk(logits, self.cfg.top_k, self.cfg.norm_topk_prob)   # CPU: one call
        if chosen is not None:
            weights, experts = chosen                                            # [N, A], [N, A]
            return weights.to(x.dtype), experts
        probs = F.softmax(logits, dim=-1)                                        # [N, E]
        weights, experts = torch.topk(probs, self.cfg.top_k, dim=-1)            # [N, A]
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def guess(self, x: torch.Tensor, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This router (or its fitted probe) applied to a residual from before this layer x [N, H]:
        its `width` (default top-k) most likely experts [N, G], most likely first, and their
        probabilities [N, G] (the predictor)."""
        if self.probe is not None:
            logits = probe_logits(self.probe, x)                                  # [N, E]
        else:
            logits = self.router_logits(x)                                        # [N, E]
        probs, experts = torch.topk(F.softmax(logits, dim=-1), width or self.cfg.top_k, dim=-1)
        return experts, probs

    def guess_ahead(self, x: torch.Tensor, width: Optional[int], threshold: Optional[float],
                    queue_behind: Optional["StreamingMoE"] = None) -> None:
        """Guess this layer's `width` (default top-k) likeliest experts from x [N, H] (a residual
        from before the layer, normed by its post-attention norm), record the guess when routing
        is recorded, and with a `threshold` prefetch those guessed with probability >= it: queued
        behind `queue_behind`'s own reads (the layer running now), or at once."""
        guess, probs = self.guess(x, width)                                       # [N, G], [N, G]
        if self.recorder is not None:
            self.recorder.predict(self.layer, guess, probs)
        if threshold is None:
            return
        confident = sorted(set(guess[probs >= threshold].tolist()))
        if confident and queue_behind is not None:
            queue_behind.prefetch_next = (self.layer, confident)
        elif confident:
            self.store.prefetch(self.layer, confident)

    def forward(self, x: torch.Tensor, logits: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, H] -> the routed experts' weighted sum [N, H]; `logits` as in route; with a
        `residual` [N, H] (or any shape of N * H values), residual + that sum in its shape (a
        decode step adds it in the kernel's call)."""
        weights, experts = self.route(x, logits)                                 # [N, A], [N, A]
        if self.recorder is not None:
            self.recorder.record(self.layer, experts, weights)
        then, self.prefetch_next = self.prefetch_next, None
        out, seconds = routed_experts_output(self.store, self.layer, self.cfg.expert_names, x, weights, experts,
                                             then_prefetch=then, residual=residual)
        self.expert_seconds += seconds
        return out


def routed_experts_output(store, layer: int, names: tuple[str, str, str], x: torch.Tensor, weights: torch.Tensor,
                          experts: torch.Tensor, then_prefetch: Optional[tuple[int, list[int]]] = None,
                          residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
    """The routed SwiGLU experts of `layer` on x [N, H]: sum over k of weights[:, k] *
    expert_k(x), the experts [N, A] fetched from `store` and computed in arrival order (names:
    the store's gate, up and down tensor names). Returns the output [N, H] in x's dtype (a new
    tensor) and the seconds spent computing (not waiting for reads). Shared by the native forward
    and the vLLM plug (integrations/vllm.py). then_prefetch as in stream_experts. With a
    `residual` (N * H values of x's dtype), the output is residual + the experts' sum, in the
    residual's shape."""
    done = held_decode_output(store, layer, names, x, weights, experts, then_prefetch, residual)  # decode, all in L1
    if done is not None:
        return (done[0] if residual is None else done[0].view(residual.shape)), done[1]
    gate_name, up_name, down_name = names
    weights = weights.to(x.dtype)                                                # [N, A]
    # both made on first use: at decode the layer kernel takes every expert, and its float32 sum
    # rounded once is the output (no bf16 zeros to add it to)
    outs: list[torch.Tensor] = []    # x.dtype [N, H] of the experts torch computes
    acc: list[torch.Tensor] = []     # float32 [N, H] of the experts the layer kernel computes
    seconds = 0.0

    def linear(h: torch.Tensor, w) -> torch.Tensor:
        return quant_linear(h, w) if isinstance(w, QuantizedTensor) else F.linear(h, w.to(x.dtype))

    def compute(e: int, w: dict, rows_l: list[int], slots_l: list[int]) -> None:
        if len(rows_l) == x.shape[0] == 1:                                       # decode: no gather
            h, rows, slot = x, None, slots_l[0]
        else:
            rows = torch.tensor(rows_l, device=x.device)
            h, slot = x[rows], torch.tensor(slots_l, device=x.device)           # [n, H]
        y = linear(F.silu(linear(h, w[gate_name])) * linear(h, w[up_name]), w[down_name])   # [n, H]
        if not outs:
            outs.append(torch.zeros_like(x))                                     # [N, H]
        out = outs[0]
        if rows is None:
            out.add_(y * weights[0, slot])
        else:
            out.index_add_(0, rows, y * weights[rows, slot, None])

    def takes_held(region, quantized: bool, rows: int):   # read where its slot holds it (decode): how
        found = held_layout(region, quantized, names)
        return found if found is not None and rows < QUANT_KERNELS[found[0][0]].gemm_rows else None

    def accumulator() -> torch.Tensor:
        if not acc:
            acc.append(torch.zeros(x.shape, dtype=torch.float32))
        return acc[0]

    def compute_batch(batch: list[tuple[int, dict, list[int], list[int]]]) -> None:
        # every expert the CPU layer kernel reads (int8, int4, bf16) that has arrived, in one
        # call: the per-expert Python and dispatch cost is larger than an expert's matmuls at decode
        nonlocal seconds
        t0 = time.perf_counter()
        wl = weights.float().tolist()                                            # [N][A]

        def pair_weights(rows_l: list[int], slots_l: list[int]) -> list[float]:
            return [wl[r][s] for r, s in zip(rows_l, slots_l)]
        # experts read where the store's slots hold them (HeldExpert items): one kernel call for the
        # quantized ones of one group and shape (int8 and int4 may mix), one for the bf16 ones
        parts: dict = {}
        for _, h, rows_l, slots_l in batch:
            if not isinstance(h, dict):
                layout, planes = h.layout                                     # takes_held's
                part = parts.setdefault((layout[1] is None, layout[1:]), ([], [], []))
                part[0].append((layout, planes, h.address))
                part[1].append(rows_l)
                part[2].append(pair_weights(rows_l, slots_l))
        for experts_at, rows, ws in parts.values():
            moe_layer_at(x, experts_at, rows, ws, accumulator())
        batch = [item for item in batch if isinstance(item[1], dict)] if parts else batch
        routed = [RoutedExpert(*(w[n] for n in names), rows_l, pair_weights(rows_l, slots_l))
                  for _, w, rows_l, slots_l in batch]
        # an expert with more token rows than its type's gemm_rows (prefill) takes torch's GEMM
        taken = [e for e in routed if e.kernel_takes]
        rest = batch
        if taken and moe_layer_fits(taken):
            moe_layer(x, taken, accumulator())
            rest = [b for b, e in zip(batch, routed) if not e.kernel_takes]
        del routed, taken
        for item in rest:
            compute(*item)
        seconds += time.perf_counter() - t0

    stream_experts(store, layer, route_on_host(experts), compute_batch=compute_batch, then_prefetch=then_prefetch,
                   takes_held=takes_held if x.device.type == "cpu" else None)
    if not outs:
        out = acc[0].to(x.dtype) if acc else torch.zeros_like(x)
    else:
        out = outs[0].add_(acc[0].to(x.dtype)) if acc else outs[0]
    return (out if residual is None else residual + out.view(residual.shape)), seconds


def route_on_host(experts: torch.Tensor) -> dict[int, tuple[list[int], list[int]]]:
    """experts [N, A] -> {expert: (token rows, top-k positions)}, worked out on the host once per
    layer (a per-expert nonzero/tolist would force a device sync per expert)."""
    top_k = experts.shape[-1]
    routed: dict[int, tuple[list[int], list[int]]] = {}
    for i, e in enumerate(experts.reshape(-1).tolist()):
        rows, slots = routed.setdefault(e, ([], []))
        rows.append(i // top_k)
        slots.append(i % top_k)
    return routed


def stream_experts(store, layer: int, routed: dict[int, tuple[list[int], list[int]]], compute=None,
                   then_prefetch: Optional[tuple[int, list[int]]] = None, compute_batch=None,
                   takes_held=None) -> None:
    """Fetch `layer`'s routed experts from the Store and call compute(expert, tensors, rows,
    top-k positions) for each as it arrives (arrival order), with at most as many experts in
    hand as the device budget holds: a prefill that routes to every expert of the layer stays
    within the budget. With `compute_batch` instead, it is called with a list of such tuples:
    every expert that has arrived by then (cache hits all at once), so that a kernel can take them
    in one call. Tells the Store the routing first (its eviction policy uses it). The tensors are
    the Store's (read-only); compute must not keep them. `then_prefetch` (layer, experts) is
    prefetched right after this layer's own fetches are queued, so that its reads come after them.
    With `takes_held(region, in stored form, token rows)` (a caller that reads experts by
    address: how it reads one, or None), the L1 hits it takes come as storage.store.HeldExpert
    instead of tensors (what takes_held returned as their layout), in the first batch, their
    slots pinned until that batch is computed: no views are made for them."""
    if compute_batch is None:
        def compute_batch(batch):
            for item in batch:
                compute(*item)
    waiting = sorted(routed)
    store.note_routing(layer, waiting)
    window = store.expert_slots
    inflight: dict = {}
    held = {}
    if takes_held is not None and getattr(store, "holds_by_address", False):   # duck-typed stores have no arena
        held = store.hold_hits(layer, waiting[:window],
                               lambda e, region, quantized: takes_held(region, quantized, len(routed[e][0])))
        waiting = [e for e in waiting if e not in held]
        if not waiting and then_prefetch is not None:     # nothing of this layer's to queue first
            store.prefetch(*then_prefetch)
            then_prefetch = None
    while waiting or inflight or held:
        batch = []
        if waiting and len(inflight) < window:
            take, waiting = waiting[:window - len(inflight)], waiting[window - len(inflight):]
            ready, pending = store.fetch_ready(layer, take)     # cache hits at once, the rest loading
            inflight.update(pending)
            if then_prefetch is not None:
                store.prefetch(*then_prefetch)
                then_prefetch = None
            batch = [(e, tensors, *routed[e]) for e, tensors in ready.items()]
            del ready
        if held:
            batch += [(e, h, *routed[e]) for e, h in held.items()]
        elif not batch:
            first = store.wait_first(inflight)                                   # arrival order
            for fut in [first] + [f for f in inflight if f is not first and f.done()]:
                e = inflight.pop(fut)
                batch.append((e, fut.result(), *routed[e]))
            del first, fut
        COMPUTE_THREADS.adjust(store.prefetching)   # leave a core to the store's prefetch work
        try:
            compute_batch(batch)
        finally:
            if held:
                store.release_held(held)
                held = {}
        del batch
    COMPUTE_THREADS.adjust(store.prefetching)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h)). Families supply the
    attention and the (streaming) MLP."""

    def __init__(self, cfg: ModelConfig, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        #: the fused decode call's plan of this layer (attention_half), made on first use
        self._block: Optional[decode_layer.BlockPlan] = None
        self._block_modules: list[nn.Module] = []            # those whose weights _block reads
        #: the frozen KVCache (generate's) that _block and the cache were checked for
        self._trust = _FrozenTrust()
        #: generate's decode steps: the MoE's router and experts read through the store's
        #: ResidentLease in one call (CausalLM.lease_experts), or None
        self._leased: Optional[decode_moe.LeasedLayer] = None

    def forward(self, x: torch.Tensor, rope, cache: Optional[KVCache], start: int,
                next_layer: Optional["DecoderLayer"] = None, prefetch_threshold: Optional[float] = None,
                guess_width: Optional[int] = None) -> torch.Tensor:
        """With `next_layer`, its router (or probe) guesses its `guess_width` likeliest experts
        from this layer's residual (the next-layer predictor): recorded when routing is, and
        prefetched when `prefetch_threshold` is set (those with probability >= it)."""
        fused = self.attention_half(x, rope, cache, start)
        if fused is not None:
            h, normed, logits = fused                                            # [1, 1, H], [1, H], [1, E]
        else:
            h = x + self.self_attn(self.input_layernorm(x), rope, cache, start)  # [B, T, H]
            normed = logits = None
        b, t, hidden = h.shape
        if next_layer is not None and isinstance(next_layer.mlp, StreamingMoE):
            # speculative prefetch: the next layer's router on this layer's residual stream
            # guesses its experts; their reads overlap this layer's expert compute
            next_layer.mlp.guess_ahead(next_layer.post_attention_layernorm(h).reshape(b * t, hidden),   # [N, H]
                                       guess_width, prefetch_threshold,
                                       self.mlp if isinstance(self.mlp, StreamingMoE) else None)
        if normed is None:
            normed = self.post_attention_layernorm(h).reshape(b * t, hidden)    # [N, H]
        if logits is None:
            return h + self.mlp(normed).view(b, t, hidden)
        leased = self._leased
        if leased is not None and next_layer is None and self.mlp.recorder is None:
            done = leased.output(normed, logits, h)                              # router and experts in one call
            if done is not None:
                self.mlp.expert_seconds += done[1]
                return done[0]                                                   # [1, 1, H]
        if _hooked([self.mlp]):            # a hook sees the MoE's own output, without the residual
            return h + self.mlp(normed, logits).view(b, t, hidden)
        out = self.mlp(normed, logits, residual=h)                               # [1, 1, H]
        if leased is not None:             # an expert the lease lacked: loaded now, leased from the next step
            leased.refresh()
        return out

    def forward_ragged(self, x: torch.Tensor, ropes: list, caches: list[KVCache], starts: list[int]) -> torch.Tensor:
        """One decode token for each of B sequences of different lengths, x [B, 1, H]: attention
        per sequence (its own KV cache and position), the MoE once over all B tokens, so an
        expert two sequences route to is fetched once. (decode_batch takes one sequence through
        forward instead: generate's step.)"""
        h = x + self.self_attn.forward_ragged(self.input_layernorm(x), ropes, caches, starts)   # [B, 1, H]
        b, _, hidden = h.shape
        return h + self.mlp(self.post_attention_layernorm(h).reshape(b, hidden)).view(b, 1, hidden)

    def attention_half(self, x: torch.Tensor, rope, cache: Optional[KVCache], start: int
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """A bf16 CPU decode token x [1, 1, H] through the input norm, attention, residual,
        post-attention norm and router in one native call (compute/decode_layer.py): (h [1, 1, H],
        the post-norm of h [1, H], the router's logits [1, E] float32 or None where the router is
        not in the call), the values the modules compute. None where it does not apply (prefill,
        batches, other dtypes or devices, autograd, a module with hooks, weights the kernels do not
        read in place, OLMoE's full-width q/k norm, clip_qkv, biases): the modules run."""
        if (cache is None or x.shape[0] != 1 or x.shape[1] != 1 or x.dtype != torch.bfloat16
                or x.device.type != "cpu" or torch.is_grad_enabled()):
            return None
        checked = self._trust.holds(cache)                 # checked by this generate's first step
        plan = self._block if checked else self._block_plan()
        if plan is None:
            return None
        layer = self.self_attn.layer
        out = decode_layer.attention_half(plan, x, rope[0], rope[1], cache.k[layer], cache.v[layer], start,
                                          checked=checked)
        if out is not None and not checked:
            self._trust.grant(cache, self._block_modules)
        return out

    def _block_plan(self) -> Optional[decode_layer.BlockPlan]:
        # worked out again whenever a linear's plan or a norm's memory changes (the key). Every
        # decode step asks, so submodules and weights are read from their dicts: a module's
        # __getattr__ costs ~1 us each, a fifth of what this costs
        attn = self._modules["self_attn"]
        if not isinstance(attn, Attention) or attn.qk_norm == "full" or attn.cfg.clip_qkv is not None:
            return None
        am = attn._modules
        qkv_proj, o_proj = am.get("qkv_proj"), am["o_proj"]
        mlp = self._modules["mlp"]
        router = mlp._modules["gate"] if isinstance(mlp, StreamingMoE) else None
        norms = [self._modules["input_layernorm"], self._modules["post_attention_layernorm"]]
        if attn.qk_norm == "head":
            norms += [am["q_norm"], am["k_norm"]]
        qkv, o, gate = _kernel_plan(qkv_proj), _kernel_plan(o_proj), router and _kernel_plan(router)
        if qkv is None or o is None or _hooked([attn, qkv_proj, o_proj, *norms, *([router] if gate else [])]):
            return None
        weights = [m._parameters["weight"] for m in norms]
        key = (qkv, o, gate, *(w.data_ptr() for w in weights))
        if self._block is not None and self._block.key == key:
            return self._block
        eps = {m.eps for m in norms}
        self._block_modules = [qkv_proj, o_proj, *norms, *([router] if gate else [])]
        self._block = None if len(eps) != 1 else decode_layer.block_plan(
            key, hidden=attn.cfg.hidden_size, heads=attn.cfg.num_heads, kv_heads=attn.cfg.num_kv_heads,
            dim=attn.cfg.head_dim, eps=eps.pop(), qkv=qkv, o=o, gate=gate, in_norm=weights[0], post_norm=weights[1],
            q_norm=weights[2] if len(weights) > 2 else None, k_norm=weights[3] if len(weights) > 2 else None)
        return self._block


class _FrozenTrust:
    """A fused decode call's trust in one frozen KVCache (generate's), granted after its first
    call checked the plan and the cache in full: the cache's serial, and aliases of the parameters
    and buffers of the modules whose addresses the plan holds, kept until clear() (generate's
    end), so that a weight replaced meanwhile (a contract generate's callers break) is read from
    its old memory, kept alive, not freed memory."""

    def __init__(self) -> None:
        self.serial = 0
        self.memory: tuple[torch.Tensor, ...] = ()

    def holds(self, cache: KVCache) -> bool:
        return cache.frozen and self.serial == cache.serial

    def grant(self, cache: KVCache, modules: list[nn.Module]) -> None:
        """Trust `cache` (if frozen) after a call that checked everything; `modules`: the plan's."""
        if cache.frozen:
            self.serial = cache.serial
            self.memory = tuple(t.detach() for m in modules for t in (*m._parameters.values(), *m._buffers.values())
                                if t is not None)

    def clear(self) -> None:
        self.serial, self.memory = 0, ()


def _kernel_plan(linear: nn.Module) -> Optional[LinearPlan]:
    """quant_kernels.linear_plan of a linear layer without a bias (the fused calls add none)."""
    return linear_plan(linear) if linear._parameters.get("bias") is None else None


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a forward hook (global or on one of `modules`) would see these modules' calls."""
    from torch.nn.modules import module as torch_module
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class CausalLM(nn.Module):
    """embed -> decoder layers -> norm -> lm_head. `store` serves the routed experts; every
    other weight is a parameter of this module, loaded once."""

    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer], store):
        super().__init__()
        self.cfg, self.store = cfg, store
        # _weight skips the random init, whose normal_ on the meta device imports torch._dynamo
        # (1.5 s of every start-up); the loader assigns the real weights anyway
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        #: the fused decode call's plan of the final norm and lm_head (_fused_head), made on first use
        self._head: Optional[decode_layer.BlockPlan] = None
        #: the frozen KVCache (generate's) that _head was checked for
        self._head_trust = _FrozenTrust()
        #: the store's ResidentLease while generate decodes (lease_experts), or None
        self._lease = None
        #: prefetch the next layer's likely experts (its router applied to the current residual)
        self.prefetch_next_layer = False
        #: ... only those whose router probability reaches this
        self.prefetch_threshold = 0.0
        #: experts each guess names per token and layer (prefetched, recorded): the top-k, or
        #: more (load_model's extra_guesses), which catch most of what the top-k misses for more reads
        self.guess_width = cfg.top_k
        self.recorder = None

    def moe_layers(self) -> dict[int, "StreamingMoE"]:
        """The streaming MoE blocks by their store layer id (dense-MLP layers left out)."""
        return {layer.mlp.layer: layer.mlp for layer in self.layers if isinstance(layer.mlp, StreamingMoE)}

    def use_probes(self, probes, where: str = "next-layer probes") -> None:
        """Guess each layer's experts with its fitted probe (a compute.predictor.NextLayerProbes)
        instead of its router; None: back to the routers. FormatError if they do not fit."""
        moe = self.moe_layers()
        if probes is not None:
            probes.check(self.cfg.hidden_size, self.cfg.num_experts, moe, where)
        for key, mlp in moe.items():
            fitted = probes is not None and key in probes.weights
            mlp.probe = tuple(torch.from_numpy(m).to(self.embed_tokens.weight.device)
                              for m in probes.maps(key)) if fitted else None

    def record_routing(self, recorder) -> None:
        """Record every MoE layer's routing and the next-layer predictor's guesses into
        `recorder` (a compute.routing.RoutingRecorder), or stop with None."""
        self.recorder = recorder
        for layer in self.layers:
            if isinstance(layer.mlp, StreamingMoE):
                layer.mlp.recorder = recorder

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits float32 [B, T, V]. With `cache`, positions start at `start`."""
        x = self.embed_tokens(input_ids)                                         # [B, T, H]
        if input_ids.shape[1] == 1:
            rope = self.rotary.at(start, x.dtype)                                # a decode step
        else:
            rope = self.rotary(torch.arange(start, start + input_ids.shape[1], device=input_ids.device))
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        if self.recorder is not None:
            self.recorder.start_step(input_ids.numel())
        predict = self.prefetch_next_layer or self.recorder is not None
        threshold = self.prefetch_threshold if self.prefetch_next_layer else None
        first = self.layers[0] if self.layers else None
        if predict and first is not None and isinstance(first.mlp, StreamingMoE):
            # the first layer has no layer before it: its experts are guessed from the token's
            # embedding, before its attention runs (the read overlaps only that attention)
            b, t, hidden = x.shape
            first.mlp.guess_ahead(first.post_attention_layernorm(x).reshape(b * t, hidden),   # [N, H]
                                  self.guess_width, threshold)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1] if predict and i + 1 < len(self.layers) else None
            x = layer(x, rope, cache, start, nxt, threshold, self.guess_width)
        logits = self._fused_head(x, cache) if cache is not None else None
        return logits if logits is not None else self.lm_head(self.norm(x)).float()

    def _fused_head(self, x: torch.Tensor, cache: KVCache) -> Optional[torch.Tensor]:
        # a bf16 CPU decode token's final norm and lm_head in one native call (decode_layer.head),
        # the same logits; None where it does not apply (see DecoderLayer.attention_half). The
        # plan is checked once per frozen cache (generate's), as the layers' are
        if x.shape[0] != 1 or x.shape[1] != 1 or x.dtype != torch.bfloat16 or torch.is_grad_enabled():
            return None
        if self._head_trust.holds(cache):
            return decode_layer.head(self._head, x)
        logits = self._checked_head(x)
        if logits is not None:
            self._head_trust.grant(cache, [self._modules["norm"], self._modules["lm_head"]])
        return logits

    def thaw(self) -> None:
        """Trust no frozen KV cache any more (generate's end): the fused calls check their plans
        on the next decode step again and hold no weights' old memory (_FrozenTrust)."""
        self._head_trust.clear()
        for layer in self.layers:
            layer._trust.clear()

    def lease_experts(self):
        """Lease the store's experts for single-sequence decode steps (generate's, and the
        server's while one request decodes alone): where the store's L1 has a slot for every
        expert (a resident store: nothing is evicted), every expert it holds is pinned at once
        and each MoE layer's router and experts run in one call a step with no store call
        (decode_moe.LeasedLayer); experts loaded later join at the first step that misses them.
        Returns the lease (for release_lease), or None: a store with fewer slots than experts,
        routing recorded or guessed ahead (prefetch: the general path does those), or a lease
        already held by another caller of this model. A subclass's MoE (a shared expert), one
        whose forward is replaced, or a hooked one is not leased (a route replaced on the
        instance, as bench decode replays a trace, is called each step and read through the
        lease). The caller must call release_lease(lease) when its decode steps end."""
        if (self._lease is not None or self.prefetch_next_layer or self.recorder is not None
                or not hasattr(self.store, "lease_resident")):
            return None
        lease = self.store.lease_resident()
        if lease is None:
            return None
        self._lease = lease
        for layer in self.layers:
            mlp = layer._modules["mlp"]
            if type(mlp) is StreamingMoE and "forward" not in vars(mlp) and not _hooked([mlp]):
                cfg = mlp.cfg
                layer._leased = decode_moe.leased_layer(lease, self.store, mlp.layer, cfg.expert_names, cfg.top_k,
                                                        cfg.norm_topk_prob, cfg.num_experts, vars(mlp).get("route"))
        return lease

    def release_lease(self, lease) -> None:
        """End the lease that lease_experts returned (None: nothing to do; only its taker's lease
        is released): the layers read through the store's usual path again and every slot of the
        lease is unpinned."""
        if lease is None or self._lease is not lease:
            return
        for layer in self.layers:
            layer._leased = None
        self._lease = None
        lease.release()

    def _checked_head(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        norm, lm_head = self._modules["norm"], self._modules["lm_head"]
        plan = _kernel_plan(lm_head)
        if plan is None or _hooked([norm, lm_head]):
            return None
        weight = norm._parameters["weight"]
        key = (plan, weight.data_ptr(), norm.eps)
        if self._head is None or self._head.key != key:
            self._head = decode_layer.head_plan(key, norm=weight, eps=norm.eps, lm_head=plan)
        return None if self._head is None else decode_layer.head(self._head, x)

    @torch.no_grad()
    def decode_batch(self, tokens: list[int], caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """The next-token logits float32 [B, V] of B sequences, each fed one token at its own
        position with its own KV cache (continuous batching: moestream serve). One sequence
        takes generate's decode step (the fused calls, trusting a frozen cache after its first
        step, and the experts' lease where one is held)."""
        dev = self.embed_tokens.weight.device
        if len(tokens) == 1:
            return self(torch.tensor([tokens], device=dev), caches[0], positions[0])[:, -1]     # [1, V]
        x = self.embed_tokens(torch.tensor(tokens, device=dev))[:, None, :]      # [B, 1, H]
        ropes = [self.rotary.at(p, x.dtype) for p in positions]
        for layer in self.layers:
            x = layer.forward_ragged(x, ropes, caches, positions)
        return self.lm_head(self.norm(x[:, 0])).float()

    def new_cache(self, max_len: int, frozen: bool = False) -> KVCache:
        """A KV cache for one sequence of up to `max_len` positions; `frozen` as KVCache's (only
        for a caller that owns the model while the cache lives: the server's scheduler)."""
        return KVCache(self.cfg.num_layers, 1, self.cfg.num_kv_heads, max_len, self.cfg.head_dim,
                       self.embed_tokens.weight.dtype, self.embed_tokens.weight.device, frozen=frozen)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, *,
                 eos_token_id: Optional[int] = None, on_token=None, generator: Optional[torch.Generator] = None,
                 timings: Optional[dict] = None) -> torch.Tensor:
        """Extend input_ids [B, T] by up to `max_new_tokens` tokens -> [B, T + n]. temperature 0
        is greedy. Stops early when every sequence produced `eos_token_id`. `on_token(ids [B])`
        is called as each token is produced; `timings` (a dict) receives prefill/decode seconds.
        The model's weights, modules and hooks must not change while it runs (from `on_token`, or
        another thread): its fused decode calls check them on the first decode step only."""
        b, t = input_ids.shape
        if max_new_tokens < 1 or t + max_new_tokens > self.cfg.max_position_embeddings:
            raise UsageError(f"a {t}-token prompt plus max_new_tokens={max_new_tokens} does not fit the model's "
                             f"context of {self.cfg.max_position_embeddings} positions (max_new_tokens at most "
                             f"{self.cfg.max_position_embeddings - t})")
        dev = self.embed_tokens.weight.device
        cache = KVCache(self.cfg.num_layers, b, self.cfg.num_kv_heads, t + max_new_tokens, self.cfg.head_dim,
                        self.embed_tokens.weight.dtype, dev, frozen=True)
        ids = input_ids.to(dev)
        lease = None
        t0 = time.perf_counter()
        try:
            logits = self(ids, cache, 0)[:, -1]                                  # [B, V]
            t1 = time.perf_counter()
            if b == 1 and max_new_tokens > 1:
                lease = self.lease_experts()
            out = [ids]
            done = torch.zeros(b, dtype=torch.bool, device=dev)
            pos = t
            for step in range(max_new_tokens):
                nxt = sample(logits, temperature, generator=generator)             # [B]
                out.append(nxt[:, None])
                if on_token is not None:
                    on_token(nxt)
                if eos_token_id is not None:
                    done |= nxt == eos_token_id
                    if bool(done.all()):
                        break
                if step + 1 == max_new_tokens:
                    break
                logits = self(nxt[:, None], cache, pos)[:, -1]
                pos += 1
        finally:
            self.thaw()
            self.release_lease(lease)
        if timings is not None:
            timings.update(prefill_seconds=t1 - t0, prefill_tokens=b * t, decode_seconds=time.perf_counter() - t1,
                           decode_tokens=b * (len(out) - 1))
        return torch.cat(out, dim=1)
