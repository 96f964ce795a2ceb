"""MXFP4 checkpoints in (formats/mxfp4.py): a GPT-OSS checkpoint MXFP4-quantized the way the
published one is, its experts decoded exactly as transformers' own `convert_moe_packed_tensors`
decodes them, its logits against transformers on the same weights, and half pairs refused."""
import shutil

import numpy as np

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


def test_keep_stores_the_checkpoints_own_blocks_and_the_model_matches(mxfp4_pair, tmp_path):
    """`--quant keep`: each expert's MXFP4 blocks and exponents byte for byte (mxfp4:32, the
    transpose of the model's [in, out] matrix; its biases beside them as they are), 17 bytes per 32
    weights, held so in the cache and decoded exactly as transformers decodes them; the model's
    logits match transformers on the decoded weights."""
    from safetensors.numpy import load_file as load_np
    q, ref_dir, deq = mxfp4_pair
    store = moestream.convert(q, tmp_path / "s", progress=False)
    ck = load_np(q / "model.safetensors")
    with StoreReader(store) as r:
        assert "quantization_config" not in r.config and r.index.quant == "mxfp4"
        weights = stored = 0
        for layer in r.layers:
            for e in range(r.experts_per_layer):
                region = r.extent(layer, e)
                raw = np.frombuffer(r.read_region(region, (layer, e)), np.uint8)   # no zstd: 4-bit codes do not shrink
                assert region.chain == ("mxfp4:32",)
                slices = {t.name: t for t in region.tensors}
                for t in ("gate_up_proj", "down_proj"):
                    s = slices[t]
                    assert s.transposed and not s.raw and s.shape == tuple(deq[PREFIX.format(layer) + t].shape[1:])
                    name = PREFIX.format(layer) + t
                    want = ck[name + "_blocks"][e].tobytes() + ck[name + "_scales"][e].tobytes()
                    assert raw[s.offset:s.offset + s.length].tobytes() == want
                    weights += s.numel
                    stored += s.length
                assert slices["gate_up_proj_bias"].raw and slices["down_proj_bias"].raw
                w = r.expert(layer, e)
                for t in ("gate_up_proj", "down_proj"):
                    want = deq[PREFIX.format(layer) + t][e]
                    assert w[t].dtype == torch.bfloat16 and torch.equal(w[t].float(), want)   # exact in bf16
        assert stored / weights == 17 / 32
        decoded = r.extent(r.layers[0], 0).decoded_length            # the expert as bf16 weights
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    model = moestream.from_pretrained(store, device_budget="64MiB", host_budget=0)
    try:
        torch.manual_seed(6)
        ids = torch.randint(0, ref.config.vocab_size, (2, 10))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids).logits
        stats = model.moestream_store.stats()
    finally:
        model.moestream_store.close()
    assert (got.float() - want).abs().max().item() < 1e-4
    # the cache held the experts as stored (17/32 bytes a weight and the biases), not as bf16
    assert stats["evictions_l1"] == 0 and 0 < stats["l1_bytes"] < 0.4 * stats["misses"] * decoded


@pytest.mark.parametrize("quant", ["bf16", "int4"])
def test_other_quants_decode_the_blocks_first(mxfp4_pair, tmp_path, quant):
    """`--quant bf16` decodes the blocks exactly (every MXFP4 value is a bf16); `--quant int4`
    quantizes those values again (a stated error)."""
    q, ref_dir, deq = mxfp4_pair
    store = moestream.convert(q, tmp_path / "s", quant=quant, progress=False)
    with StoreReader(store) as r:
        w = r.expert(r.layers[0], 1)
        want = deq[PREFIX.format(r.layers[0]) + "gate_up_proj"][1]
        err = ((w["gate_up_proj"].float() - want).norm() / want.norm()).item()
    assert err == 0.0 if quant == "bf16" else 0 < err < 0.15


def test_a_nan_exponent_is_refused_naming_the_tensor(mxfp4_pair, tmp_path):
    q, _, _ = mxfp4_pair
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.experts.down_proj_scales"][3, 2, 1] = 255
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.mlp\.experts\.down_proj.*_scales holds the NaN exponent 255"):
        moestream.convert(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


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
