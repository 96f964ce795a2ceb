"""OLMoE: RMSNorm over the whole query and key projections (all heads at once) before the
head split; optional clip_qkv; softmax router, top-k (renormalised only with
norm_topk_prob, false in released models); every layer is MoE."""
from __future__ import annotations

from .common import Attention, CausalLM, DecoderLayer, ModelConfig, StreamingMoE


def build(cfg: ModelConfig, store, hf: dict) -> CausalLM:
    return CausalLM(cfg, [DecoderLayer(cfg, Attention(cfg, i, qk_norm="full"), StreamingMoE(cfg, i, store))
                          for i in range(cfg.num_layers)], store)
