"""GGUF files (llama.cpp's format; what Ollama and LM Studio users hold) read as the Hugging Face
checkpoint they were made from: the config from the GGUF metadata, Hugging Face tensor names,
the stacked `blk.N.ffn_{gate,up,down}_exps.weight` ([E, rows, cols], expert outermost) split into
one tensor per expert, and the tokenizer from `tokenizer.ggml.*` written as a `tokenizer.json`.

One record per GGUF architecture (`GGUF_ARCHITECTURES`) holds what differs: the family it maps to,
the metadata keys of its config, its router and shared-expert names, and whether llama.cpp's
converter permuted its q/k rows for rotary (it does so for `llama`, whose GGML rotary pairs
neighbouring elements where Hugging Face pairs the two halves; Qwen's "NEOX" rotary is left alone).
`deepseek2` (DeepSeek-V3/R1, Kimi-K2) also undoes llama.cpp's MLA rewrite: its metadata describes
the attention as MQA (one kv head, keys kv_lora_rank + rope wide) with the real sizes under
`*_mla` keys, and `kv_b_proj` is split into `attn_k_b` (transposed) and `attn_v_b`, joined here.
`gpt-oss` has its fused experts split by llama.cpp into gate / up / down stacks in nn.Linear
orientation: joined, transposed and interleaved back into the family's `gate_up_proj [E, H, 2I]`
(GgufArch.joined, JOINS).

Quantized tensors (Q8_0, Q4_0, the K-quants, IQ types, ...) are dequantized to float32 by gguf-py's
reference `gguf.quants.dequantize` (numpy) one tensor, or one expert, at a time: the converter then
stores them as `--quant` says (`keep`: bf16). Reads use pread, not the reader's mmap, so the
converter's resident set stays at one tensor. Needs the `gguf` package (`pip install moestream[gguf]`).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConvertError
from .families import FAMILIES
from .constants import QuantSpec
from .hf_checkpoint import TensorInfo, TensorTable

#: a split GGUF's file names (llama.cpp's gguf-split): NAME-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")

#: GGUF raw types read as their bit patterns: (the converter's dtype name, numpy bits type)
RAW_TYPES = {"F32": ("fp32", np.uint32), "F16": ("fp16", np.uint16), "BF16": ("bf16", np.uint16)}

#: GGUF block types whose experts `--quant keep` stores in one of our group-wise types
#: (constants.QUANT_TYPES), re-laid out without going through floats: (our kind, group, exact).
#: Q8_0 is int8 in groups of 32 (one fp16 scale); Q4_0 is int4 in groups of 32 with the minimum
#: -8·scale; Q4_K's sub-blocks of 32 have a 6-bit scale and minimum under the super-block's fp16
#: d and dmin, whose products are rounded to fp16 here (relative 2^-11 of a group's range).
#: MXFP4 (GPT-OSS) is our mxfp4 with its nibbles reordered.
NATIVE_TYPES = {"Q8_0": ("int8", 32, True), "Q4_0": ("int4", 32, True), "Q4_K": ("int4", 32, False),
                "MXFP4": ("mxfp4", 32, True)}


@dataclass(frozen=True)
class GgufArch:
    """How one GGUF architecture maps to a family of formats/families.py."""
    name: str                                   # general.architecture
    family: str                                 # FAMILIES key (config.json's model_type)
    #: config.json key -> GGUF metadata key (without the "ARCH." prefix)
    config: tuple[tuple[str, str], ...]
    #: config.json keys the GGUF does not carry but the family's forward fixes
    fixed: tuple[tuple[str, Any], ...] = ()
    #: per-layer GGUF tensor (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
    layer_tensors: tuple[tuple[str, str], ...] = ()
    #: llama.cpp permuted q_proj / k_proj rows for GGML's rotary: undone on read
    permuted_qk: bool = False
    #: the config fields that are arithmetic on the metadata, not a copy of one key:
    #: (metadata getter by key without the "ARCH." prefix, config so far, where) -> None, filling config
    derive: Optional[Callable[[Callable[[str], Any], dict, str], None]] = None
    #: Hugging Face tensors (after "model.layers.N.") that llama.cpp split or rearranged, rebuilt on
    #: read from GGUF tensors (after "blk.N."): (name, parts, how; JOINS says what each `how` does)
    joined: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    #: yarn rope scaling: rope.scaling.yarn_log_multiplier is DeepSeek's 0.1 * mscale_all_dim
    yarn_log_mul_is_mscale: bool = False
    #: yarn rope parameters the family's own config sets and the GGUF does not carry
    yarn_fixed: tuple[tuple[str, Any], ...] = ()


_COMMON_CONFIG = (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                  ("max_position_embeddings", "context_length"), ("num_attention_heads", "attention.head_count"),
                  ("num_key_value_heads", "attention.head_count_kv"), ("rope_theta", "rope.freq_base"),
                  ("rms_norm_eps", "attention.layer_norm_rms_epsilon"), ("num_experts_per_tok", "expert_used_count"))
_ATTENTION = (("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
              *((f"attn_{g}.{p}", f"self_attn.{h}_proj.{p}") for g, h in (("q", "q"), ("k", "k"), ("v", "v"))
                for p in ("weight", "bias")),
              ("attn_output.weight", "self_attn.o_proj.weight"),
              ("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight"))
_QWEN_MOE = (("ffn_gate_inp.weight", "mlp.gate.weight"),
             ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
             *((f"ffn_{p}_shexp.weight", f"mlp.shared_expert.{p}_proj.weight") for p in ("gate", "up", "down")))

_DEEPSEEK2_TENSORS = (
    ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),                         # models without q_lora_rank
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"), ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),                   # GGUFs made before the split
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate_inp.weight", "mlp.gate.weight"), ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    *((f"ffn_{p}.weight", f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")),          # leading dense layers
    *((f"ffn_{p}_shexp.weight", f"mlp.shared_experts.{p}_proj.weight") for p in ("gate", "up", "down")))
#: How GgufArch.joined rebuilds a tensor from its GGUF parts (each read as a whole or as one expert's row):
#:   kv_b          attn_k_b [H, rank, nope] (transposed per head) and attn_v_b [H, v, rank] -> [H*(nope+v), rank]
#:   interleave_t  gate [.., I, H] and up [.., I, H] -> [.., H, 2I], columns g0 u0 g1 u1 ... (GPT-OSS's gate_up_proj)
#:   interleave    gate bias [.., I] and up bias [.., I] -> [.., 2I], g0 u0 g1 u1 ...
#:   t             [.., R, C] -> [.., C, R] (GPT-OSS's down_proj, kept [in, out])
JOINS = ("kv_b", "interleave_t", "interleave", "t")


def _deepseek2_config(meta: Callable[[str], Any], cfg: dict, where: str) -> None:
    """DeepSeek-V3's config from a deepseek2 GGUF: the MLA sizes llama.cpp rewrote for its MQA form
    (convert_hf_to_gguf's DeepseekV2Model), and the fields transformers' DeepseekV3Config would
    otherwise default to another model's values (8 expert groups, a 2.5 routed scale, ...)."""
    gating = meta("expert_gating_func")
    if gating != 2:      # gguf.ExpertGatingFuncType.SIGMOID; llama.cpp reads a missing one as softmax
        raise ConvertError(f"{where}: a deepseek2 GGUF with {'softmax' if gating in (None, 1) else f'type {gating!r}'} expert "
                           "gating (deepseek2.expert_gating_func) is DeepSeek-V2/V2.5, which moestream does not "
                           "convert (it converts the sigmoid-gated DeepSeek-V3 layout: V3, R1, Kimi-K2)")
    rope = meta("rope.dimension_count")
    kv_rank = meta("attention.kv_lora_rank")
    if rope is None or kv_rank is None:
        raise ConvertError(f"{where}: GGUF metadata lacks deepseek2."
                           + ("rope.dimension_count" if rope is None else "attention.kv_lora_rank"))
    # GGUFs made since llama.cpp's MLA rewrite keep the real key/value widths under *_mla; older ones
    # under key_length / value_length
    key = meta("attention.key_length_mla") or meta("attention.key_length")
    value = meta("attention.value_length_mla") or meta("attention.value_length")
    if key is None or value is None or key <= rope:
        raise ConvertError(f"{where}: GGUF metadata has no usable deepseek2.attention.key_length_mla / "
                           f"value_length_mla (got {key!r}, {value!r} with {rope} rotary dimensions)")
    cfg.update(qk_rope_head_dim=rope, qk_nope_head_dim=key - rope, v_head_dim=value, head_dim=rope,
               kv_lora_rank=kv_rank, q_lora_rank=meta("attention.q_lora_rank"),
               # MLA has as many key/value heads as query heads; the GGUF says 1 (its MQA form)
               num_key_value_heads=cfg["num_attention_heads"],
               first_k_dense_replace=meta("leading_dense_block_count") or 0,
               n_shared_experts=meta("expert_shared_count") or 0,
               routed_scaling_factor=float(meta("expert_weights_scale") or 1.0),
               norm_topk_prob=bool(meta("expert_weights_norm")),
               n_group=meta("expert_group_count") or 1, topk_group=meta("expert_group_used_count") or 1,
               rope_interleave=True)         # llama.cpp's deepseek2 rotary pairs neighbours, as this flag does


#: One record per GGUF architecture moestream converts.
GGUF_ARCHITECTURES: dict[str, GgufArch] = {
    "qwen3moe": GgufArch("qwen3moe", "qwen3_moe",
                         (*_COMMON_CONFIG, ("num_experts", "expert_count"), ("head_dim", "attention.key_length"),
                          ("moe_intermediate_size", "expert_feed_forward_length"),
                          ("intermediate_size", "feed_forward_length")),
                         # llama.cpp's qwen3moe always rescales the top-k weights to sum to one
                         fixed=(("norm_topk_prob", True),), layer_tensors=(*_ATTENTION, *_QWEN_MOE)),
    "qwen2moe": GgufArch("qwen2moe", "qwen2_moe",
                         (*_COMMON_CONFIG, ("num_experts", "expert_count"),
                          ("moe_intermediate_size", "expert_feed_forward_length"),
                          ("shared_expert_intermediate_size", "expert_shared_feed_forward_length"),
                          ("intermediate_size", "feed_forward_length")),
                         # llama.cpp's qwen2moe keeps the softmax weights of the top-k as they are
                         fixed=(("norm_topk_prob", False),), layer_tensors=(*_ATTENTION, *_QWEN_MOE)),
    # Mixtral is llama.cpp's "llama" with experts
    "llama": GgufArch("llama", "mixtral",
                      (*_COMMON_CONFIG, ("num_local_experts", "expert_count"),
                       ("intermediate_size", "feed_forward_length")),
                      layer_tensors=(*_ATTENTION, ("ffn_gate_inp.weight", "block_sparse_moe.gate.weight")),
                      permuted_qk=True),
    "deepseek2": GgufArch("deepseek2", "deepseek_v3",
                          (*_COMMON_CONFIG, ("n_routed_experts", "expert_count"),
                           ("moe_intermediate_size", "expert_feed_forward_length"),
                           ("intermediate_size", "feed_forward_length")),
                          layer_tensors=_DEEPSEEK2_TENSORS, derive=_deepseek2_config,
                          joined=(("self_attn.kv_b_proj.weight", ("attn_k_b.weight", "attn_v_b.weight"), "kv_b"),),
                          yarn_log_mul_is_mscale=True),
    # the fused, transposed, gate/up-interleaved experts of formats/families.py's gpt_oss, from
    # llama.cpp's separate gate/up/down stacks (convert_hf_to_gguf's GptOssModel split and transposed them)
    "gpt-oss": GgufArch("gpt-oss", "gpt_oss",
                        (*_COMMON_CONFIG, ("num_local_experts", "expert_count"), ("head_dim", "attention.key_length"),
                         ("intermediate_size", "expert_feed_forward_length"),
                         ("sliding_window", "attention.sliding_window")),
                        layer_tensors=(
                            ("attn_norm.weight", "input_layernorm.weight"),
                            ("post_attention_norm.weight", "post_attention_layernorm.weight"),
                            *((f"attn_{g}.{p}", f"self_attn.{g}_proj.{p}") for g in "qkv" for p in ("weight", "bias")),
                            ("attn_output.weight", "self_attn.o_proj.weight"), ("attn_output.bias", "self_attn.o_proj.bias"),
                            ("attn_sinks.weight", "self_attn.sinks"),
                            ("ffn_gate_inp.weight", "mlp.router.weight"), ("ffn_gate_inp.bias", "mlp.router.bias"),
                            ("ffn_down_exps.bias", "mlp.experts.down_proj_bias")),
                        joined=(("mlp.experts.gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                                 "interleave_t"),
                                ("mlp.experts.gate_up_proj_bias", ("ffn_gate_exps.bias", "ffn_up_exps.bias"),
                                 "interleave"),
                                ("mlp.experts.down_proj", ("ffn_down_exps.weight",), "t")),
                        # GPT-OSS's published rope_scaling (yarn over 4096 positions, not truncated)
                        yarn_fixed=(("truncate", False),)),
}

#: whole-model tensors
MODEL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
#: stacked expert tensors -> the role (gate, up, down) of the family's per-expert tensor
_EXPERT_ROLES = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1, "ffn_down_exps.weight": 2}

#: pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's names; its llama-vocab.cpp lists the same),
#: applied in order as the tokenizer.json of the models they come from applies them
PRE_TOKENIZER_REGEX = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",),
    "gpt-4o": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its magic, not its name)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConvertError("reading GGUF files needs the gguf package: pip install 'moestream[gguf]' "
                           "(or pip install gguf)") from None
    return gguf


def split_files(path: Path) -> list[Path]:
    """Every file of a split GGUF given any one of them (in order), or [path]; ConvertError naming
    the first that is missing."""
    m = SPLIT_NAME.fullmatch(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for f in files:
        if not f.is_file():
            raise ConvertError(f"{f}: missing ({path.name} is part {int(m['index'])} of a {count}-file split GGUF)")
    return files


class GgufCheckpoint(TensorTable):
    """A GGUF file (or split set) presented with HFCheckpoint's interface: `config`, `tensors`
    (Hugging Face name -> TensorInfo), `info`, `row`, `read`, `read_info`, `copies()`."""

    fp8_block = None
    mxfp4 = False
    holder = "the GGUF"

    def __init__(self, src: str | os.PathLike):
        self.gguf = _gguf()
        self.root = Path(src)
        self.files = split_files(self.root)
        readers = []
        for f in self.files:
            try:
                readers.append(self.gguf.GGUFReader(str(f), "r"))
            except Exception as e:     # gguf-py raises ValueError, struct.error, ... on a damaged file
                raise ConvertError(f"{f}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.meta = {k: self._value(f) for k, f in readers[0].fields.items()}
        arch_name = self.meta.get("general.architecture")
        self.arch = GGUF_ARCHITECTURES.get(arch_name)
        if self.arch is None:
            raise ConvertError(f"{self.root}: GGUF architecture {arch_name!r} is not one moestream converts "
                               f"(it converts {', '.join(GGUF_ARCHITECTURES)})")
        self.family = FAMILIES[self.arch.family]
        raw: dict[str, tuple[Path, Any]] = {}
        for f, r in zip(self.files, readers):
            for t in r.tensors:
                raw[t.name] = (f, t)
        self.config = self._config(raw)
        self.tensors: dict[str, TensorInfo] = {}
        self._types: dict[str, str] = {}          # Hugging Face name -> GGML type name
        #: tensors rebuilt from GGUF parts (GgufArch.joined): name -> (the parts, how)
        self._joined: dict[str, tuple[tuple[TensorInfo, ...], str]] = {}
        part_names = {p for _, parts, _ in self.arch.joined for p in parts}
        parts: dict[int, dict[str, tuple[Path, Any]]] = {}
        for gname, (f, t) in raw.items():
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
            if m and m[2] in part_names:
                parts.setdefault(int(m[1]), {})[m[2]] = (f, t)
            else:
                self._add(gname, f, t)
        for layer, got in sorted(parts.items()):
            for name, names, how in self.arch.joined:
                if any(p in got for p in names):
                    self._join(layer, name, names, how, got)

    # ---- metadata -------------------------------------------------------------------------

    @staticmethod
    def _value(field) -> Any:
        """A metadata field's value as Python: str, number, bool or list of them."""
        from gguf import GGUFValueType
        types = field.types
        if not types:
            return None
        if types[0] == GGUFValueType.ARRAY:
            inner = types[-1]
            if inner == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
            return [field.parts[i].tolist()[0] for i in field.data]
        if types[0] == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        v = field.parts[field.data[0]].tolist()[0]
        return bool(v) if types[0] == GGUFValueType.BOOL else v

    def _config(self, raw: dict) -> dict[str, Any]:
        a = self.arch
        cfg: dict[str, Any] = {"model_type": a.family, "architectures": [self.family.transformers_config
                                                                        .replace("Config", "ForCausalLM")]}
        for key, gkey in a.config:
            v = self.meta.get(f"{a.name}.{gkey}")
            if v is not None:
                cfg[key] = v
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", self.family.num_experts_key):
            if key not in cfg:
                raise ConvertError(f"{self.root}: GGUF metadata lacks {a.name}.{dict(a.config).get(key, key)}")
        if f"{a.name}.expert_count" not in self.meta:
            raise ConvertError(f"{self.root}: a {a.name} GGUF without {a.name}.expert_count is not a mixture of "
                               "experts (moestream converts MoE models)")
        cfg.update(dict(a.fixed))
        if a.derive is not None:
            a.derive(lambda key: self.meta.get(f"{a.name}.{key}"), cfg, str(self.root))
        cfg["rope_parameters"] = self._rope(cfg.pop("rope_theta", 10000.0))
        # the embedding's rows are the model's vocabulary (a token list may be longer or shorter)
        tokens = self.meta.get("tokenizer.ggml.tokens")
        vocab = int(raw["token_embd.weight"][1].shape[1]) if "token_embd.weight" in raw else (
            self.meta.get(f"{a.name}.vocab_size") or (len(tokens) if tokens else None))
        if vocab is None:
            raise ConvertError(f"{self.root}: no vocabulary size (no {a.name}.vocab_size, tokens or token_embd)")
        cfg["vocab_size"] = vocab
        cfg["tie_word_embeddings"] = "output.weight" not in raw
        for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            v = self.meta.get(f"tokenizer.ggml.{gkey}")
            if v is not None:
                cfg[key] = v
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        return cfg

    def _rope(self, theta: float) -> dict[str, Any]:
        """transformers 5's rope_parameters from rope.* (rope.scaling.type none, linear or yarn);
        ConvertError naming the key for a scaling moestream does not map."""
        a = self.arch.name

        def meta(key: str) -> Any:
            return self.meta.get(f"{a}.rope.scaling.{key}")
        params: dict[str, Any] = {"rope_theta": float(theta), "rope_type": "default"}
        kind = meta("type")
        if kind in (None, "none"):
            return params
        factor = meta("factor")
        if kind not in ("linear", "yarn") or not isinstance(factor, (int, float)) or factor <= 0:
            raise ConvertError(f"{self.root}: rope scaling {kind!r} with factor {factor!r} ({a}.rope.scaling.type, "
                               f"{a}.rope.scaling.factor) is not converted (moestream maps linear and yarn)")
        params.update(rope_type=kind, factor=float(factor))
        if kind == "linear":
            return params
        orig = meta("original_context_length")
        if not isinstance(orig, int) or orig <= 0:
            raise ConvertError(f"{self.root}: yarn rope scaling without {a}.rope.scaling.original_context_length")
        params["original_max_position_embeddings"] = orig
        params.update(dict(self.arch.yarn_fixed))
        # (what convert_hf_to_gguf writes from a Hugging Face rope_scaling, mapped back)
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if meta(key) is not None:
                params[hf] = float(meta(key))
        for key in ("attn_factor", "yarn_ext_factor"):
            if meta(key) not in (None, 1.0, 1):
                raise ConvertError(f"{self.root}: {a}.rope.scaling.{key} = {meta(key)!r} is not converted yet")
        log_mul = meta("yarn_log_multiplier")
        if log_mul is not None:
            if not self.arch.yarn_log_mul_is_mscale:
                raise ConvertError(f"{self.root}: {a}.rope.scaling.yarn_log_multiplier is not converted for {a}")
            # llama.cpp writes DeepSeek's 0.1 * mscale_all_dim here (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX);
            # V3, R1 and Kimi-K2 have mscale == mscale_all_dim, which makes the yarn attention factor 1
            # (a float32 key: the quotient is rounded back to float32's precision, 1.0 stays 1.0)
            params["mscale"] = params["mscale_all_dim"] = float(np.float32(float(log_mul) / 0.1))
        return params

    # ---- tensors --------------------------------------------------------------------------

    def _hf_name(self, gname: str) -> Optional[tuple[str, Optional[int]]]:
        """(Hugging Face name, expert role or None) of a GGUF tensor name; None if unknown."""
        if gname in MODEL_TENSORS:
            return MODEL_TENSORS[gname], None
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
        if not m:
            return None
        layer, rest = int(m[1]), m[2]
        if rest in _EXPERT_ROLES:
            return f"{layer}", _EXPERT_ROLES[rest]
        hf = dict(self.arch.layer_tensors).get(rest)
        return (f"model.layers.{layer}.{hf}", None) if hf else None

    def _add(self, gname: str, path: Path, t) -> None:
        mapped = self._hf_name(gname)
        if mapped is None:
            raise ConvertError(f"{path}: tensor {gname} is not part of the {self.arch.name} layout moestream "
                               "converts")
        qtype = self.gguf.GGMLQuantizationType(int(t.tensor_type)).name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))     # GGML lists the innermost first
        offset, length = int(t.data_offset), int(t.n_bytes)
        name, role = mapped
        if role is not None:
            if len(shape) != 3:
                raise ConvertError(f"{path}: {gname} has shape {list(shape)}; stacked experts are [E, rows, cols]")
            layer, per = int(name), length // shape[0]
            tensor = self.family.gate_up_down[role]
            for e in range(shape[0]):
                hf = self.family.expert_tensor_name(layer, e, tensor)
                self._put(hf, path, qtype, shape[1:], offset + e * per, per)
            return
        if name.endswith("shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, shape[0])          # llama.cpp stores the [1, H] gate as [H]
        self._put(name, path, qtype, shape, offset, length)

    def _put(self, name: str, path: Path, qtype: str, shape: tuple[int, ...], offset: int, length: int) -> None:
        if name in self.tensors:
            raise ConvertError(f"{path}: tensor {name} appears twice in the GGUF")
        dtype = RAW_TYPES[qtype][0] if qtype in RAW_TYPES else "fp32"
        self.tensors[name] = TensorInfo(name, path, dtype, shape, offset, length,
                                        ggml_type=None if qtype in RAW_TYPES else qtype)
        self._types[name] = qtype

    def _info(self, gname: str, path: Path, t) -> TensorInfo:
        """A GGUF tensor under its own name (a part of a joined tensor), its type noted."""
        qtype = self.gguf.GGMLQuantizationType(int(t.tensor_type)).name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        self._types[gname] = qtype
        return TensorInfo(gname, path, RAW_TYPES[qtype][0] if qtype in RAW_TYPES else "fp32", shape,
                          int(t.data_offset), int(t.n_bytes), ggml_type=None if qtype in RAW_TYPES else qtype)

    def _join(self, layer: int, hf: str, names: tuple[str, ...], how: str, got: dict[str, tuple[Path, Any]]) -> None:
        """Register model.layers.`layer`.`hf`, rebuilt from the GGUF tensors `names` of the layer as
        JOINS[`how`] says; ConvertError naming the file and tensor for a missing part or a shape the
        metadata does not give."""
        missing = [p for p in names if p not in got]
        if missing:
            f = next(iter(got.values()))[0]
            raise ConvertError(f"{f}: blk.{layer}.{missing[0]} is missing (llama.cpp writes model.layers.{layer}.{hf} "
                               f"as {' and '.join(f'blk.{layer}.{p}' for p in names)})")
        parts = tuple(self._info(f"blk.{layer}.{p}", *got[p]) for p in names)
        shape = self._joined_shape(parts, how)
        name = f"model.layers.{layer}.{hf}"
        types = {self._types[p.name] for p in parts}
        raw = len(types) == 1 and types <= RAW_TYPES.keys() and len({p.dtype for p in parts}) == 1
        self.tensors[name] = TensorInfo(name, parts[0].path, parts[0].dtype if raw else "fp32", shape, parts[0].offset,
                                        sum(p.length for p in parts),
                                        ggml_type=None if raw else next(t for t in types if t not in RAW_TYPES))
        self._types[name] = "joined"
        self._joined[name] = (parts, how)

    def _joined_shape(self, parts: tuple[TensorInfo, ...], how: str) -> tuple[int, ...]:
        """The shape `how` makes of `parts`; ConvertError naming a part whose shape does not fit."""
        first = parts[0]

        def bad(part: TensorInfo, want) -> ConvertError:
            return ConvertError(f"{part.path}: {part.name} has shape {list(part.shape)}; expected {list(want)}")
        if how == "kv_b":
            c = self.config
            heads, nope, v, rank = (c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"])
            for part, want in zip(parts, ((heads, rank, nope), (heads, v, rank))):
                if part.shape != want:
                    raise bad(part, want)         # the metadata's MLA sizes give `want`
            return heads * (nope + v), rank
        for part in parts[1:]:
            if part.shape != first.shape:
                raise bad(part, first.shape)
        if how == "interleave_t":
            if len(first.shape) != 3:
                raise bad(first, ("E", "I", "H"))
            e, i, h = first.shape
            return e, h, 2 * i
        if how == "interleave":
            if len(first.shape) != 2:
                raise bad(first, ("E", "I"))
            return first.shape[0], 2 * first.shape[1]
        assert how == "t", how
        if len(first.shape) != 3:
            raise bad(first, ("E", "R", "C"))
        return first.shape[0], first.shape[2], first.shape[1]

    def row(self, name: str, index: int) -> TensorInfo:
        """Row `index` (one expert) of a fused [E, ...] tensor: of a GGUF tensor, or of each part of
        a joined one, which read_info then joins."""
        t = self.info(name)
        if not t.shape or not 0 <= index < t.shape[0]:
            raise ConvertError(f"{t.path}: {name} has shape {list(t.shape)}, no row {index}")
        if name not in self._joined:
            return self._row(t, index)
        parts, how = self._joined[name]
        rows = tuple(self._row(p, index) for p in parts)
        out = TensorInfo(f"{name}[{index}]", rows[0].path, t.dtype, t.shape[1:], rows[0].offset,
                         sum(r.length for r in rows), ggml_type=t.ggml_type)
        self._types[out.name] = "joined"
        self._joined[out.name] = (rows, how)
        return out

    def _row(self, t: TensorInfo, index: int) -> TensorInfo:
        """Row `index` of GGUF tensor `t` (whole rows are whole blocks: a row holds whole matrix rows)."""
        size = t.length // t.shape[0]
        out = TensorInfo(f"{t.name}[{index}]", t.path, t.dtype, t.shape[1:], t.offset + index * size, size,
                         ggml_type=t.ggml_type)
        self._types[out.name] = self._types[t.name]
        return out

    def read(self, name: str) -> np.ndarray:
        return self.read_info(self.info(name))

    def read_info(self, t: TensorInfo) -> np.ndarray:
        """The bit patterns of tensor `t` in t.dtype: raw F32/F16/BF16 as stored, quantized types
        dequantized to float32 (gguf-py's reference dequantizer), q/k rows un-permuted where
        llama.cpp permuted them."""
        qtype = self._types[t.name]
        if t.name in self._joined:
            return self._read_joined(t)
        data = self._read_raw(t)
        if qtype in RAW_TYPES:
            bits = data.view(RAW_TYPES[qtype][1])
        else:
            rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
            try:
                vals = self.gguf.quants.dequantize(data.reshape(rows, -1), self.gguf.GGMLQuantizationType[qtype])
            except NotImplementedError:
                raise ConvertError(f"{t.path}: {t.name} is {qtype}, which gguf-py cannot dequantize") from None
            bits = np.ascontiguousarray(vals, np.float32).reshape(-1).view(np.uint32)
        heads = self._permuted_heads(t.name)
        if heads:
            bits = _unpermute_rows(bits.reshape(t.shape), heads).reshape(-1)
        return bits

    def _joined_planes(self, t: TensorInfo, group: int) -> bytes:
        """read_planes of a joined GPT-OSS expert matrix (one expert's row): down_proj's part as it
        is; gate_up_proj's two parts with their rows interleaved (gate row i -> 2i, up row i -> 2i + 1:
        whole rows, so whole groups)."""
        parts, how = self._joined[t.name]
        if how not in ("interleave_t", "t"):
            raise ConvertError(f"{t.path}: {t.name} is not stored as its own blocks")
        planes = []
        for p in parts:
            rows = p.shape[0]
            payload = np.frombuffer(self.read_planes(p, group), np.uint8)
            codes_len = QuantSpec(NATIVE_TYPES[self._types[p.name]][0], group).code_bytes(int(np.prod(p.shape)))
            planes.append((payload[:codes_len].reshape(rows, -1), payload[codes_len:].reshape(rows, -1)))
        if len(planes) == 1:
            return b"".join(x.tobytes() for x in planes[0])
        return b"".join(np.stack([a[i] for a in planes], axis=1).reshape(-1).tobytes() for i in (0, 1))

    def _read_joined(self, t: TensorInfo) -> np.ndarray:
        """The bits (t.dtype) of a tensor rebuilt from its parts as JOINS says (parts of different
        types are joined as float32)."""
        parts, how = self._joined[t.name]
        xs = [self.read_info(p).reshape(p.shape) for p in parts]
        if len({x.dtype for x in xs}) > 1 or t.dtype != parts[0].dtype:
            from .codecs import bits_to_float32
            xs = [bits_to_float32(x, p.dtype).view(np.uint32) for x, p in zip(xs, parts)]
        if how == "kv_b":
            k, v = xs
            out = np.concatenate([k.swapaxes(1, 2), v], axis=1)
        elif how == "interleave_t":
            out = np.stack([x.swapaxes(-1, -2) for x in xs], axis=-1)
        elif how == "interleave":
            out = np.stack(xs, axis=-1)
        else:
            out = xs[0].swapaxes(-1, -2)
        return np.ascontiguousarray(out).reshape(-1)

    def planes_transposed(self, t: TensorInfo) -> bool:
        """Whether read_planes(t) holds t's transpose: a tensor llama.cpp transposed (GPT-OSS's experts)."""
        return t.name in self._joined and self._joined[t.name][1] in ("interleave_t", "t")

    def read_planes(self, t: TensorInfo, group: int) -> bytes:
        """Tensor `t` (a NATIVE_TYPES block type) as the payload of our group-wise type: codes,
        fp16 scales, fp16 minimums (int4), in QuantSpec's layout (formats/constants.py); `group`
        must be its type's. A joined GPT-OSS expert matrix: the matrix llama.cpp stored (its parts'
        rows, gate and up interleaved), i.e. t's transpose (planes_transposed)."""
        if t.name in self._joined:
            return self._joined_planes(t, group)
        qtype = self._types[t.name]
        if qtype not in NATIVE_TYPES or self._permuted_heads(t.name) or NATIVE_TYPES[qtype][1] != group:
            raise ConvertError(f"{t.path}: {t.name} is {qtype}, which is not stored as its own blocks"
                               + (f" in groups of {group}" if qtype in NATIVE_TYPES else ""))
        bsize, bbytes = self.gguf.GGML_QUANT_SIZES[self.gguf.GGMLQuantizationType[qtype]]
        blocks = self._read_raw(t).reshape(-1, bbytes)
        f16 = np.float16
        if qtype == "MXFP4":         # {e8m0 e, qs[16]}: element j in byte j's low nibble, j+16 in its high one
            qs = blocks[:, 1:]
            return _pack_nibbles(np.concatenate([qs & 15, qs >> 4], axis=1)) + blocks[:, 0].tobytes()
        if qtype == "Q8_0":          # {fp16 d, int8 q[32]}: w = d·q
            return blocks[:, 2:].tobytes() + blocks[:, :2].copy().view(f16).tobytes()
        if qtype == "Q4_0":          # {fp16 d, q[16]}: element j in byte j's low nibble, j+16 in its high one
            d = blocks[:, :2].copy().view(f16).reshape(-1)
            qs = blocks[:, 2:]
            codes = np.concatenate([qs & 15, qs >> 4], axis=1)                      # [blocks, 32] in order
            return _pack_nibbles(codes) + d.tobytes() + (d.astype(np.float32) * -8).astype(f16).tobytes()
        # Q4_K: {fp16 d, fp16 dmin, scales[12], q[128]}, 8 sub-blocks of 32; w = d·sc·q - dmin·m
        d = blocks[:, 0:2].copy().view(f16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(f16).astype(np.float32)
        sc, m = self.gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])                 # [blocks, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 32)              # 64 elements a row: low nibbles, then high ones
        codes = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 32)                 # [blocks*8, 32]
        scales = (d * sc.astype(np.float32)).astype(f16).reshape(-1)
        mins = (-dmin * m.astype(np.float32)).astype(f16).reshape(-1)
        return _pack_nibbles(codes) + scales.tobytes() + mins.tobytes()

    def _read_raw(self, t: TensorInfo) -> np.ndarray:
        buf = bytearray(t.length)
        with open(t.path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf)) if f.seek(t.offset) == t.offset else 0
        if got != t.length:
            raise ConvertError(f"{t.path}: short read of {t.name} at offset {t.offset}")
        return np.frombuffer(buf, np.uint8)

    def _permuted_heads(self, name: str) -> int:
        if not self.arch.permuted_qk:
            return 0
        if name.endswith("self_attn.q_proj.weight"):
            return self.config["num_attention_heads"]
        if name.endswith("self_attn.k_proj.weight"):
            return self.config["num_key_value_heads"]
        return 0

    # ---- what the store carries beside the tensors ----------------------------------------

    def config_label(self) -> str:
        return f"{self.root} (GGUF metadata)"

    def copies(self) -> dict[str, bytes]:
        """config.json and, where the GGUF's tokenizer converts, tokenizer.json."""
        out = {"config.json": json.dumps(self.config, indent=2).encode()}
        tok = self.tokenizer_json()
        if tok is not None:
            out["tokenizer.json"] = tok
        return out

    def tokenizer_note(self) -> Optional[str]:
        """Why the store gets no tokenizer.json, or None when it does."""
        return self._tokenizer[1]

    def tokenizer_json(self) -> Optional[bytes]:
        """tokenizer.ggml.* as a tokenizers `tokenizer.json`; None where tokenizer_note says why not."""
        return self._tokenizer[0]

    @functools.cached_property
    def _tokenizer(self) -> tuple[Optional[bytes], Optional[str]]:
        """(tokenizer.json, None), or (None, why not). A byte-level BPE ('gpt2': Qwen, GPT-2 style)
        is converted here; every other tokenizer model (SentencePiece 'llama': Mixtral, Llama 2;
        'gemma', ...) by transformers' own GGUF tokenizer reader where transformers is installed,
        the way `AutoTokenizer.from_pretrained(..., gguf_file=...)` reads it."""
        model = self.meta.get("tokenizer.ggml.model")
        if model is None:
            return None, "the GGUF carries no tokenizer"
        if model == "gpt2":
            pre = self.meta.get("tokenizer.ggml.pre", "gpt-2")
            if pre not in PRE_TOKENIZER_REGEX:
                # another split would tokenize some text differently from the model's own tokenizer
                return None, (f"its pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one moestream maps "
                              f"({', '.join(PRE_TOKENIZER_REGEX)}); give the store the model's tokenizer.json")
            return self._byte_level_bpe(), None
        try:
            from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        except ImportError:
            return None, (f"its tokenizer model {model!r} is converted by transformers' GGUF reader: install "
                          "transformers (moestream[hf]) and convert again")
        try:
            arch, tokenizer_dict, _ = get_gguf_tokenizer(str(self.files[0]))
            backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
        except Exception as e:       # transformers' own refusal (an unknown model), named as it says it
            return None, f"transformers could not build its tokenizer model {model!r}: {e}"
        return backend.to_str().encode(), None

    def _byte_level_bpe(self) -> bytes:
        """tokenizer.ggml.* of a byte-level BPE: tokens, merges, token types, pre-tokenizer."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        tokens = self.meta.get("tokenizer.ggml.tokens") or []
        merges = [tuple(m.split(" ", 1)) for m in self.meta.get("tokenizer.ggml.merges") or []]
        types = self.meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
        patterns = PRE_TOKENIZER_REGEX[self.meta.get("tokenizer.ggml.pre", "gpt-2")]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])        # CONTROL
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 4])                 # USER_DEFINED
        return tok.to_str().encode()


def _pack_nibbles(codes: np.ndarray) -> bytes:
    """int4 codes in element order -> our packing: element 2j in byte j's low nibble."""
    flat = codes.reshape(-1)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf's LlamaModel.permute): within each
    head, rows were reordered from Hugging Face's [first half, second half] to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
