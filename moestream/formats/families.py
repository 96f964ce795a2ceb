"""Where each supported model family keeps its routed experts in a Hugging Face checkpoint
(the layout `save_pretrained` writes). Everything not matched here is a dense tensor."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional

from ..errors import ConvertError


@dataclass(frozen=True)
class Family:
    name: str                          # model_type in config.json
    expert_prefix: str                 # format(layer=, expert=) -> tensor name prefix
    expert_tensors: tuple[str, ...]    # suffixes: name = prefix + t + ".weight" (the store's order)
    num_experts_key: str
    gate_up_down: tuple[str, str, str]  # which expert tensor is the gate, the up and the down projection
    expert_intermediate_key: str       # config key of an expert's intermediate size
    router: str                        # format(layer=) -> the router's weight name
    renormalise_topk: bool | None      # top-k weights rescaled to sum to one: always (True), or None: config's norm_topk_prob
    transformers_config: str           # the transformers config class (tests and the demo build models from it)
    demo_config: tuple[tuple[str, Any], ...] = ()  # what a small test model of the family sets beyond the common sizes
    standard_attention: bool = True    # q/k/v/o shapes follow heads x head_dim (checked by the converter)
    #: fused layout: each expert tensor holds every expert of the layer, [E, ...] (name = prefix + t,
    #: prefix without {expert}); per-expert shapes in "h" (hidden), "i" (expert intermediate), "2i"
    fused_shapes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: a record derived from transformers' own model class for a family with no record here
    #: (integrations/transformers.derive_family); the store's index carries it
    derived: bool = False
    #: derived records: each expert tensor's shape (the store's per-expert shape; no config key names it)
    tensor_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: derived fused records: the checkpoint name of each expert tensor, format(layer=), where it is
    #: not prefix + tensor (transformers renames it on load, e.g. GraniteMoE's input_linear.weight)
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def renormalises(self, config: dict[str, Any]) -> bool:
        """Whether the router's top-k weights are rescaled to sum to one under `config`."""
        return self.renormalise_topk if self.renormalise_topk is not None else bool(config.get("norm_topk_prob", False))

    @property
    def fused(self) -> bool:
        return bool(self.fused_shapes)

    def expert_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape each of one expert's tensors must have under `config`."""
        if self.tensor_shapes:
            return dict(self.tensor_shapes)
        h, i = config["hidden_size"], config[self.expert_intermediate_key]
        if self.fused:
            size = {"h": h, "i": i, "2i": 2 * i}
            return {t: tuple(size[d] for d in dims) for t, dims in self.fused_shapes}
        gate, up, down = self.gate_up_down
        return {gate: (i, h), up: (i, h), down: (h, i)}

    def dense_shapes(self, config: dict[str, Any], layers: Iterator[int], moe_layers) -> dict[str, tuple[int, ...]]:
        """The shapes of the dense tensors whose size the config fixes (embeddings, attention
        projections, routers); others (norms, biases, shared experts) are not checked here. None
        for a derived record: transformers' own state dict checks those (engines.dense_problems)."""
        if self.derived:
            return {}
        h, v = config["hidden_size"], config["vocab_size"]
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        d = config.get("head_dim") or h // heads
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h)}
        for l in layers:
            p = f"model.layers.{l}.self_attn."
            if not self.standard_attention:
                if l in moe_layers:
                    out[self.router.format(layer=l)] = (self.num_experts(config), h)
                continue
            out.update({p + "q_proj.weight": (heads * d, h), p + "k_proj.weight": (kv * d, h),
                        p + "v_proj.weight": (kv * d, h), p + "o_proj.weight": (h, heads * d)})
            if l in moe_layers:
                out[self.router.format(layer=l)] = (self.num_experts(config), h)
        return out

    def expert_index(self, tensor_name: str) -> tuple[int, int] | None:
        """(layer, expert) of a per-expert tensor name of this family, else None (always None
        for a fused layout, whose tensors hold every expert)."""
        if self.fused:
            return None
        m = re.fullmatch(re.escape(self.expert_prefix).replace(r"\{layer\}", r"(\d+)").replace(r"\{expert\}", r"(\d+)")
                         + r"[^.]+\.weight", tensor_name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def expert_tensor_name(self, layer: int, expert: int, tensor: str) -> str:
        """The checkpoint tensor holding `tensor` of (layer, expert): its own, or (fused) the
        layer's [E, ...] tensor whose row `expert` it is."""
        if self.fused:
            return dict(self.checkpoint_names).get(tensor, self.expert_prefix + tensor).format(layer=layer)
        return f"{self.expert_prefix.format(layer=layer, expert=expert)}{tensor}.weight"

    def num_experts(self, config: dict[str, Any]) -> int:
        for key in (self.num_experts_key, "num_experts", "num_local_experts"):
            v = config.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16:
                return v
        raise ConvertError(f"config.json of a {self.name} model has no {self.num_experts_key}")

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (a derived record travels in the store's index)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def from_json(doc: Any, where: str) -> "Family":
        """A record written by to_json; ValueError naming `where` and the field otherwise."""
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected an object")
        kinds = {"name": str, "expert_prefix": str, "num_experts_key": str, "expert_intermediate_key": str,
                 "router": str, "transformers_config": str, "standard_attention": bool, "derived": bool}
        out = {}
        for f in fields(Family):
            if f.name not in doc:
                raise ValueError(f"{where}: missing field {f.name!r}")
            v = doc[f.name]
            if f.name in kinds and not isinstance(v, kinds[f.name]):
                raise ValueError(f"{where}: field {f.name!r} must be a {kinds[f.name].__name__}")
            out[f.name] = tup(v)
        if out["renormalise_topk"] not in (True, False, None):
            raise ValueError(f"{where}: field 'renormalise_topk' must be true, false or null")
        names = out["expert_tensors"]
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"{where}: field 'expert_tensors' must list names")
        gud = out["gate_up_down"]
        if not (isinstance(gud, tuple) and len(gud) == 3 and all(isinstance(t, str) for t in gud)
                and all(t in names for t in gud if t)):
            raise ValueError(f"{where}: field 'gate_up_down' must name three of the expert tensors")
        for key, elem in (("tensor_shapes", int), ("fused_shapes", str)):
            for item in out[key]:
                if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                        and isinstance(item[1], tuple) and all(isinstance(d, elem) and not isinstance(d, bool)
                                                               for d in item[1])):
                    raise ValueError(f"{where}: field {key!r} must hold [name, [dims]] pairs")
        for item in out["checkpoint_names"]:
            if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise ValueError(f"{where}: field 'checkpoint_names' must hold [tensor, name] pairs")
        out["demo_config"] = ()
        return Family(**out)


_SWIGLU = ("gate_proj", "up_proj", "down_proj")
_QWEN = dict(expert_tensors=_SWIGLU, num_experts_key="num_experts", gate_up_down=_SWIGLU,
             expert_intermediate_key="moe_intermediate_size", router="model.layers.{layer}.mlp.gate.weight",
             renormalise_topk=None)
#: One record per family: the converter, the loader, the demo, the tests and the benchmarks all
#: take their facts from here.
FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "model.layers.{layer}.block_sparse_moe.experts.{expert}.", ("w1", "w2", "w3"),
                      "num_local_experts", ("w1", "w3", "w2"), "intermediate_size",
                      "model.layers.{layer}.block_sparse_moe.gate.weight", True, "MixtralConfig",
                      (("num_local_experts", 8),)),
    "qwen2_moe": Family("qwen2_moe", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="Qwen2MoeConfig",
                        demo_config=(("num_experts", 8), ("shared_expert_intermediate_size", 80),
                                     ("norm_topk_prob", False)), **_QWEN),
    "qwen3_moe": Family("qwen3_moe", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="Qwen3MoeConfig",
                        demo_config=(("num_experts", 8), ("head_dim", 16), ("norm_topk_prob", True)), **_QWEN),
    "olmoe": Family("olmoe", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="OlmoeConfig",
                    demo_config=(("num_experts", 8), ("norm_topk_prob", False)),
                    **dict(_QWEN, expert_intermediate_key="intermediate_size")),   # OLMoE's experts use intermediate_size
    # run by transformers' own classes (moestream.from_pretrained / generate --engine transformers);
    # moestream has no native forward for these
    "deepseek_v3": Family("deepseek_v3", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="DeepseekV3Config",
                          demo_config=(("n_routed_experts", 8), ("n_shared_experts", 1), ("first_k_dense_replace", 1),
                                       ("num_hidden_layers", 3), ("n_group", 2), ("topk_group", 1),
                                       ("kv_lora_rank", 16), ("q_lora_rank", 24), ("qk_rope_head_dim", 8),
                                       ("qk_nope_head_dim", 8), ("v_head_dim", 16), ("rope_scaling", None)),
                          standard_attention=False, **dict(_QWEN, num_experts_key="n_routed_experts")),
    "glm4_moe": Family("glm4_moe", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="Glm4MoeConfig",
                       demo_config=(("n_routed_experts", 8), ("n_shared_experts", 1), ("first_k_dense_replace", 1),
                                    ("num_hidden_layers", 3), ("head_dim", 16)),
                       **dict(_QWEN, num_experts_key="n_routed_experts")),
    "qwen3_next": Family("qwen3_next", "model.layers.{layer}.mlp.experts.{expert}.", transformers_config="Qwen3NextConfig",
                         demo_config=(("num_experts", 8), ("shared_expert_intermediate_size", 48), ("num_hidden_layers", 4),
                                      ("head_dim", 16), ("linear_key_head_dim", 16), ("linear_value_head_dim", 16),
                                      ("linear_num_key_heads", 2), ("linear_num_value_heads", 4)),
                         standard_attention=False, **_QWEN),   # gated full attention + linear attention layers
    # fused, transposed, gate/up interleaved, with biases; its clamped SwiGLU is transformers' _apply_gate
    "gpt_oss": Family("gpt_oss", "model.layers.{layer}.mlp.experts.",
                      ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"), "num_local_experts",
                      ("gate_up_proj", "gate_up_proj", "down_proj"), "intermediate_size",
                      "model.layers.{layer}.mlp.router.weight", None, "GptOssConfig",
                      (("num_local_experts", 8), ("num_hidden_layers", 2), ("head_dim", 16), ("sliding_window", 8),
                       ("bos_token_id", 1), ("eos_token_id", 2)),
                      fused_shapes=(("gate_up_proj", ("h", "2i")), ("gate_up_proj_bias", ("2i",)),
                                    ("down_proj", ("i", "h")), ("down_proj_bias", ("h",)))),
}

#: Config fields every family needs, with the largest value accepted (larger is a mistake or
#: hostile, and would allocate absurd caches).
_CONFIG_INTS = {"hidden_size": 1 << 17, "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
                "vocab_size": 1 << 22, "num_experts_per_tok": 1 << 10}
_OPTIONAL_INTS = {"num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "max_position_embeddings": 1 << 24,
                  "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20}


def check_config(config: Any, where: str = "config.json", error: type[Exception] = ConvertError,
                 family: Optional[Family] = None) -> dict[str, Any]:
    """Refuse a config a model cannot be built from, naming the file and the field: a missing or
    non-integer size, a zero or absurd one, heads that do not divide, top-k above the experts.
    family: the record to check against (a derived one), else the config's model_type's.
    Raises `error` (ConvertError for a checkpoint, FormatError for a store)."""
    try:
        return _check_config(config, where, family)
    except ConvertError as e:
        if error is ConvertError:
            raise
        raise error(str(e)) from None


#: what a config of a family with a derived record must set (transformers' config class checks the rest)
_DERIVED_REQUIRED = ("hidden_size", "num_hidden_layers", "vocab_size")


def _check_sizes(config: Any, where: str, required: tuple[str, ...]) -> None:
    """The sizes a config sets are integers in range; `required` ones are set."""
    if not isinstance(config, dict):
        raise ConvertError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key, limit in (_CONFIG_INTS | _OPTIONAL_INTS).items():
        v = config.get(key)
        if v is None and key not in required:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConvertError(f"{where}: {key} must be an integer, got {v!r}")
        if not 1 <= v <= limit:
            raise ConvertError(f"{where}: {key} = {v} is out of range (1 to {limit})")


def _check_config(config: Any, where: str, fam: Optional[Family]) -> dict[str, Any]:
    fam = fam or family_for(config, where)      # (both paths refuse a non-object)
    if fam.derived:
        # a family of transformers': its own config class checks the rest when it builds the model
        _check_sizes(config, where, _DERIVED_REQUIRED)
        n, k = fam.num_experts(config), config.get("num_experts_per_tok")
        if isinstance(k, int) and k > n:
            raise ConvertError(f"{where}: num_experts_per_tok = {k} exceeds the {n} experts")
        return config
    _check_sizes(config, where, (*_CONFIG_INTS, fam.expert_intermediate_key))
    n = fam.num_experts(config)
    if config["num_experts_per_tok"] > n:
        raise ConvertError(f"{where}: num_experts_per_tok = {config['num_experts_per_tok']} exceeds the {n} experts")
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if config["num_attention_heads"] % kv:
        raise ConvertError(f"{where}: num_attention_heads {config['num_attention_heads']} is not a multiple of "
                           f"num_key_value_heads {kv}")
    return config


#: (config, where) -> the derived record of a family FAMILIES lacks, or ConvertError saying why
#: there is none; given by the edge (engines.derive_family: transformers' model classes)
DeriveFamily = Callable[[dict, str], Family]


def family_for(config: dict[str, Any], where: str = "config.json", derive: Optional[DeriveFamily] = None) -> Family:
    """The family of a Hugging Face config: its record here, else (given `derive`) one derived
    from transformers; ConvertError naming the architecture otherwise."""
    if not isinstance(config, dict):
        raise ConvertError(f"{where}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if derive is not None and isinstance(model_type, str):
        _check_sizes(config, where, _DERIVED_REQUIRED)
        return derive(config, where)
    archs = config.get("architectures") or [model_type]
    raise ConvertError(f"{where}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                       f"supported: {', '.join(sorted(FAMILIES))}")
