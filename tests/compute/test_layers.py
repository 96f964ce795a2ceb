"""Pieces of the forward checked against transformers: RoPE scaling variants, dense MLP layers
among MoE layers."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import moestream
from moestream.compute import load_model
from moestream.compute.models.common import ModelConfig, rope_inv_freq
from moestream.demo import build_checkpoint, tiny_config
from moestream.formats.families import FAMILIES


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
     "beta_fast": 16, "beta_slow": 2},
])
def test_rope_matches_transformers(rope):
    hf = tiny_config("qwen3_moe", rope_parameters=rope, max_position_embeddings=256)
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu") if rope["rope_type"] != "default" else \
        (1.0 / (rope["rope_theta"] ** (torch.arange(0, hf.head_dim, 2).float() / hf.head_dim)), 1.0)
    cfg = ModelConfig.from_hf(hf.to_dict(), FAMILIES["qwen3_moe"], [0, 1], 8)
    inv, scale = rope_inv_freq(cfg)
    assert torch.allclose(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


def test_unknown_rope_type_is_refused():
    hf = tiny_config("qwen3_moe").to_dict()
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    cfg = ModelConfig.from_hf(hf, FAMILIES["qwen3_moe"], [0, 1], 8)
    with pytest.raises(moestream.MoestreamError, match="longrope"):
        rope_inv_freq(cfg)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_dense_mlp_layers_between_moe_layers(tmp_path, family):
    ck = build_checkpoint(family, tmp_path / "c", num_hidden_layers=3, mlp_only_layers=[1], with_tokenizer=False)
    store = moestream.convert(ck, tmp_path / "s", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    model = load_model(store, device_budget="1MiB", host_budget=0)
    try:
        assert model.store.layers == [0, 2]
        ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (ref(ids).logits - model(ids)).abs().max().item() < 1e-4
    finally:
        model.store.close()


def test_load_model_is_exported_lazily():
    import subprocess
    import sys
    code = ("import sys, moestream; assert 'moestream.compute.loader' not in sys.modules; "
            "from moestream import load_model; from moestream.compute import load_model as l2; "
            "assert load_model is l2")
    subprocess.run([sys.executable, "-c", code], check=True)
