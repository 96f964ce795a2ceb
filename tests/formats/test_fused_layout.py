"""Fused expert checkpoints (GPT-OSS: gate_up_proj [E, H, 2I] interleaved, biases): one extent per
(layer, expert) holding its rows of every fused tensor, bit-exact against safetensors."""
import json

import pytest
import torch
from safetensors import safe_open

import moestream
from moestream.errors import ConvertError
from moestream.formats import StoreReader


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from moestream.demo import build_checkpoint
    return build_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "ckpt")


def test_each_extent_holds_its_rows_of_the_fused_tensors(gpt_oss, tmp_path):
    store = moestream.convert(gpt_oss, tmp_path / "s", progress=False)
    with StoreReader(store) as r, safe_open(gpt_oss / "model.safetensors", "pt") as f:
        assert r.index.architecture == "gpt_oss" and r.layers == [0, 1]
        assert r.index.expert_tensors == ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        for layer in r.layers:
            for e in range(r.experts_per_layer):
                got = r.expert(layer, e)
                for t in r.index.expert_tensors:
                    want = f.get_tensor(f"model.layers.{layer}.mlp.experts.{t}")[e]
                    assert torch.equal(got[t], want)
        # everything else (router with its bias, attention sinks, norms) is dense
        assert "model.layers.0.mlp.router.bias" in r.index.dense and "model.layers.0.self_attn.sinks" in r.index.dense
        assert not any("experts" in name for name in r.index.dense)
        assert r.verify_all() == []


def test_a_fused_tensor_of_the_wrong_shape_is_named(gpt_oss, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in gpt_oss.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj has shape"):
        moestream.convert(bad, tmp_path / "out", progress=False)
