"""Mixtral: softmax router over all experts, top-k, weights renormalised to sum to one;
experts are SwiGLU with w1 (gate), w3 (up), w2 (down); no biases, no qk norm."""
from __future__ import annotations

from .common import Attention, CausalLM, DecoderLayer, ModelConfig, StreamingMoE

CHECKPOINT_RENAMES = {".block_sparse_moe.": ".mlp."}


def build(cfg: ModelConfig, store, hf: dict) -> CausalLM:
    return CausalLM(cfg, [DecoderLayer(cfg, Attention(cfg, i), StreamingMoE(cfg, i, store))
                          for i in range(cfg.num_layers)], store)
