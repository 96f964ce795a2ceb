"""Qwen2-MoE: biased q/k/v projections; softmax router, top-k (renormalised only with
norm_topk_prob); a shared expert on every token, scaled by sigmoid(shared_expert_gate(x));
layers listed in mlp_only_layers (or off the decoder_sparse_step) use a dense MLP."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .common import Attention, CausalLM, DecoderLayer, DenseMLP, ModelConfig, StreamingMoE


class SharedExpertMoE(StreamingMoE):
    def __init__(self, cfg: ModelConfig, layer: int, store, shared_intermediate: int):
        super().__init__(cfg, layer, store)
        self.shared_expert = DenseMLP(cfg.hidden_size, shared_intermediate)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, logits: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:   # x [N, H]
        routed = super().forward(x, logits)
        out = routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if residual is None else residual + out.view(residual.shape)


def build(cfg: ModelConfig, store, hf: dict) -> CausalLM:
    shared_intermediate = hf["shared_expert_intermediate_size"]

    def mlp(i: int) -> nn.Module:
        if i in cfg.moe_layers:
            return SharedExpertMoE(cfg, i, store, shared_intermediate)
        return DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)
    return CausalLM(cfg, [DecoderLayer(cfg, Attention(cfg, i, qkv_bias=True), mlp(i)) for i in range(cfg.num_layers)],
                    store)
