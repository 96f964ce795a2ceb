"""FP8 block-scaled checkpoints in (formats/fp8.py): float8 codes decoded as torch decodes them,
a checkpoint FP8-quantized the way DeepSeek's are converted and run against transformers loading
the same FP8 checkpoint (its own dequantization) and the same weights dequantized, and every
malformed FP8 checkpoint refused naming the tensor."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moestream
from moestream.compute import load_model
from moestream.errors import ConvertError
from moestream.formats import StoreReader
from moestream.formats.fp8 import fp8_values

from ..conftest import quantized_twins, store_logits

BLOCK = [32, 32]     # the tiny models' widths (64, 48) are one and a half blocks: ragged blocks too
ALIGNED = [8, 8]     # blocks that divide every width (as 128 divides the published models' widths)
FP8_MAX = 448.0


@pytest.mark.parametrize("fmt,dtype", [("fp8e4m3", torch.float8_e4m3fn), ("fp8e5m2", torch.float8_e5m2)])
def test_every_float8_code_decodes_as_torch_decodes_it(fmt, dtype):
    want = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
    got = fp8_values(fmt)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])


def _fp8_quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """codes float8_e4m3fn and block multipliers float32, as DeepSeek's checkpoints hold them."""
    rows, cols = w.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    scale = torch.zeros(br, bc)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / FP8_MAX
    full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def _is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    # attention and expert projections, as the published FP8 checkpoints have them; embeddings,
    # lm_head, norms and routers stay in a float dtype
    return t.dim() == 2 and name.endswith("_proj.weight")


def _make_fp8_pair(src, root, block):
    """(FP8 checkpoint, the same weights dequantized to fp32 as a plain checkpoint)."""
    def quantize(name, t):
        if not _is_fp8_linear(name, t):
            return None
        codes, scale = _fp8_quantize(t.float(), block)
        full = scale.repeat_interleave(block[0], 0)[:t.shape[0]].repeat_interleave(block[1], 1)[:, :t.shape[1]]
        return {name: codes, name + "_scale_inv": scale}, codes.float() * full
    fp8, ref, _ = quantized_twins(src, root, quantize, {"quant_method": "fp8", "fmt": "e4m3",
                                                          "activation_scheme": "dynamic", "weight_block_size": block})
    return fp8, ref


@pytest.fixture(scope="module")
def fp8_pair(checkpoints, tmp_path_factory):
    return _make_fp8_pair(checkpoints["qwen3_moe"], tmp_path_factory.mktemp("fp8"), BLOCK)


def test_an_fp8_checkpoint_runs_as_transformers_runs_its_dequantized_weights(fp8_pair, tmp_path):
    fp8, ref_dir = fp8_pair
    store = moestream.convert(fp8, tmp_path / "exact", quant="fp32", progress=False)
    with StoreReader(store) as r:
        assert "quantization_config" not in r.config           # the store's weights are not FP8
        w = r.expert(0, 1)
    want_w = load_file(ref_dir / "model.safetensors")["model.layers.0.mlp.experts.1.gate_proj.weight"]
    assert torch.equal(w["gate_proj"], want_w)                  # the products, exactly
    assert "quantization_config" not in json.loads((store / "config.json").read_text())
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    torch.manual_seed(5)
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = ref(ids).logits
    got = store_logits(store, ids, device_budget="64MiB", host_budget=0)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])   # the native forward; transformers' engine
def test_an_fp8_checkpoint_runs_as_transformers_runs_it(checkpoints, tmp_path, family):
    """Against transformers loading the FP8 checkpoint itself (on a CPU its FineGrainedFP8
    dequantizes the weights). With blocks that divide every width: where a block is ragged,
    transformers 5.24 scales some rows or columns with the wrong block's multiplier (seen in
    Qwen3's fused gate/up and DeepSeek's q_a/q_b projections), so that case is checked against
    the dequantized weights above."""
    from moestream.demo import build_checkpoint
    src = checkpoints[family] if family in checkpoints else build_checkpoint(family, tmp_path / "src", seed=8)
    fp8, _ = _make_fp8_pair(src, tmp_path, ALIGNED)
    store = moestream.convert(fp8, tmp_path / "exact", quant="fp32", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
    if family == "qwen3_moe":
        model = load_model(store, device_budget="64MiB", host_budget=0)
    else:
        tf = moestream.from_pretrained(store, device_budget="64MiB", host_budget=0)
        model = lambda ids: tf(ids).logits                                      # noqa: E731
        model.store = tf.moestream_store
        model.generate = lambda prompt, n: tf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                      pad_token_id=ref.config.pad_token_id)
    try:
        torch.manual_seed(7)
        ids = torch.randint(0, ref.config.vocab_size, (2, 12))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids)
        prompt = ids[:1, :6]
        want_tokens = ref.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=ref.config.pad_token_id)
        got_tokens = model.generate(prompt, 12)
    finally:
        model.store.close()
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(got_tokens, want_tokens)


def test_fp8_kept_decodes_to_its_values_and_int8_quantizes_the_dequantized_values(fp8_pair, tmp_path):
    fp8, ref_dir = fp8_pair
    want_w = load_file(ref_dir / "model.safetensors")["model.layers.1.mlp.experts.0.down_proj.weight"]
    keep = moestream.convert(fp8, tmp_path / "keep", progress=False)
    with StoreReader(keep) as r:
        assert r.index.quant == "fp8e4m3"           # 32x32 blocks of 64- and 48-wide experts: groups of 16
        assert r.index.extents[(1, 0)].chain == ("fp8e4m3:16",)
        assert r.dense()["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
        assert torch.equal(r.expert(1, 0)["down_proj"], want_w.bfloat16())    # the products, rounded once
    int8 = moestream.convert(fp8, tmp_path / "int8", quant="int8", group_size=16, progress=False)
    with StoreReader(int8) as r:
        got = r.expert(1, 0)["down_proj"].float()
    assert ((got - want_w).norm() / want_w.norm()).item() < 0.01


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])   # the native forward; transformers' engine
@pytest.mark.parametrize("inter", [256, 192])     # experts two blocks of 128 wide; one and a half (ragged)
def test_fp8_experts_are_kept_as_the_checkpoints_bytes_and_run_as_transformers_runs_them(tmp_path, family, inter):
    """`--quant keep` of an FP8 checkpoint with DeepSeek's 128x128 blocks: every expert's codes are
    the checkpoint's bytes, its scales the block multipliers (each row of a block repeats them, one
    per group of the row), about a byte a weight; the store runs (bf16 compute, the experts
    multiplied as stored) as transformers runs the checkpoint in bf16, and greedy decoding gives
    its tokens. Against transformers' own FP8 load where the blocks divide the widths; with 192-wide
    experts transformers 5.25 dequantizes its fused experts (and DeepSeek's shared experts) with
    the wrong blocks' multipliers (seen, not ours), so there the reference is transformers on the
    exactly dequantized weights (the products, in float32)."""
    from moestream.demo import build_checkpoint
    src = build_checkpoint(family, tmp_path / "src", seed=9, hidden_size=256, moe_intermediate_size=inter)
    fp8, twin = _make_fp8_pair(src, tmp_path, [128, 128])
    store = moestream.convert(fp8, tmp_path / "keep", progress=False)
    state = load_file(fp8 / "model.safetensors")
    group = 128 if inter == 256 else 64                      # gcd of 128, 256 and the expert width
    weights = stored = 0
    with StoreReader(store) as r:
        assert r.index.quant == "fp8e4m3" and r.index.group_size == group
        for (layer, e), reg in r.index.extents.items():
            assert reg.chain == (f"fp8e4m3:{group}",)
            payload = np.frombuffer(r.read_region(reg), np.uint8)
            for t in reg.tensors:
                name = f"model.layers.{layer}.mlp.experts.{e}.{t.name}.weight"
                codes, multipliers = state[name].view(torch.uint8).numpy(), state[name + "_scale_inv"].numpy()
                rows, cols = t.shape
                got = payload[t.offset:t.offset + t.length]
                assert np.array_equal(got[:rows * cols].reshape(rows, cols), codes)          # byte for byte
                scales = got[rows * cols:].view(np.float32).reshape(rows, cols // group)
                assert np.array_equal(scales, multipliers[np.arange(rows)[:, None] // 128,
                                                          np.arange(0, cols, group)[None, :] // 128])
                weights += rows * cols
            stored += reg.length
    assert weights <= stored <= weights * (1 + 4 / group) + 4096 * len(r.index.extents)   # 1 byte a weight + scales
    ref = AutoModelForCausalLM.from_pretrained(fp8 if inter == 256 else twin, dtype=torch.bfloat16).eval()
    if family == "qwen3_moe":
        # dense layers as stored (bf16): load_model's default holds them in int8 on a CPU, its own rounding
        model = load_model(store, device_budget="64MiB", host_budget=0, dense_quant=None)
        forward, close = model, model.store.close
        generate = lambda prompt, n: model.generate(prompt, n)                          # noqa: E731
        assert model.store.holds_quantized(model.store.index.extents[(0, 0)])   # the kernels read fp8 in place
    else:
        tf = moestream.from_pretrained(store, device_budget="64MiB", host_budget=0)
        forward, close = (lambda ids: tf(ids).logits), tf.moestream_store.close        # noqa: E731
        generate = lambda prompt, n: tf.generate(prompt, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                                 do_sample=False, pad_token_id=0)
    try:
        ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            want, got = ref(ids).logits.float(), forward(ids).float()
            want_tokens = ref.generate(ids[:1, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                       pad_token_id=0)
            got_tokens = generate(ids[:1, :6], 12)
    finally:
        close()
    # bf16 rounding: ~2 units in the last place of the largest logits (~1.2: 2 x 2^-7); measured
    # 0.008 (Qwen3) and 0.013 (DeepSeek), where transformers' own bf16 against float32 is 0.14
    assert (got - want).abs().max().item() < 0.02
    assert torch.equal(got_tokens, want_tokens)


def test_an_fp8_store_computes_its_dense_layers_in_int8_on_a_cpu_by_default(fp8_pair, tmp_path):
    store = moestream.convert(fp8_pair[0], tmp_path / "keep", progress=False)
    model = load_model(store, device_budget="64MiB", host_budget=0)
    try:
        assert model.dense_quant == "int8"                     # as for int stores: the float8 experts' peers
        assert type(model.layers[0].self_attn.o_proj).__name__ == "QuantLinear"
    finally:
        model.store.close()


def _broken(fp8_pair, tmp_path, edit_state=None, edit_config=None):
    fp8, _ = fp8_pair
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    if edit_state is not None:
        state = load_file(bad / "model.safetensors")
        edit_state(state)
        save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((bad / "config.json").read_text())
        edit_config(cfg)
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


NAME = "model.layers.0.mlp.experts.2.up_proj.weight"


def test_an_fp8_checkpoint_with_a_float_expert_keeps_its_experts_as_bf16_and_says_why(fp8_pair, tmp_path, capsys):
    def state(s):           # one expert tensor in bf16: the layer is no longer all float8
        s[NAME] = (s[NAME].float() * s.pop(NAME + "_scale_inv").repeat_interleave(32, 0)[:48].repeat_interleave(
            32, 1)[:, :64]).bfloat16()
    bad = _broken(fp8_pair, tmp_path, state)
    store = moestream.convert(bad, tmp_path / "keep", progress=True)
    said = capsys.readouterr()
    assert "experts dequantized to bf16 (its experts are not all float8 of one format)" in said.out + said.err
    with StoreReader(store) as r:
        assert r.index.quant == "keep" and r.index.extents[(0, 2)].chain == ()


@pytest.mark.parametrize("case,needle", [
    ("no scale", f"no {NAME}_scale_inv"),
    ("scale shape", f"{NAME}_scale_inv has shape [1, 1]"),
    ("orphan scale", "model.norm.weight_scale_inv has no float8 weight"),
    ("no quantization_config", "declares no quantization_config"),
    ("other method", "quant_method 'gptq' is not supported"),
    ("mxfp4 declared", "config.json declares quant_method mxfp4"),
    ("per-tensor", "weight_block_size None is not two positive integers"),
    ("nan code", f"{NAME} holds a NaN float8 code"),
])
def test_malformed_fp8_checkpoints_are_refused_naming_the_tensor(fp8_pair, tmp_path, case, needle):
    def state(s):
        if case == "no scale":
            del s[NAME + "_scale_inv"]
        elif case == "scale shape":
            s[NAME + "_scale_inv"] = torch.ones(1, 1)
        elif case == "orphan scale":
            s["model.norm.weight_scale_inv"] = torch.ones(1)
        elif case == "nan code":
            codes = s[NAME].view(torch.uint8).clone()
            codes[0, 3] = 0x7F
            s[NAME] = codes.view(torch.float8_e4m3fn)

    def config(c):
        if case == "no quantization_config":
            del c["quantization_config"]
        elif case == "other method":
            c["quantization_config"]["quant_method"] = "gptq"
        elif case == "mxfp4 declared":
            c["quantization_config"]["quant_method"] = "mxfp4"
        elif case == "per-tensor":
            del c["quantization_config"]["weight_block_size"]
    bad = _broken(fp8_pair, tmp_path, state, config)
    with pytest.raises(ConvertError) as err:
        moestream.convert(bad, tmp_path / "out", progress=False)
    assert needle in str(err.value)
    assert not (tmp_path / "out").exists()
