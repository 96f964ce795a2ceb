"""GGUF files in (formats/gguf_checkpoint.py). The GGUFs are written here by gguf-py's GGUFWriter
from random Hugging Face checkpoints, laid out the way llama.cpp's convert_hf_to_gguf.py lays them
out (stacked experts, its q/k permutation for `llama`, its tensor names) and quantized by gguf-py's
own Q8_0/Q4_0 quantizers. The store's logits are compared with transformers running the
checkpoint the GGUF was made from, and, where transformers reads the architecture, with
transformers loading the GGUF itself (its own GGUF reader and dequantization); the tokenizer
with the checkpoint's tokenizer on the same text."""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import moestream  # noqa: E402
from moestream.demo import build_checkpoint  # noqa: E402
from moestream.errors import ConvertError  # noqa: E402
from moestream.formats import StoreReader  # noqa: E402

from ..conftest import store_logits  # noqa: E402

Q = gguf.GGMLQuantizationType
#: GGUF architecture of each family, and which llama.cpp permutes q/k for
ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
TEXT = "The quick brown fox jumps over the lazy dog. 12345 <s> hello"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to q_proj / k_proj
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_q4_k(shape, rng) -> np.ndarray:
    """Valid Q4_K blocks for a tensor of `shape` (last dimension a multiple of 256): random codes,
    6-bit scales and minimums, positive fp16 d and dmin (gguf-py has no Q4_K quantizer)."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    n = rows * cols // 256
    blocks = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    blocks[:, 0:2] = (rng.random(n) * 0.004 + 0.001).astype(np.float16).view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = (rng.random(n) * 0.004).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(*shape[:-1], cols // 256 * 144)


#: pieces of a small SentencePiece vocabulary ("\u2581" marks a word start), best score first
SPM_PIECES = ["\u2581the", "\u2581qu", "ick", "\u2581b", "row", "n", "\u2581f", "ox", "\u2581", "th", "he", "qu",
              "ro", "ow", "o", "x"] + list("abcdefghijklmnopqrstuvwxyz.,") + [f"<0x{b:02X}>" for b in range(32, 127)]


def write_spm_tokenizer(w) -> None:
    """tokenizer.ggml.* of a SentencePiece ('llama') vocabulary, as llama.cpp's convert writes them:
    tokens, scores, token types (byte tokens as BYTE), no merges."""
    tokens = ["<unk>", "<s>", "</s>"] + list(dict.fromkeys(SPM_PIECES))
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE if t.startswith("<0x") else gguf.TokenType.NORMAL for t in tokens[3:]])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(tokens) - 3)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_gguf(ckpt, out, qtype=Q.F32, *, tokenizer=True, split_max_tensors: int = 0, drop=(), experts=None):
    """The checkpoint at `ckpt` (fp32 safetensors) as a GGUF at `out`: 2-D weights in `qtype`
    (norms, routers and the embedding in F32, as llama.cpp keeps norms and small tensors);
    experts=Q.Q4_K: the experts replaced by random Q4_K blocks of their shapes. tokenizer: True
    (the checkpoint's byte-level BPE, 'gpt2'), "spm" (a SentencePiece vocabulary, 'llama', as
    Mixtral's and Llama 2's GGUFs carry) or False."""
    from safetensors.numpy import load_file
    cfg = json.loads((ckpt / "config.json").read_text())
    fam = moestream.formats.families.FAMILIES[cfg["model_type"]]
    arch = ARCH[cfg["model_type"]]
    t = load_file(ckpt / "model.safetensors")
    w = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    add_sizes(w, cfg, cfg["num_key_value_heads"])
    w.add_expert_count(fam.num_experts(cfg))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "llama":
        w.add_feed_forward_length(cfg["intermediate_size"])
    else:
        w.add_feed_forward_length(cfg.get("intermediate_size", 1))
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if "head_dim" in cfg and arch == "qwen3moe":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if "shared_expert_intermediate_size" in cfg:
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if tokenizer == "spm":
        write_spm_tokenizer(w)
    elif tokenizer:
        tok = json.loads((ckpt / "tokenizer.json").read_text())
        vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
        added = {a["id"]: a for a in tok["added_tokens"]}
        tokens = [k for k, _ in vocab]
        for i, a in added.items():
            if i >= len(tokens):
                tokens.append(a["content"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL
                           for i in range(len(tokens))])
        w.add_token_merges(merges)
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_eos_token_id(cfg["eos_token_id"])

    def add(name, arr, small=False):
        if name in drop:
            return
        # as llama.cpp does, rows that are no whole number of blocks stay unquantized
        if small or arr.ndim == 1 or qtype == Q.F32 or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    add("token_embd.weight", t["model.embed_tokens.weight"], small=True)
    add("output_norm.weight", t["model.norm.weight"])
    if "lm_head.weight" in t and not cfg.get("tie_word_embeddings"):
        add("output.weight", t["lm_head.weight"])
    gate, up, down = fam.gate_up_down
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")):
            if p + h + ".weight" in t:
                add(f"blk.{layer}.{g}.weight", t[p + h + ".weight"])
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            for part in ("weight", "bias"):
                a = t.get(f"{p}self_attn.{h}.{part}")
                if a is None:
                    continue
                if arch == "llama" and h in ("q_proj", "k_proj"):
                    a = _llama_permute(a, cfg["num_attention_heads"] if h == "q_proj" else cfg["num_key_value_heads"])
                add(f"blk.{layer}.{g}.{part}", a)
        router = fam.router.format(layer=layer)
        add(f"blk.{layer}.ffn_gate_inp.weight", t[router], small=True)
        for g, role in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down)):
            stack = np.stack([t[fam.expert_tensor_name(layer, e, role)] for e in range(fam.num_experts(cfg))])
            if experts == Q.Q4_K:
                w.add_tensor(f"blk.{layer}.{g}.weight", random_q4_k(stack.shape, np.random.default_rng(layer)),
                             raw_dtype=Q.Q4_K)
            else:
                add(f"blk.{layer}.{g}.weight", stack)
        if p + "mlp.shared_expert_gate.weight" in t:
            add(f"blk.{layer}.ffn_gate_inp_shexp.weight", t[p + "mlp.shared_expert_gate.weight"][0], small=True)
            for g in ("gate", "up", "down"):
                add(f"blk.{layer}.ffn_{g}_shexp.weight", t[f"{p}mlp.shared_expert.{g}_proj.weight"])
    return finish(w, out)


def add_sizes(w, cfg, kv_heads: int) -> None:
    """The metadata every architecture's GGUF carries, from a Hugging Face config (`kv_heads` as
    written: deepseek2's MQA form says 1)."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


def add_bpe_tokenizer(w, ckpt, pre: str) -> None:
    """The checkpoint's byte-level BPE as tokenizer.ggml.* with pre-tokenizer name `pre`."""
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([k for k, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])


def finish(w, out):
    """Write everything added to GGUFWriter `w` and close it; returns `out`."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    # block-32 quantization needs every row width a multiple of 32: experts 64 wide
    root = tmp_path_factory.mktemp("gguf-src")
    return {f: build_checkpoint(f, root / f, seed=11 + i, moe_intermediate_size=64,
                                **({"intermediate_size": 64} if f == "mixtral" else {}))
            for i, f in enumerate(ARCH)}


def _logits(ckpt, ids):
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()(ids).logits


def _store_logits(store, ids):
    return store_logits(store, ids, device_budget="64MiB", host_budget=0, dtype=torch.float32)


def _rel(got, want):
    return (got - want).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("family", list(ARCH))
def test_an_f32_gguf_converts_to_the_checkpoint_it_was_made_from(ckpts, tmp_path, family):
    """Names, stacked experts split per expert, q/k un-permuted (llama), config from the metadata:
    an F32 GGUF's store computes what transformers computes on the original checkpoint."""
    src = write_gguf(ckpts[family], tmp_path / "m.gguf")
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    cfg = json.loads((store / "config.json").read_text())
    orig = json.loads((ckpts[family] / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "num_experts_per_tok", "rms_norm_eps", "rope_parameters"):
        assert cfg[k] == pytest.approx(orig[k]) if k != "rope_parameters" else cfg[k] == orig[k], k
    ids = torch.randint(0, orig["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    err = _rel(_store_logits(store, ids), _logits(ckpts[family], ids))
    print(f"{family} F32 GGUF: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4


def test_the_tokenizer_comes_from_the_gguf_metadata(ckpts, tmp_path):
    from tokenizers import Tokenizer
    src = write_gguf(ckpts["qwen3_moe"], tmp_path / "m.gguf")
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    want = Tokenizer.from_file(str(ckpts["qwen3_moe"] / "tokenizer.json"))
    got = Tokenizer.from_file(str(store / "tokenizer.json"))
    assert got.encode(TEXT).ids == want.encode(TEXT).ids
    assert got.decode(want.encode(TEXT).ids) == want.decode(want.encode(TEXT).ids)
    assert got.token_to_id("</s>") == want.token_to_id("</s>")


def test_a_sentencepiece_tokenizer_is_built_by_transformers_gguf_reader(ckpts, tmp_path):
    """Mixtral's GGUFs carry a SentencePiece vocabulary ('llama'): the store's tokenizer.json is
    the one transformers builds when it loads that GGUF itself."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    src = write_gguf(ckpts["mixtral"], tmp_path / "m.gguf", tokenizer="spm")
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    want = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    got = Tokenizer.from_file(str(store / "tokenizer.json"))
    text = "the quick brown fox, the box"
    ids = got.encode(text).ids
    assert ids == want(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.75 * len(text)                    # pieces, not characters
    assert got.decode(ids) == want.decode(ids)
    assert got.token_to_id("</s>") == 2 and got.id_to_token(0) == "<unk>"


# tolerances: a random model's near-Gaussian weights in 32-element blocks of 256 (Q8_0) or 16
# (Q4_0) levels, the dense tensors' values rounded to bf16 (~0.3 %)
@pytest.mark.parametrize("qtype,tol", [(Q.Q8_0, 0.02), (Q.Q4_0, 0.3)])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_quantized_ggufs_match_transformers_reading_the_same_file(ckpts, tmp_path, family, qtype, tol):
    """Q8_0 / Q4_0 blocks dequantized: stored as float32, against transformers loading the GGUF
    (its own reader and dequantization): 1e-4; `--quant keep` keeps the blocks (int8 / int4 in
    groups of 32), against the unquantized checkpoint: the blocks' rounding only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = write_gguf(ckpts[family], tmp_path / "m.gguf", qtype)
    exact = moestream.convert(src, tmp_path / "fp32.moe", quant="fp32", progress=False)
    kept = moestream.convert(src, tmp_path / "keep.moe", progress=False)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # the checkpoint's config: transformers' GGUF config mapping omits the experts' width
        # (expert_feed_forward_length) and falls back to Qwen's default
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                   config=AutoConfig.from_pretrained(ckpts[family])).eval()
        want = ref(ids).logits
    err = _rel(_store_logits(exact, ids), want)
    drift = _rel(_store_logits(kept, ids), _logits(ckpts[family], ids))
    print(f"{family} {qtype.name}: fp32 store vs transformers' GGUF read {err:.2e}; "
          f"the kept store vs the unquantized checkpoint {drift:.3f}")
    assert err < 1e-4
    assert drift < tol
    with StoreReader(kept) as r:
        # --quant keep: Q8_0 experts as int8 in groups of 32, Q4_0 ones as int4 (the same codes)
        assert (r.index.quant, r.index.group_size) == ("int8" if qtype == Q.Q8_0 else "int4", 32)


def test_q8_0_blocks_requantize_to_int8_exactly():
    """Our int8 with groups of 32 is Q8_0's layout (absmax / 127 per 32, one fp16 scale): from the
    values of Q8_0 blocks it re-derives the same codes and scales, so `--quant int8 --group-size
    32` from a Q8_0 GGUF loses nothing."""
    from moestream.compute.dequant import dequantize
    from moestream.formats.quantized import quantize_matrix
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.05
    blocks = gguf.quants.quantize(w, Q.Q8_0)
    want = gguf.quants.dequantize(blocks, Q.Q8_0)
    got = quantize_matrix(torch.from_numpy(want), "int8", 32).dequantize(dequantize, torch.float32).numpy()
    assert np.array_equal(got, want)


def _kept_experts_against_gguf_py(src, store, stage):
    """max |store expert - gguf-py's dequantization of its blocks| / max |weight| over experts 0
    and 7 of every layer, each held as `stage`."""
    from moestream.compute.dequant import dequantize
    from moestream.formats.codecs import bits_to_float32
    from moestream.formats.gguf_checkpoint import GgufCheckpoint
    ck, worst = GgufCheckpoint(src), 0.0
    with moestream.open(store, device_budget="16MiB", host_budget=0, keep_quantized=True) as s:
        for layer in s.layers:
            for e, f in zip((0, 7), s.fetch(layer, [0, 7])):
                for t, q in f.result().items():
                    name = f"model.layers.{layer}.mlp.experts.{e}.{t}.weight"
                    want = bits_to_float32(ck.read(name), "fp32").reshape(ck.info(name).shape)
                    assert q.spec.stage == stage
                    got = q.dequantize(dequantize, torch.float32).numpy()
                    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("qtype,stage", [(Q.Q8_0, "int8:32"), (Q.Q4_0, "int4:32")])
def test_keep_stores_q8_0_and_q4_0_experts_as_the_same_codes_and_scales(ckpts, tmp_path, qtype, stage):
    """`--quant keep` of a Q8_0 / Q4_0 GGUF: the blocks re-laid out as our int8 / int4 in groups
    of 32 dequantize to exactly the values gguf-py dequantizes them to."""
    src = write_gguf(ckpts["qwen3_moe"], tmp_path / "m.gguf", qtype)
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    assert _kept_experts_against_gguf_py(src, store, stage) == 0.0


def test_q4_k_experts_keep_their_codes_with_fp16_scales(tmp_path):
    """Q4_K (what Q4_K_M files hold): each sub-block of 32 becomes one int4 group, d·scale and
    dmin·min rounded to fp16 (2^-11 relative); the store computes what transformers computes
    reading the same GGUF."""
    from transformers import AutoModelForCausalLM
    ckpt = build_checkpoint("qwen3_moe", tmp_path / "q", seed=3, hidden_size=256, moe_intermediate_size=256,
                            head_dim=32, num_attention_heads=8)
    src = write_gguf(ckpt, tmp_path / "m.gguf", experts=Q.Q4_K)
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    assert _kept_experts_against_gguf_py(src, store, "int4:32") < 2e-3
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(2))
    from transformers import AutoConfig
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                    config=AutoConfig.from_pretrained(ckpt)).eval()(ids).logits
    err = _rel(_store_logits(store, ids), want)
    print(f"Q4_K experts kept as int4:32: max |logit diff| / max |logit| = {err:.4f}")
    assert err < 0.05          # fp16 scales and the int4 kernel's int8 activations


def test_a_split_gguf_is_read_from_any_of_its_files(ckpts, tmp_path):
    from moestream.formats.gguf_checkpoint import GgufCheckpoint
    whole = GgufCheckpoint(write_gguf(ckpts["qwen3_moe"], tmp_path / "one.gguf"))
    (tmp_path / "parts").mkdir()
    # gguf-py's writer splits as llama.cpp's gguf-split does: NAME-0000i-of-0000n.gguf, the
    # metadata in the first
    write_gguf(ckpts["qwen3_moe"], tmp_path / "parts" / "m.gguf", split_max_tensors=12)
    files = sorted((tmp_path / "parts").glob("m-*-of-*.gguf"))
    assert len(files) >= 3
    for f in files:
        ck = GgufCheckpoint(f)
        assert ck.tensors.keys() == whole.tensors.keys() and ck.config == whole.config
    store = moestream.convert(files[-1], tmp_path / "m.moe", progress=False)
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    assert _rel(_store_logits(store, ids), _logits(ckpts["qwen3_moe"], ids)) < 1e-4
    files[1].unlink()
    with pytest.raises(ConvertError, match=f"{files[1].name}: missing"):
        GgufCheckpoint(files[0])


def test_bad_ggufs_are_refused_naming_the_file(ckpts, tmp_path):
    src = write_gguf(ckpts["qwen3_moe"], tmp_path / "m.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ConvertError, match="fake.gguf: not a GGUF file"):
        moestream.convert(fake, tmp_path / "a.moe", progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:len(src.read_bytes()) // 2])
    with pytest.raises(ConvertError, match="cut.gguf"):
        moestream.convert(cut, tmp_path / "b.moe", progress=False)
    missing = write_gguf(ckpts["qwen3_moe"], tmp_path / "missing.gguf", drop={"blk.1.ffn_up_exps.weight"})
    with pytest.raises(ConvertError, match="up_proj"):
        moestream.convert(missing, tmp_path / "c.moe", progress=False)
    assert not (tmp_path / "a.moe").exists() and not (tmp_path / "b.moe").exists()
    assert not (tmp_path / "c.moe").exists()


def test_the_cli_converts_a_gguf_and_says_what_it_did(ckpts, tmp_path, capsys):
    from moestream.cli import main
    src = write_gguf(ckpts["qwen3_moe"], tmp_path / "m.gguf", Q.Q8_0, tokenizer=False)
    assert main(["convert", str(src), str(tmp_path / "m.moe")]) == 0
    said = "".join(capsys.readouterr())
    assert "Q8_0" in said and "no tokenizer.json" in said
    assert not (tmp_path / "m.moe" / "tokenizer.json").exists()


# ---- deepseek2 (DeepSeek-V3/R1, Kimi-K2 GGUFs) ---------------------------------------------------

def write_deepseek2_gguf(ckpt, out, qtype=Q.F32, *, split_kv_b=True, gating=gguf.ExpertGatingFuncType.SIGMOID,
                         yarn_log_mul=None, pre="deepseek-v3"):
    """A DeepSeek-V3 checkpoint as llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model) writes it:
    metadata in its MQA form (one kv head, key_length kv_lora_rank + rope, the real widths under
    *_mla), kv_b_proj split into attn_k_b (transposed per head) and attn_v_b (split_kv_b; before
    that split, one attn_kv_b), stacked experts, exp_probs_b, sigmoid gating."""
    from safetensors.numpy import load_file
    cfg = json.loads((ckpt / "config.json").read_text())
    t = load_file(ckpt / "model.safetensors")
    heads, rope, nope, v = (cfg["num_attention_heads"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"],
                            cfg["v_head_dim"])
    rank = cfg["kv_lora_rank"]
    w = gguf.GGUFWriter(str(out), "deepseek2")
    add_sizes(w, cfg, 1)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    if split_kv_b:
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    else:                       # GGUFs from before llama.cpp's MLA rewrite
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gating)
    w.add_expert_group_count(cfg["n_group"])
    w.add_expert_group_used_count(cfg["topk_group"])
    w.add_rope_dimension_count(rope)
    rp = cfg["rope_parameters"]
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"] if yarn_log_mul is None else yarn_log_mul)

    def add(name, arr, small=False):
        if small or arr.ndim == 1 or qtype == Q.F32 or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), qtype), raw_dtype=qtype)
    add("token_embd.weight", t["model.embed_tokens.weight"], small=True)
    add("output_norm.weight", t["model.norm.weight"])
    add("output.weight", t["lm_head.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"),
                     ("attn_q_b", "self_attn.q_b_proj"), ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
                     ("attn_kv_a_norm", "self_attn.kv_a_layernorm"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                     *((f"ffn_{x}_shexp", f"mlp.shared_experts.{x}_proj") for x in ("gate", "up", "down"))):
            if p + h + ".weight" in t:
                add(f"blk.{layer}.{g}.weight", t[p + h + ".weight"])
        kv_b = t[p + "self_attn.kv_b_proj.weight"]
        if split_kv_b:       # DeepseekV2Model.modify_tensors
            k_b, v_b = np.split(kv_b.reshape(heads, nope + v, rank), [nope], axis=1)
            add(f"blk.{layer}.attn_k_b.weight", k_b.swapaxes(1, 2))
            add(f"blk.{layer}.attn_v_b.weight", v_b)
        else:
            add(f"blk.{layer}.attn_kv_b.weight", kv_b)
        if p + "mlp.gate.weight" in t:
            add(f"blk.{layer}.ffn_gate_inp.weight", t[p + "mlp.gate.weight"], small=True)
            add(f"blk.{layer}.exp_probs_b.bias", t[p + "mlp.gate.e_score_correction_bias"])
            for g, role in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
                add(f"blk.{layer}.{g}.weight",
                    np.stack([t[f"{p}mlp.experts.{e}.{role}.weight"] for e in range(cfg["n_routed_experts"])]))
    add_bpe_tokenizer(w, ckpt, pre)
    return finish(w, out)


#: DeepSeek-V3's own values where the demo config differs from what transformers defaults to: a
#: GGUF that left them out would otherwise get 8 groups, a 2.5 routed scale, ...
_DS = dict(moe_intermediate_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
           n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True)


def _transformers_store_logits(store, ids):
    """Logits of `store` run by transformers' own DeepSeek-V3 classes (moestream has no native
    forward for it), in float32, the store closed after."""
    tf = moestream.from_pretrained(store, device_budget="64MiB", host_budget=0, dtype=torch.float32)
    try:
        with torch.no_grad():
            return tf(ids).logits
    finally:
        tf.moestream_store.close()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return build_checkpoint("deepseek_v3", tmp_path_factory.mktemp("ds") / "ds", seed=21, **_DS)


@pytest.mark.parametrize("split_kv_b", [True, False], ids=["k_b+v_b", "kv_b"])
def test_a_deepseek2_gguf_converts_to_the_checkpoint_it_was_made_from(deepseek, tmp_path, split_kv_b):
    """llama.cpp's MLA rewrite undone: the widths from the *_mla keys, kv_b_proj joined from attn_k_b
    (transposed back) and attn_v_b, one kv head read as MLA's many; an F32 GGUF's store computes
    what transformers computes on the original DeepSeek-V3 checkpoint."""
    src = write_deepseek2_gguf(deepseek, tmp_path / "m.gguf", split_kv_b=split_kv_b)
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    cfg = json.loads((store / "config.json").read_text())
    orig = json.loads((deepseek / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "q_lora_rank",
              "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "head_dim", "n_group",
              "topk_group", "first_k_dense_replace", "n_shared_experts", "norm_topk_prob", "rope_parameters"):
        assert cfg[k] == orig[k], k
    assert cfg["routed_scaling_factor"] == pytest.approx(orig["routed_scaling_factor"])
    ids = torch.randint(0, orig["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    err = _rel(_transformers_store_logits(store, ids), _logits(deepseek, ids))
    print(f"deepseek2 F32 GGUF ({'split' if split_kv_b else 'joined'} kv_b): max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4


def test_a_q8_0_deepseek2_gguf_keeps_its_expert_blocks(deepseek, tmp_path):
    src = write_deepseek2_gguf(deepseek, tmp_path / "m.gguf", Q.Q8_0)
    store = moestream.convert(src, tmp_path / "m.moe", progress=False)
    assert _kept_experts_against_gguf_py(src, store, "int8:32") == 0.0
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(5))
    drift = _rel(_transformers_store_logits(store, ids), _logits(deepseek, ids))
    print(f"deepseek2 Q8_0 GGUF kept: against the unquantized checkpoint {drift:.4f}")
    assert drift < 0.02


def test_deepseek2_yarn_rope_scaling_is_read_as_deepseek_writes_it(tmp_path):
    """DeepSeek-V3's kind of rope scaling (yarn, there factor 40 over 4096 positions, mscale =
    mscale_all_dim = 1) as llama.cpp keeps it (factor, original context, 0.1 * mscale_all_dim as the
    log multiplier) comes back as the rope_parameters transformers computes the same logits from."""
    rp = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 16,
          "mscale": 1.0, "mscale_all_dim": 1.0}
    ckpt = build_checkpoint("deepseek_v3", tmp_path / "ds", seed=4, rope_parameters=rp, **_DS)
    store = moestream.convert(write_deepseek2_gguf(ckpt, tmp_path / "m.gguf"), tmp_path / "m.moe", progress=False)
    assert json.loads((store / "config.json").read_text())["rope_parameters"] == rp
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(6))     # beyond 16 positions
    assert _rel(_transformers_store_logits(store, ids), _logits(ckpt, ids)) < 1e-4


def test_a_softmax_gated_deepseek2_gguf_is_refused_as_deepseek_v2(deepseek, tmp_path):
    src = write_deepseek2_gguf(deepseek, tmp_path / "m.gguf", gating=gguf.ExpertGatingFuncType.SOFTMAX)
    with pytest.raises(ConvertError, match=r"m\.gguf: .*softmax expert gating .*DeepSeek-V2"):
        moestream.convert(src, tmp_path / "m.moe", progress=False)
    assert not (tmp_path / "m.moe").exists()


def test_the_deepseek_v3_pre_tokenizer_splits_as_llama_cpp_does(deepseek, tmp_path):
    """tokenizer.ggml.pre "deepseek-v3": digits in threes, CJK runs apart, punctuation glued to the
    letters after it (llama.cpp's three regexes); an unknown pre-tokenizer gives no tokenizer.json
    and says why, rather than splitting text another way than the model's own tokenizer."""
    from tokenizers import Tokenizer
    from moestream.formats.gguf_checkpoint import GgufCheckpoint
    ck = GgufCheckpoint(write_deepseek2_gguf(deepseek, tmp_path / "m.gguf"))
    tok = Tokenizer.from_str(ck.tokenizer_json().decode())
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("abc 1234567 世界x.Hello")]
    assert pieces == ["abc", "Ġ", "123", "456", "7", "Ġ", "ä¸ĸçķĮ", "x", ".Hello"]     # byte-level forms
    ck = GgufCheckpoint(write_deepseek2_gguf(deepseek, tmp_path / "odd.gguf", pre="some-new-model"))
    assert ck.tokenizer_json() is None and "'some-new-model'" in ck.tokenizer_note()



# ---- gpt-oss ----------------------------------------------------------------------------------------

def _mxfp4_ggml_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """A checkpoint's MXFP4 pair (blocks uint8 [..., G, 16]: element 2j in byte j's low nibble,
    2j+1 in its high one; exponents uint8 [..., G]) as GGML's block_mxfp4 {e, qs[16]}: element j
    in byte j's low nibble, j+16 in its high one (what convert_hf_to_gguf's repack_mxfp4 writes)."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)   # in order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate([scales[..., None], qs.astype(np.uint8)], axis=-1)                  # [..., G, 17]
    return out.reshape(*out.shape[:-2], -1)


def write_gpt_oss_gguf(ckpt, out, *, mxfp4_src=None):
    """A GPT-OSS checkpoint as convert_hf_to_gguf.py's GptOssModel writes it: gate_up_proj [E, H, 2I]
    transposed and split into ffn_gate_exps / ffn_up_exps [E, I, H] (even / odd columns), down_proj
    transposed to ffn_down_exps [E, H, I], their biases split alike; F32, or (mxfp4_src: the MXFP4
    checkpoint's folder) the experts as that checkpoint's MXFP4 blocks, repacked as GGML's."""
    from safetensors.numpy import load_file
    cfg = json.loads((ckpt / "config.json").read_text())
    t = load_file(ckpt / "model.safetensors")
    q = load_file(mxfp4_src / "model.safetensors") if mxfp4_src else None
    w = gguf.GGUFWriter(str(out), "gpt-oss")
    add_sizes(w, cfg, cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    w.add_sliding_window(cfg["sliding_window"])
    rp = cfg["rope_parameters"]
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rp["factor"])
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])          # as TextModel.set_gguf_parameters writes them
    w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    f32 = lambda a: np.ascontiguousarray(a, np.float32)      # noqa: E731
    w.add_tensor("token_embd.weight", f32(t["model.embed_tokens.weight"]))
    w.add_tensor("output_norm.weight", f32(t["model.norm.weight"]))
    w.add_tensor("output.weight", f32(t["lm_head.weight"]))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for g, h in (("attn_norm.weight", "input_layernorm.weight"),
                     ("post_attention_norm.weight", "post_attention_layernorm.weight"),
                     *((f"attn_{x}.{k}", f"self_attn.{x}_proj.{k}") for x in "qkv" for k in ("weight", "bias")),
                     ("attn_output.weight", "self_attn.o_proj.weight"), ("attn_output.bias", "self_attn.o_proj.bias"),
                     ("attn_sinks.weight", "self_attn.sinks"), ("ffn_gate_inp.weight", "mlp.router.weight"),
                     ("ffn_gate_inp.bias", "mlp.router.bias"), ("ffn_down_exps.bias", "mlp.experts.down_proj_bias")):
            w.add_tensor(f"blk.{layer}.{g}", f32(t[p + h]))
        e = p + "mlp.experts."
        bias = t[e + "gate_up_proj_bias"]
        w.add_tensor(f"blk.{layer}.ffn_gate_exps.bias", f32(bias[..., 0::2]))
        w.add_tensor(f"blk.{layer}.ffn_up_exps.bias", f32(bias[..., 1::2]))
        if q is None:
            gu = t[e + "gate_up_proj"].swapaxes(1, 2)                          # [E, 2I, H]
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", f32(gu[:, 0::2]))
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", f32(gu[:, 1::2]))
            w.add_tensor(f"blk.{layer}.ffn_down_exps.weight", f32(t[e + "down_proj"].swapaxes(1, 2)))
        else:                # the pairs hold rows [E, R, ...] of the transposed matrices already
            b, s = q[e + "gate_up_proj_blocks"], q[e + "gate_up_proj_scales"]
            for g, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
                w.add_tensor(f"blk.{layer}.ffn_{g}_exps.weight", _mxfp4_ggml_blocks(b[:, rows], s[:, rows]),
                             raw_dtype=Q.MXFP4)
            w.add_tensor(f"blk.{layer}.ffn_down_exps.weight",
                         _mxfp4_ggml_blocks(q[e + "down_proj_blocks"], q[e + "down_proj_scales"]), raw_dtype=Q.MXFP4)
    add_bpe_tokenizer(w, ckpt, "gpt-4o")
    return finish(w, out)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from .test_mxfp4 import mxfp4_twins
    root = tmp_path_factory.mktemp("gpt-oss")
    src = build_checkpoint("gpt_oss", root / "src", seed=13, moe_intermediate_size=64)
    return (src, *mxfp4_twins(src, root))


def test_a_gpt_oss_gguf_converts_to_the_checkpoint_it_was_made_from(gpt_oss, tmp_path):
    """llama.cpp's split and transposed experts joined back into GPT-OSS's fused, transposed,
    gate/up-interleaved layout (with their biases), the config (yarn rope, sliding window, head
    width) from the metadata: an F32 GGUF's store computes what transformers computes on the
    original checkpoint."""
    src, _, _, _ = gpt_oss
    store = moestream.convert(write_gpt_oss_gguf(src, tmp_path / "m.gguf"), tmp_path / "m.moe", progress=False)
    cfg = json.loads((store / "config.json").read_text())
    orig = json.loads((src / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window", "rope_parameters"):
        assert cfg[k] == orig[k], k
    ids = torch.randint(0, orig["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    err = _rel(_transformers_store_logits(store, ids), _logits(src, ids))
    print(f"gpt-oss F32 GGUF: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 1e-4


def test_mxfp4_gguf_experts_equal_the_mxfp4_checkpoints(gpt_oss, tmp_path):
    """A GGUF of a GPT-OSS MXFP4 checkpoint (the experts' blocks repacked as GGML's MXFP4, gate and
    up split): `--quant keep` stores the same mxfp4 extents, byte for byte, as the store converted
    from the safetensors checkpoint (its own blocks: tests/formats/test_mxfp4.py), which decode to
    transformers' own MXFP4 values; its logits match transformers on those decoded weights."""
    _, q, ref, _ = gpt_oss
    a = moestream.convert(write_gpt_oss_gguf(ref, tmp_path / "m.gguf", mxfp4_src=q), tmp_path / "a.moe",
                          progress=False)
    b = moestream.convert(q, tmp_path / "b.moe", progress=False)
    with StoreReader(a) as ra, StoreReader(b) as rb:
        assert ra.layers == rb.layers and ra.index.quant == rb.index.quant == "mxfp4"
        for layer in ra.layers:
            for e in range(ra.experts_per_layer):
                xa, xb = ra.extent(layer, e), rb.extent(layer, e)
                assert xa.chain == xb.chain and xa.tensors == xb.tensors
                assert ra.read_region(xa, (layer, e)) == rb.read_region(xb, (layer, e))
                wa, wb = ra.expert(layer, e), rb.expert(layer, e)
                assert wa.keys() == wb.keys()
                for t in wa:
                    assert torch.equal(wa[t], wb[t]), (layer, e, t)
                assert wa["gate_up_proj"].dtype == wa["down_proj"].dtype == torch.bfloat16     # exact there
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(8))
    assert _rel(_transformers_store_logits(a, ids), _logits(ref, ids)) < 1e-4
