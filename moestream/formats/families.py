"""Where each supported model family keeps its routed experts in a Hugging Face checkpoint
(the layout `save_pretrained` writes). Everything not matched here is a dense tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConvertError


@dataclass(frozen=True)
class Family:
    name: str                          # model_type in config.json
    expert_prefix: str                 # format(layer=, expert=) -> tensor name prefix
    expert_tensors: tuple[str, ...]    # suffixes: name = prefix + t + ".weight"
    num_experts_key: str

    def expert_tensor_name(self, layer: int, expert: int, tensor: str) -> str:
        return f"{self.expert_prefix.format(layer=layer, expert=expert)}{tensor}.weight"

    def num_experts(self, config: dict[str, Any]) -> int:
        for key in (self.num_experts_key, "num_experts", "num_local_experts"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
        raise ConvertError(f"config.json of a {self.name} model has no {self.num_experts_key}")


_SWIGLU = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "model.layers.{layer}.block_sparse_moe.experts.{expert}.", ("w1", "w2", "w3"),
                      "num_local_experts"),
    "qwen2_moe": Family("qwen2_moe", "model.layers.{layer}.mlp.experts.{expert}.", _SWIGLU, "num_experts"),
    "qwen3_moe": Family("qwen3_moe", "model.layers.{layer}.mlp.experts.{expert}.", _SWIGLU, "num_experts"),
    "olmoe": Family("olmoe", "model.layers.{layer}.mlp.experts.{expert}.", _SWIGLU, "num_experts"),
}


def family_for(config: dict[str, Any], where: str = "config.json") -> Family:
    """The family of a Hugging Face config; ConvertError naming the architecture otherwise."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        archs = config.get("architectures") or [model_type]
        raise ConvertError(f"{where}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                           f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
