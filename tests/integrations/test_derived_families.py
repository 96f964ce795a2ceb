"""transformers MoE families moestream has no record of: the converter derives each one's expert
layout from transformers itself (integrations/transformers.derive_family), the store carries the
record, and transformers' own classes run it with the experts streaming from the store. Logits
against the same random-initialised model in transformers (fp32), for every family below."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import moestream
from moestream.errors import ConvertError, FormatError
from moestream.formats.families import FAMILIES, Family

from ..conftest import retyped_checkpoint

#: sizes every small test model takes, where its config class has the field
SMALL = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, expert_intermediate_size=32,
             shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=256, max_position_embeddings=512, num_experts_per_tok=2, moe_topk=2, top_k=2,
             first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, sliding_window=16, num_shared_experts=1, n_shared_experts=1,
             moe_shared_expert_intermediate_size=32, dense_intermediate_size=96, decoder_sparse_step=1)
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_routed_experts")

#: family -> what its small config sets beyond SMALL. Per-expert checkpoints (experts.{e}.gate_proj
#: ...) and fused ones (GraniteMoE's input_linear, ZAYA's and HY-V4's gate_up_proj) both appear.
DERIVED = {
    "afmoe": {}, "axk2": dict(num_key_value_heads=4), "cohere2_moe": {}, "deepseek_v2": {}, "dots1": {},
    "ernie4_5_moe": {}, "exaone_moe": {}, "flex_olmo": dict(pad_token_id=0), "glm4_moe_lite": {}, "granitemoe": {},
    "granitemoe_swa": {}, "granitemoeshared": {}, "hunyuan_v1_moe": {}, "hy_v3": {}, "hy_v4": dict(pad_token_id=0),
    "kolibri1": {}, "laguna": {}, "mellum": {}, "mimo_v2_flash": {}, "minicpm5_moe": {}, "minimax": {}, "minimax_m2": {},
    "phimoe": {}, "solar_open": {}, "zaya": dict(num_experts_per_tok=1),
}


def small_config(family: str, **extra):
    defaults = CONFIG_MAPPING[family]().to_dict()
    kw = {k: v for k, v in SMALL.items() if k in defaults}
    kw.update({k: 8 for k in EXPERT_COUNT_KEYS if k in defaults})
    # per-layer lists (layer types, MoE-layer masks) cut to the two layers
    kw.update({k: v[:2] for k, v in defaults.items()
               if isinstance(v, list) and len(v) == defaults.get("num_hidden_layers") and k not in kw})
    kw.update(DERIVED.get(family, {}), **extra)
    return CONFIG_MAPPING[family](**kw)


def build(family: str, path, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small_config(family, **extra), dtype=torch.float32).eval()
    with torch.no_grad():   # some families start their routers at zero: every token would pick the same experts
        for p in model.parameters():
            if p.dim() >= 2 and p.std() == 0:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def test_the_families_listed_have_no_record_of_ours():
    assert len(DERIVED) >= 20 and not set(DERIVED) & set(FAMILIES)


@pytest.mark.parametrize("family", sorted(DERIVED))
def test_a_family_without_a_record_converts_and_matches_transformers(family, tmp_path):
    ref = build(family, tmp_path / "ckpt")
    store = moestream.convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    with moestream.StoreReader(store) as r:
        fam = r.index.family
        assert fam is not None and fam.derived and fam.name == family == r.architecture
        n_experts = fam.num_experts(r.config)
        assert len(r.index.extents) == len(r.layers) * n_experts and r.layers
        one_expert = min(reg.decoded_length for reg in r.index.extents.values())
        assert r.verify_all() == []
    model = moestream.from_pretrained(store, device_budget=3 * one_expert, host_budget=0)
    try:
        assert type(model) is type(ref)
        ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids).logits
        assert (got - want).abs().max().item() < 1e-4
        assert model.moestream_store.stats()["evictions_l1"] > 0        # streamed, not held
    finally:
        model.moestream_store.close()
    # and the experts count: without them the logits move far beyond the tolerance
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".experts." in name and "shared" not in name:
                p.zero_()
        assert (ref(ids).logits - want).abs().max().item() > 1e-3


def test_a_derived_family_quantized_matches_its_dequantized_run(tmp_path):
    build("solar_open", tmp_path / "ckpt")
    store = moestream.convert(tmp_path / "ckpt", tmp_path / "store", quant="int8", progress=False)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    logits = {}
    for mode in ("quantized", "dequantized"):
        model = moestream.from_pretrained(store, expert_compute=mode)
        with torch.no_grad():
            logits[mode] = model(ids).logits
        model.moestream_store.close()
    assert (logits["quantized"] - logits["dequantized"]).abs().max().item() < 2e-3


def test_a_family_transformers_has_no_experts_for_is_named(checkpoints, tmp_path):
    src = retyped_checkpoint(checkpoints["mixtral"], tmp_path / "c", "llama", "LlamaForCausalLM")
    with pytest.raises(ConvertError, match=r"config.json: unsupported architecture 'LlamaForCausalLM' \(model_type "
                                           r"'llama'\): transformers' LlamaForCausalLM has no experts module"):
        moestream.convert(src, tmp_path / "s", progress=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="transformers cannot build a causal LM from it"):
        moestream.convert(src, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_a_family_whose_dense_tensors_transformers_converts_is_refused(tmp_path):
    # Kimi-Linear's attention convolutions are renamed and reshaped on load: not a plain rename
    build("kimi_linear", tmp_path / "ckpt", pad_token_id=0)
    with pytest.raises(ConvertError, match="could not load this checkpoint's dense tensors: tensor "
                                           r"model\.layers\.\d\.self_attn\.\w*conv1d\.weight"):
        moestream.convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def test_a_carried_family_record_is_checked(tmp_path):
    build("solar_open", tmp_path / "ckpt")
    store = moestream.convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    with moestream.StoreReader(store) as r:
        fam = r.index.family
    assert Family.from_json(json.loads(json.dumps(fam.to_json())), "family") == fam
    for field, value in (("gate_up_down", ["gate_proj", "up_proj", "nonesuch"]), ("tensor_shapes", [["up_proj", "x"]]),
                         ("derived", 1), ("expert_tensors", [])):
        doc = dict(fam.to_json(), **{field: value})
        with pytest.raises(ValueError, match=f"family: field '{field}'"):
            Family.from_json(doc, "family")
    doc = fam.to_json()
    del doc["expert_prefix"]
    with pytest.raises(ValueError, match="missing field 'expert_prefix'"):
        Family.from_json(doc, "family")


def test_a_store_whose_family_record_disagrees_with_its_index_is_refused(tmp_path):
    from moestream.formats.index import StoreIndex
    build("solar_open", tmp_path / "ckpt")
    store = moestream.convert(tmp_path / "ckpt", tmp_path / "store", progress=False)
    with moestream.StoreReader(store) as r:
        idx, sizes = r.index, [s for s in r.index.files]
    doc = json.loads(idx.to_json())
    doc["family"]["name"] = "qwen3_moe"
    with pytest.raises(FormatError, match="family: the record describes"):
        StoreIndex.from_json(json.dumps(doc).encode(), path="f", offset=0, file_sizes=sizes)
    doc = json.loads(idx.to_json())
    doc["family"] = "solar_open"
    with pytest.raises(FormatError, match="family: expected an object"):
        StoreIndex.from_json(json.dumps(doc).encode(), path="f", offset=0, file_sizes=sizes)
    assert StoreIndex.from_json(idx.to_json(), path="f", offset=0, file_sizes=sizes).family == idx.family
