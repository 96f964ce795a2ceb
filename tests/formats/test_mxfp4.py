"""MXFP4 checkpoints in (formats/mxfp4.py): a GPT-OSS checkpoint MXFP4-quantized the way the
published one is, its experts decoded exactly as transformers' own `convert_moe_packed_tensors`
decodes them, its logits against transformers on the same weights, and half pairs refused."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import moestream
from moestream.errors import ConvertError
from moestream.formats import StoreReader

from ..conftest import quantized_twins

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
PREFIX = "model.layers.{}.mlp.experts."


def _to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, C, R] as the model holds it -> blocks uint8 [E, R, C/32, 16], exponents uint8 [E, R, C/32]."""
    t = w.transpose(1, 2).float()                                            # [E, R, C]
    e, r, c = t.shape
    g = t.reshape(e, r, c // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0))                                 # amax / 2^exp <= 6
    scaled = g / torch.exp2(exp)[..., None]
    code = (scaled.abs()[..., None] - MAGNITUDES).abs().argmin(-1)           # nearest magnitude
    code = code | ((scaled < 0).to(torch.int64) << 3)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)      # even element in the low nibble
    return packed, (exp + 127).to(torch.uint8)


def mxfp4_twins(src, root):
    """(q, ref, deq): GPT-OSS checkpoint `src` with its experts MXFP4-quantized as the published one
    is (q), and a plain checkpoint of their values as transformers decodes them (ref, deq)."""
    def quantize(name, t):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        blocks, scales = _to_mxfp4(t)
        return ({name + "_blocks": blocks, name + "_scales": scales},
                convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))      # transformers' decode
    return quantized_twins(src, root, quantize, {"quant_method": "mxfp4",
                                                 "modules_to_not_convert": ["router", "self_attn", "lm_head"]})


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    from moestream.demo import build_checkpoint
    root = tmp_path_factory.mktemp("mxfp4")
    src = build_checkpoint("gpt_oss", root / "src", seed=3, moe_intermediate_size=64)   # blocks of 32 along each width
    return mxfp4_twins(src, root)


def test_mxfp4_experts_decode_exactly_as_transformers_and_the_model_matches(mxfp4_pair, tmp_path):
    q, ref_dir, deq = mxfp4_pair
    store = moestream.convert(q, tmp_path / "s", progress=False)
    with StoreReader(store) as r:
        assert "quantization_config" not in r.config
        for layer in r.layers:
            for e in (0, r.experts_per_layer - 1):
                w = r.expert(layer, e)
                for t in ("gate_up_proj", "down_proj"):
                    want = deq[PREFIX.format(layer) + t][e]
                    assert w[t].dtype == torch.bfloat16 and torch.equal(w[t].float(), want)   # exact in bf16
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    model = moestream.from_pretrained(store, device_budget="64MiB", host_budget=0)
    try:
        torch.manual_seed(6)
        ids = torch.randint(0, ref.config.vocab_size, (2, 10))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids).logits
    finally:
        model.moestream_store.close()
    assert (got.float() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("drop,needle", [("_scales", "has no model.layers.0.mlp.experts.down_proj_scales"),
                                         ("_blocks", "uint8 tensor without its MXFP4 blocks")])
def test_half_an_mxfp4_pair_is_refused_naming_it(mxfp4_pair, tmp_path, drop, needle):
    q, _, _ = mxfp4_pair
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.0.mlp.experts.down_proj" + drop]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=needle):
        moestream.convert(bad, tmp_path / "out", progress=False)
