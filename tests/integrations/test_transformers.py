"""transformers' own model classes with the "moestream" experts implementation: logits and
greedy tokens against the same checkpoint loaded by transformers, experts never materialised."""
import io

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

import moestream
from moestream.compute.generation import generate_text
from moestream.errors import MoestreamError
from moestream.integrations.transformers import load_tokenizer, moestream_experts_forward

from ..conftest import FAMILIES

EXPERT_BYTES = 3 * 64 * 48 * 4     # one expert of the conftest models, fp32


#: families moestream has no native forward for: transformers runs them
TRANSFORMERS_ONLY = ["deepseek_v3", "glm4_moe", "qwen3_next", "gpt_oss"]


@pytest.fixture(scope="module")
def checkpoints_all(checkpoints, tmp_path_factory):
    from moestream.demo import build_checkpoint
    root = tmp_path_factory.mktemp("hf-ckpt")
    return {**checkpoints, **{f: build_checkpoint(f, root / f, seed=9) for f in TRANSFORMERS_ONLY}}


@pytest.fixture(scope="module")
def stores(checkpoints_all, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: moestream.convert(c, root / f, progress=False) for f, c in checkpoints_all.items()}


@pytest.mark.parametrize("family", FAMILIES + TRANSFORMERS_ONLY)
def test_transformers_model_streams_its_experts_from_the_store(checkpoints_all, stores, family):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints_all[family], dtype=torch.float32).eval()
    model = moestream.from_pretrained(stores[family], device_budget=3 * EXPERT_BYTES, host_budget=0)
    try:
        assert type(model) is type(ref)
        ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids).logits
        assert (got - want).abs().max().item() < 1e-4
        prompt = ids[:1, :6]
        kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
        st = model.moestream_store.stats()
        assert st["evictions_l1"] > 0 and st["misses"] > len(model.moestream_store.index.extents)   # re-read
        assert st["l1_peak"] <= 3 * EXPERT_BYTES
        # the experts' parameters were never allocated: only the dense ones exist
        with moestream.StoreReader(stores[family]) as r:
            dense = sum(t.length for reg in r.index.dense.values() for t in reg.tensors)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        ref_params = sum(p.numel() * p.element_size() for p in ref.parameters())
        assert params <= dense + 64 and ref_params - params >= sum(
            reg.decoded_length for reg in moestream.StoreReader(stores[family]).index.extents.values())
    finally:
        model.moestream_store.close()


def test_sampling_streamers_and_the_carried_tokenizer(stores, tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(stores["mixtral"])        # the plain copies next to the store's files
    assert AutoConfig.from_pretrained(stores["mixtral"]).model_type == "mixtral"
    # a store without them (written before they existed): from the carried, checksummed blobs
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in stores["mixtral"].glob("experts-*.moe"):
        (bare / p.name).symlink_to(p)
    assert load_tokenizer(bare)("Experts stream").input_ids == tok("Experts stream").input_ids
    model = moestream.from_pretrained(stores["mixtral"], device_budget=3 * EXPERT_BYTES, host_budget=0)
    try:
        ids = tok("Experts stream", return_tensors="pt").input_ids
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=0.9,
                             streamer=streamer, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + 8
        assert "".join(streamer) == tok.decode(out[0, ids.shape[1]:])
    finally:
        model.moestream_store.close()


def test_engines_agree_on_the_cli_path(stores):
    texts = {}
    for engine in ("native", "transformers"):
        out, err = io.StringIO(), io.StringIO()
        report = generate_text(str(stores["qwen3_moe"]), "Experts stream", max_new_tokens=10,
                               device_budget=3 * EXPERT_BYTES, host_budget=0, engine=engine, out=out, err=err)
        texts[engine] = (out.getvalue(), report["stats"]["misses"], report["stats"]["hits_l1"],
                         report["stats"]["requests"])
        assert f"engine {engine}" in err.getvalue()
    (text_n, misses_n, hits_n, asked_n), (text_t, misses_t, hits_t, asked_t) = texts["native"], texts["transformers"]
    assert text_n == text_t and asked_n == asked_t          # same text, the same experts asked for
    # ... and the same reads but for the prefill's timing: with 3 slots for a layer's 8 routed
    # experts, how many misses have landed when the loop next fetches (and so which slots are
    # pinned when the store evicts) depends on the threads' timing, in either engine: 45 or 46
    # reads of 50 requests, seen for the same engine run after run
    assert abs(misses_n - misses_t) <= 2 and misses_n + hits_n == misses_t + hits_t


def test_a_family_without_a_native_forward_runs_through_transformers(stores):
    with pytest.raises(MoestreamError, match="--engine transformers"):
        moestream.load_model(stores["glm4_moe"], device_budget=3 * EXPERT_BYTES)
    out, err = io.StringIO(), io.StringIO()
    generate_text(str(stores["glm4_moe"]), "Experts", max_new_tokens=4, device_budget=3 * EXPERT_BYTES,
                  host_budget=0, out=out, err=err)
    assert "engine transformers" in err.getvalue()


@pytest.fixture(scope="module")
def int4_stores(checkpoints_all, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-int4")
    # group 16: the tiny configs' expert widths (48) are no multiple of the default 64
    return {f: moestream.convert(checkpoints_all[f], root / f, quant="int4", group_size=16, progress=False)
            for f in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")}


@pytest.mark.parametrize("family,one_call", [("qwen3_moe", True), ("mixtral", True), ("deepseek_v3", True),
                                             ("gpt_oss", False)])
def test_plain_swiglu_experts_take_one_kernel_call_a_layer(int4_stores, monkeypatch, family, one_call):
    """Experts that compute down(silu(gate) * up) take moestream's own layer kernel, one call a
    layer, with the logits of the per-expert path (three kernel calls and the module's own
    gating per expert); GPT-OSS's clamped, biased gating keeps the per-expert path."""
    from moestream.compute.models import common
    from moestream.integrations import transformers as plug
    calls = []
    real, real_at = common.moe_layer, common.moe_layer_at
    monkeypatch.setattr(common, "moe_layer", lambda x, experts, out: calls.append(len(experts)) or real(x, experts, out))
    # resident experts are read where the store's slots hold them: the same kernel, one call
    monkeypatch.setattr(common, "moe_layer_at", lambda x, held, *a: calls.append(len(held)) or real_at(x, held, *a))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    logits = {}
    for path in ("per expert", "as bound"):
        model = moestream.from_pretrained(int4_stores[family], device_budget="64MiB", host_budget=0)
        try:
            moes = [m for m in model.modules() if getattr(m, "_moestream", None)]
            assert moes and all(m._moestream[4] == one_call for m in moes)
            if path == "per expert":
                for m in moes:
                    m._moestream = m._moestream[:4] + (False,)
            with torch.no_grad():
                model(ids)                     # the experts land (64 MiB hold them all) in arrival order
                calls.clear()
                logits[path] = model(ids).logits
        finally:
            model.moestream_store.close()
        # all resident: every expert a layer's 20 tokens route to (at least top-k) in its one call
        assert len(calls) == (len(moes) if path == "as bound" and one_call else 0)
        assert all(k >= model.config.num_experts_per_tok for k in calls)
    ref, got = logits["per expert"], logits["as bound"]
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item() + 1e-5


def test_an_experts_module_without_a_store_is_a_clear_error():
    class Bare:
        pass
    with pytest.raises(MoestreamError, match="moestream.from_pretrained"):
        moestream_experts_forward(Bare(), torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


@pytest.mark.parametrize("family", TRANSFORMERS_ONLY)
def test_dense_tensors_transformers_cannot_load_are_refused_at_convert(checkpoints_all, tmp_path, family):
    """The converter asks transformers' own model (built on the meta device) which dense tensors
    it loads, for the families moestream has no forward of (issue 23 item 4)."""
    import shutil
    from safetensors.torch import load_file, save_file
    src = tmp_path / "c"
    shutil.copytree(checkpoints_all[family], src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mystery.weight"] = torch.zeros(2)
    sd.pop("model.norm.weight")
    save_file(sd, src / "model.safetensors")
    with pytest.raises(moestream.ConvertError, match=r"tensor model\.norm\.weight is missing.*"
                       r"tensor model\.layers\.0\.mystery\.weight is not part of transformers' \w+"):
        moestream.convert(src, tmp_path / "s", progress=False)
