"""Qwen3-MoE: RMSNorm on each query and key head (over the head dim) before RoPE; no biases;
softmax router, top-k renormalised when norm_topk_prob (true in released models); no
shared expert; mlp_only_layers use a dense MLP."""
from __future__ import annotations

from torch import nn

from .common import Attention, CausalLM, DecoderLayer, DenseMLP, ModelConfig, StreamingMoE


def build(cfg: ModelConfig, store, hf: dict) -> CausalLM:
    def mlp(i: int) -> nn.Module:
        if i in cfg.moe_layers:
            return StreamingMoE(cfg, i, store)
        return DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)
    return CausalLM(cfg, [DecoderLayer(cfg, Attention(cfg, i, qk_norm="head"), mlp(i)) for i in range(cfg.num_layers)],
                    store)
