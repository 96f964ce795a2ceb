"""moestream as the weight store of a transformers model: an experts implementation named
"moestream" in transformers' `ALL_EXPERTS_FUNCTIONS`, and `from_store`, which builds the model
class the store's config names with its experts never materialised.

    import moestream
    model = moestream.from_pretrained("mixtral.moe", device_budget="8GiB")   # a transformers model
    out = model.generate(input_ids, max_new_tokens=32, do_sample=True)       # experts stream from the store

This is the only module that imports transformers at run time (the `hf` extra). The experts of
each MoE layer keep transformers' own router, gating (`_apply_gate`, e.g. a clamped SwiGLU) and
post-expert norm; only their weights come from the Store, computed in arrival order by the same
loop as moestream's own forward (compute/models/common.py: stream_experts)."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..compute.dequant import dequantize
from ..compute.models.common import route_on_host, stream_experts
from ..compute.quant_kernels import quant_linear
from ..formats.quantized import QuantizedTensor
from ..errors import MoestreamError
from ..formats.families import FAMILIES
from ..storage.store import parse_device

IMPLEMENTATION = "moestream"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moestream_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward: hidden_states [N, H], top_k_index / top_k_weights [N, A]
    -> [N, H]. The experts' weights come from the Store attached by `from_store`."""
    binding = getattr(self, "_moestream", None)
    if binding is None:
        raise MoestreamError(f"{type(self).__name__}: the 'moestream' experts implementation needs a model built by "
                             "moestream.from_pretrained (no store attached to this experts module)")
    store, layer, names = binding
    out = torch.zeros_like(hidden_states)                                        # [N, H]
    dtype = hidden_states.dtype

    def compute(e: int, w: dict, rows_l: list[int], slots_l: list[int]) -> None:
        rows = torch.tensor(rows_l, device=hidden_states.device)
        y = _expert_output(self, hidden_states[rows], w, names, dtype)                # [n, H]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        slots = torch.tensor(slots_l, device=hidden_states.device)
        out.index_add_(0, rows, (y * top_k_weights[rows, slots, None]).to(out.dtype))

    stream_experts(store, layer, route_on_host(top_k_index), compute)
    return out


def _expert_output(module, h: torch.Tensor, w: dict, names: tuple[str, str, str], dtype) -> torch.Tensor:
    """One expert of `module` (a transformers experts class) on its tokens h [n, H] -> [n, H],
    with its weights `w` from the Store; gating by the module's own _apply_gate."""
    def bias(name: str) -> Optional[torch.Tensor]:
        return w[name + "_bias"].to(dtype) if module.has_bias and name + "_bias" in w else None

    def weight(name: str) -> torch.Tensor:
        t = w[name]
        return t.dequantize(dequantize, dtype) if isinstance(t, QuantizedTensor) else t.to(dtype)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        # a quantized [out, in] matrix is multiplied where it lies (compute/quant_kernels.py)
        if isinstance(w[name], QuantizedTensor):
            y = quant_linear(x, w[name])
            b = bias(name)
            return y + b if b is not None else y
        return F.linear(x, w[name].to(dtype), bias(name))

    if "gate_up_proj" in w:                      # a fused layout (GPT-OSS): the module's own row layout
        gu = _matmul(h, weight("gate_up_proj"), module.is_transposed, bias("gate_up_proj"))   # [n, 2I]
        return _matmul(module._apply_gate(gu), weight("down_proj"), module.is_transposed, bias("down_proj"))
    gate_name, up_name, down_name = names
    up = linear(h, up_name)                                                      # [n, I]
    if module.has_gate:
        gate = linear(h, gate_name)                                              # [n, I]
        # the layout _apply_gate expects: [gate | up], or interleaved [g0, u0, g1, u1, ...]
        gu = torch.cat([gate, up], -1) if module.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
        act = module._apply_gate(gu)
    else:
        act = module.act_fn(up)
    return linear(act, down_name)                                                # [n, H]


def _matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [n, in] times one expert's weight: [in, out] when transposed, else [out, in] (nn.Linear)."""
    y = x @ w if transposed else F.linear(x, w)
    return y + bias if bias is not None else y


def register() -> None:
    """Register the "moestream" experts implementation (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moestream_experts_forward)


def _renamed(name: str, renames: list[tuple[str, str]]) -> str:
    for src, dst in renames:
        name = re.sub(src, dst, name)
    return name


def from_store(path: str | os.PathLike, *, device: str = "cpu", device_budget: int | str | None = None,
               host_budget: int | str | None = None, dtype: Optional[torch.dtype] = None,
               expert_compute: str = "quantized", **store_options: Any):
    """The transformers model of the store at `path`, its routed experts streaming from a Store
    (`model.moestream_store`: stats, budgets; close it when done). Dense weights are loaded once
    onto `device`; the experts' parameters are never allocated. dtype: default float32 on CPU,
    bfloat16 on CUDA. Budgets as in `moestream.open`. expert_compute as in `moestream.load_model`:
    "quantized" holds int8/int4 experts as stored and multiplies them in place, "dequantized"
    decodes them on load."""
    from ..compute.loader import open_compute_store
    dev = parse_device(device)
    store = open_compute_store(path, device=dev, expert_compute=expert_compute, device_budget=device_budget,
                               host_budget=host_budget, **store_options)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    try:
        idx = store.index
        family = FAMILIES.get(idx.architecture)
        if family is None:
            raise MoestreamError(f"{path}: no family record for {idx.architecture!r}")
        model, config, experts = _meta_model(store.config, dtype)
        if sorted(experts) != sorted(idx.moe_layers):
            raise MoestreamError(f"{path}: the store has MoE layers {list(idx.moe_layers)}, transformers' "
                                 f"{type(model).__name__} has experts in {sorted(experts)}")
        for layer, module in experts.items():
            module._moestream = (store, layer, family.gate_up_down)
        dense = store.dense()
        problems = _state_problems(model, config, {k: tuple(v.shape) for k, v in dense.items()})
        if problems:
            raise MoestreamError(f"{path}: dense tensors do not match transformers' {type(model).__name__}: "
                                 + "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
        model = model.to_empty(device=dev)
        renames = _renames(config)
        state = {_renamed(k, renames): v.to(dtype) for k, v in dense.items()}
        if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=False, assign=True)
        _rebuild_rotary(model, dev)
        model.moestream_store = store
        return model.eval()
    except BaseException:
        store.close()
        raise


def _meta_model(store_config: dict, dtype: torch.dtype):
    """transformers' model of `store_config` on the meta device with its routed experts' parameters
    dropped (the Store holds them): (model, config, {layer: experts module})."""
    import transformers
    from transformers import AutoModelForCausalLM
    register()
    config = transformers.AutoConfig.for_model(**{k: v for k, v in store_config.items()
                                                 if k not in ("architectures", "transformers_version")})
    config._experts_implementation = IMPLEMENTATION
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=IMPLEMENTATION)
    experts = {}
    for name, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "_apply_gate"):
            m = _LAYER.search(name + ".")
            if m is None:
                raise MoestreamError(f"transformers' {name} holds experts outside any numbered layer")
            experts[int(m.group(1))] = module
    for module in experts.values():
        for pname, _ in list(module.named_parameters(recurse=False)):
            delattr(module, pname)
    return model, config, experts


def _renames(config) -> list[tuple[str, str]]:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    return [(src, dst) for r in (get_checkpoint_conversion_mapping(config.model_type) or [])
            if type(r).__name__ == "WeightRenaming"
            for src, dst in zip(r.source_patterns, r.target_patterns)]


def _state_problems(model, config, dense: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps `dense` (checkpoint name -> shape) from loading into the meta `model`, one line each."""
    from ..compute.loader import state_problems
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary_emb" not in k}
    renames = _renames(config)
    have = {_renamed(name, renames): (name, shape) for name, shape in dense.items()}
    return state_problems(want, have, f"transformers' {type(model).__name__}",
                          tie_embedding="model.embed_tokens.weight" if getattr(config, "tie_word_embeddings", False)
                          else None)


def dense_problems(architecture: str, config: dict, moe_layers, experts_per_layer: int,
                   dense: dict[str, tuple[int, ...]]) -> list[str]:
    """As compute.loader.dense_problems, for a family run by transformers' own classes."""
    model, hf_config, experts = _meta_model(config, torch.float32)
    problems = _state_problems(model, hf_config, dense)
    if sorted(experts) != sorted(moe_layers):
        problems.append(f"the store has MoE layers {list(moe_layers)}, transformers' {type(model).__name__} "
                        f"has experts in {sorted(experts)}")
    return problems


def load_tokenizer(path: str | os.PathLike):
    """transformers' tokenizer of the store at `path`: AutoTokenizer.from_pretrained(path) on the
    plain copies a store holds next to its files, or, for a store written before those existed,
    from the (checksummed) tokenizer files it carries."""
    import tempfile
    from transformers import AutoTokenizer
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path)
    from ..formats.reader import StoreReader
    with StoreReader(path) as r, tempfile.TemporaryDirectory(prefix="moestream-tokenizer-") as tmp:
        names = [n for n in r.index.blobs if n.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                             "chat_template"))]
        if "tokenizer.json" not in names:
            raise MoestreamError(f"{path}: the store carries no tokenizer.json")
        for name in names:
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(r.blob(name))
        return AutoTokenizer.from_pretrained(tmp)


def _rebuild_rotary(model, dev: torch.device) -> None:
    """Rotary embeddings keep their frequencies in non-persistent buffers, computed in
    __init__ (on meta here): build each again on the device."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            with torch.device(dev):
                fresh = type(module)(config=module.config)
            setattr(parent, name.rpartition(".")[2], fresh)
