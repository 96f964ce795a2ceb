"""moestream as the weight store of a transformers model: an experts implementation named
"moestream" in transformers' `ALL_EXPERTS_FUNCTIONS`, and `from_store`, which builds the model
class the store's config names with its experts never materialised.

    import moestream
    model = moestream.from_pretrained("mixtral.moe", device_budget="8GiB")   # a transformers model
    out = model.generate(input_ids, max_new_tokens=32, do_sample=True)       # experts stream from the store

This is the only module that imports transformers at run time (the `hf` extra). The experts of
each MoE layer keep transformers' own router, gating (`_apply_gate`, e.g. a clamped SwiGLU) and
post-expert norm; only their weights come from the Store, computed in arrival order by the same
loop as moestream's own forward (compute/models/common.py: stream_experts). Experts that are a
plain SwiGLU (plain_swiglu) take moestream's forward's own path, a layer's routed experts in one
kernel call (routed_experts_output)."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..compute.dequant import dequantize
from ..compute.models.common import route_on_host, routed_experts_output, stream_experts
from ..compute.quant_kernels import quant_linear
from ..formats.quantized import QuantizedTensor
from ..errors import MoestreamError
from ..errors import ConvertError
from ..formats.families import Family
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
    store, layer, names, fused, swiglu = binding
    if swiglu:
        # the module computes what moestream's own forward does: the layer's routed experts in
        # one kernel call (those the kernel cannot read, or prefill rows beyond its gemm_rows,
        # still take torch per expert inside routed_experts_output)
        return routed_experts_output(store, layer, names, hidden_states, top_k_weights, top_k_index)[0]
    out = torch.zeros_like(hidden_states)                                        # [N, H]
    dtype = hidden_states.dtype

    def compute(e: int, w: dict, rows_l: list[int], slots_l: list[int]) -> None:
        rows = torch.tensor(rows_l, device=hidden_states.device)
        y = _expert_output(self, hidden_states[rows], w, names, fused, dtype)         # [n, H]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        slots = torch.tensor(slots_l, device=hidden_states.device)
        out.index_add_(0, rows, (y * top_k_weights[rows, slots, None]).to(out.dtype))

    stream_experts(store, layer, route_on_host(top_k_index), compute)
    return out


def plain_swiglu(module: torch.nn.Module, fused: bool) -> bool:
    """Whether the experts `module` compute down(silu(gate(x)) * up(x)) and nothing else, their
    weights stored one [out, in] matrix per projection: transformers' default `_apply_gate` with a
    SiLU, no biases, no post-expert norm, not fused (the experts of moestream's own forward;
    Qwen-, DeepSeek-, Mixtral-like families). Anything else keeps its own gating per expert."""
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:            # a transformers without them: the per-expert path is always right
        return False
    return (not fused and getattr(module, "has_gate", False) and not getattr(module, "has_bias", True)
            and not getattr(module, "has_post_expert_norm", True)
            and getattr(type(module), "_apply_gate", None) is _default_apply_gate
            and type(getattr(module, "act_fn", None)) in (torch.nn.SiLU, SiLUActivation))


def _expert_output(module, h: torch.Tensor, w: dict, names: tuple[str, str, str], fused: bool, dtype) -> torch.Tensor:
    """One expert of `module` (a transformers experts class) on its tokens h [n, H] -> [n, H],
    with its weights `w` from the Store: the checkpoint's gate, up and down projections (`names`;
    no gate: ""), or (`fused`) its rows of the module's own parameters; gating by the module's
    own _apply_gate."""
    def bias(name: str) -> Optional[torch.Tensor]:
        return w[name + "_bias"].to(dtype) if module.has_bias and name + "_bias" in w else None

    def weight(name: str) -> torch.Tensor:
        t = w[name]
        if isinstance(t, QuantizedTensor):     # the module's own orientation (a transposed one's [in, out])
            d = t.dequantize(dequantize, dtype)
            return d.t() if t.transposed else d
        return t.to(dtype)

    def fused_matmul(x: torch.Tensor, name: str) -> torch.Tensor:
        t = w[name]
        if isinstance(t, QuantizedTensor) and t.transposed and module.is_transposed:
            # held as the checkpoint's [out, in] rows (GPT-OSS's MXFP4): x · param = x · Wᵀ
            y = quant_linear(x, t)
            b = bias(name)
            return y + b if b is not None else y
        return _matmul(x, weight(name), module.is_transposed, bias(name))

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        # a quantized [out, in] matrix is multiplied where it lies (compute/quant_kernels.py)
        if isinstance(w[name], QuantizedTensor):
            y = quant_linear(x, w[name])
            b = bias(name)
            return y + b if b is not None else y
        return F.linear(x, w[name].to(dtype), bias(name))

    if fused:                                    # the module's own row layout (GPT-OSS, GraniteMoE)
        first = "gate_up_proj" if module.has_gate else "up_proj"
        gu = fused_matmul(h, first)                                                          # [n, 2I] or [n, I]
        act = module._apply_gate(gu) if module.has_gate else module.act_fn(gu)
        return fused_matmul(act, "down_proj")
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
    from ..compute.loader import open_compute_store, trim_heap
    dev = parse_device(device)
    store = open_compute_store(path, device=dev, expert_compute=expert_compute, device_budget=device_budget,
                               host_budget=host_budget, **store_options)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    try:
        idx = store.index
        family = idx.family_record
        model, config, experts = _meta_model(store.config, dtype)
        if sorted(experts) != sorted(idx.moe_layers):
            raise MoestreamError(f"{path}: the store has MoE layers {list(idx.moe_layers)}, transformers' "
                                 f"{type(model).__name__} has experts in {sorted(experts)}")
        for layer, module in experts.items():
            module._moestream = (store, layer, family.gate_up_down, family.fused, plain_swiglu(module, family.fused))
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
        del dense, state
        trim_heap()
        return model.eval()
    except BaseException:
        store.close()
        raise


def _meta_model(store_config: dict, dtype: torch.dtype, drop_experts: bool = True):
    """transformers' model of `store_config` on the meta device, its routed experts' parameters
    dropped unless drop_experts is False (the Store holds them): (model, config, {layer: experts
    module})."""
    import transformers
    from transformers import AutoModelForCausalLM
    register()
    config = transformers.AutoConfig.for_model(**{k: v for k, v in store_config.items()
                                                 if k not in ("architectures", "transformers_version")})
    config._experts_implementation = IMPLEMENTATION
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=IMPLEMENTATION)
    experts = {layer: module for layer, (_, module) in _experts_modules(model).items()}
    if drop_experts:
        for module in experts.values():
            for pname, _ in list(module.named_parameters(recurse=False)):
                delattr(module, pname)
    return model, config, experts


def _experts_modules(model) -> dict[int, tuple[str, Any]]:
    """The experts modules of `model` (the classes transformers' use_experts_implementation
    decorates), by decoder layer: {layer: (module name, module)}."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "_apply_gate"):
            m = _LAYER.search(name + ".")
            if m is None:
                raise MoestreamError(f"transformers' {name} holds experts outside any numbered layer")
            if int(m.group(1)) in out:
                raise MoestreamError(f"transformers' {type(model).__name__} has two experts modules in layer "
                                     f"{m.group(1)} ({out[int(m.group(1))][0]}, {name})")
            out[int(m.group(1))] = (name, module)
    return out


#: the parameters of an experts module the engine computes with (_expert_output); a module with
#: others is not one moestream can run
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
_PER_EXPERT = re.compile(r"(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<tensor>[A-Za-z_]\w*)\.weight")
_NUM_EXPERTS_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_routed_experts")


def derive_family(config: dict, where: str = "config.json") -> Family:
    """The family record of a transformers MoE family that formats/families.py has none of,
    derived from transformers itself: its model class is built on the meta device from `config`,
    its experts modules (the classes `use_experts_implementation` decorates) give the MoE layers
    and each expert's parameters and shapes, and transformers' own checkpoint conversion (the
    rules from_pretrained applies on load and reverts on save_pretrained) gives the names those
    parameters have in a checkpoint. A per-expert checkpoint (experts.{e}.gate_proj.weight ...)
    is stored one tensor per projection; a fused one ([E, ...] tensors) one row per expert.
    ConvertError naming the architecture and why when no record can be derived."""
    model_type = config.get("model_type")
    arch = (config.get("architectures") or [model_type])[0]
    try:
        return _derive(config, model_type)
    except _Refused as e:
        raise ConvertError(f"{where}: unsupported architecture {arch!r} (model_type {model_type!r}): {e}") from None


class _Refused(Exception):
    """Why a family's record cannot be derived (derive_family names the file and architecture)."""


def _derive(config: dict, model_type: str) -> Family:
    try:
        model, hf_config, experts = _meta_model(config, torch.float32, drop_experts=False)
        modules = _experts_modules(model)
    except MoestreamError as e:
        raise _Refused(str(e)) from None
    except Exception as e:   # transformers' own refusal: unknown model_type, no causal-LM class, a bad config
        raise _Refused(f"transformers cannot build a causal LM from it ({type(e).__name__}: {str(e)[:300]})") from None
    cls = type(model).__name__
    if not modules:
        raise _Refused(f"transformers' {cls} has no experts module "
                       "(a class decorated with use_experts_implementation)")
    first = min(modules)
    params0 = {n: tuple(p.shape) for n, p in modules[first][1].named_parameters(recurse=False)}
    odd = sorted(set(params0) - set(_EXPERT_PARAMS))
    if odd:
        raise _Refused(f"the experts of transformers' {cls} hold "
                       f"{', '.join(odd)} besides their projections")
    n_experts = {shape[0] for shape in params0.values()}
    if len(n_experts) != 1:
        raise _Refused(f"the experts parameters of transformers' {cls} disagree on the number of experts")
    n_experts = n_experts.pop()
    module0 = modules[first][1]
    for layer, (name, module) in modules.items():
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        if shapes != params0:
            raise _Refused(f"the experts of {name} ({shapes}) differ from "
                           f"those of layer {first} ({params0}); a store holds one expert shape")
        flags = [(m.has_gate, m.has_bias, m.is_transposed, m.is_concatenated) for m in (module, module0)]
        if flags[0] != flags[1]:
            raise _Refused(f"the experts of {name} differ in layout from "
                           f"layer {first}'s")
    # the checkpoint's names of each parameter, layer by layer
    names = {(layer, p): _checkpoint_names(model, f"{name}.{p}", module.get_parameter(p))
             for layer, (name, module) in modules.items() for p in params0}
    per_expert = {p for p in params0 if any(_PER_EXPERT.fullmatch(n) for n in names[first, p])}
    if per_expert and per_expert != set(params0):
        raise _Refused(f"{cls}'s checkpoints hold {sorted(per_expert)} per "
                       f"expert and {sorted(set(params0) - per_expert)} fused")
    key = next((k for k in _NUM_EXPERTS_KEYS if config.get(k) == n_experts), None) or next(
        (k for k, v in config.items() if "expert" in k and v == n_experts and type(v) is int), None)
    if key is None:
        raise _Refused(f"transformers' {cls} has {n_experts} experts per layer, but no field of the "
                       "config says so (num_experts, n_routed_experts, num_local_experts, ...)")
    common = dict(name=model_type, num_experts_key=key, expert_intermediate_key="", router="", renormalise_topk=None,
                  transformers_config=type(hf_config).__name__, standard_attention=False, derived=True)
    if not per_expert:
        return _fused_family(cls, modules, names, params0, module0, common)
    return _per_expert_family(cls, model, modules, names, params0, module0, n_experts, common)


def _checkpoint_names(model, param: str, meta: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors transformers' save_pretrained writes for one parameter of `model`
    (its conversion mapping reverted), with their shapes."""
    from transformers.core_model_loading import revert_weight_conversion
    return {n: tuple(t.shape) for n, t in revert_weight_conversion(model, {param: meta}).items()}


def _layer_template(names: dict, modules: dict, param: str, name_of) -> str:
    """One checkpoint name pattern, format(layer=), that `name_of(names of a layer)` follows in
    every MoE layer."""
    first = min(modules)
    name0 = name_of(names[first, param])
    marker = f"layers.{first}."
    if name0.count(marker) != 1:
        raise _Refused(f"checkpoint name {name0} does not name its layer "
                       "once as layers.N")
    template = name0.replace(marker, "layers.{layer}.")
    for layer in modules:
        if name_of(names[layer, param]) != template.format(layer=layer):
            raise _Refused(f"checkpoint names of layer {layer} "
                           f"({name_of(names[layer, param])}) do not follow {template}")
    return template


def _fused_family(cls, modules, names, params0, module0, common) -> Family:
    """Checkpoints that hold each parameter as one [E, ...] tensor (GPT-OSS, GraniteMoE): a
    stored expert is its row of each, named by the module's parameter."""
    first = min(modules)
    for p, shape in params0.items():
        got = names[first, p]
        if len(got) != 1 or next(iter(got.values())) != shape:
            raise _Refused(f"transformers converts {cls}'s {p} from "
                           f"{dict(got)}, not one [E, ...] tensor or one tensor per expert")
    templates = {p: _layer_template(names, modules, p, lambda n: next(iter(n))) for p in params0}
    prefix = templates[next(iter(params0))].rpartition(".")[0] + "."
    # ... and a parameter whose checkpoint name is not prefix + its name: its own template
    ckpt_names = [(p, t) for p, t in templates.items() if t != prefix + p]
    tensors = tuple(params0)
    gate_or_up = "gate_up_proj" if module0.has_gate else "up_proj"
    return Family(expert_prefix=prefix, expert_tensors=tensors, gate_up_down=(
        gate_or_up if module0.has_gate else "", gate_or_up, "down_proj"),
        tensor_shapes=tuple((p, params0[p][1:]) for p in tensors),
        fused_shapes=tuple((p, tuple(f"d{i}" for i in range(len(params0[p]) - 1))) for p in tensors),
        checkpoint_names=tuple(ckpt_names), **common)


def _per_expert_family(cls, model, modules, names, params0, module0, n_experts, common) -> Family:
    """Checkpoints that hold one tensor per expert and projection (experts.{e}.gate_proj.weight):
    each is stored as it is. Which is the gate, the up and the down projection is found by
    reverting transformers' conversion on a small tensor of known values: gate and up are the
    two halves of gate_up_proj's rows (its concatenated layout), down is down_proj."""
    from transformers.core_model_loading import revert_weight_conversion
    if module0.is_transposed or module0.has_bias or (module0.has_gate and not module0.is_concatenated):
        raise _Refused(f"{cls}'s per-expert checkpoints convert to a "
                       "transposed, biased or interleaved experts layout, which is not split per expert yet")
    first = min(modules)
    name = modules[first][0]
    roles: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for p, shape in params0.items():
        rows, cols = (4 if shape[1] % 2 == 0 else 3), (4 if shape[2] % 2 == 0 else 3)
        probe = torch.arange(n_experts * rows * cols, dtype=torch.float64).reshape(n_experts, rows, cols)
        try:
            out = revert_weight_conversion(model, {f"{name}.{p}": probe})
        except Exception as e:
            raise _Refused(f"transformers' conversion of {cls}'s {p} "
                           f"cannot be followed per expert ({type(e).__name__}: {e})") from None
        halves = {"whole": (0, rows), "first": (0, rows // 2), "second": (rows // 2, rows)}
        for ckpt_name, t in out.items():
            m = _PER_EXPERT.fullmatch(ckpt_name)
            e = int(m.group("expert")) if m else -1
            part = next((k for k, (a, b) in halves.items() if 0 <= e < n_experts and tuple(t.shape) == (b - a, cols)
                         and torch.equal(t, probe[e, a:b])), None) if m else None
            if part is None:
                raise _Refused(f"transformers builds {cls}'s {p} from "
                               f"{ckpt_name} in a way other than one expert's rows of it")
            role = {"whole": "down" if p.startswith("down") else "up", "first": "gate", "second": "up"}[part]
            if p.startswith("down") != (role == "down") or (role == "gate" and not module0.has_gate):
                raise _Refused(f"{cls}'s {ckpt_name} is the {part} of {p}")
            tensor = m.group("tensor")
            if roles.setdefault(tensor, role) != role:
                raise _Refused(f"{cls}'s expert tensor {tensor} has two roles")
        for ckpt_name, shape_of in names[first, p].items():
            shapes[_PER_EXPERT.fullmatch(ckpt_name).group("tensor")] = shape_of
    by_role = {r: t for t, r in roles.items()}
    if len(by_role) != len(roles) or "down" not in by_role or "up" not in by_role:
        raise _Refused(f"{cls}'s expert tensors {sorted(roles)} are not "
                       "a gate, an up and a down projection")
    template = _layer_template(names, modules, next(iter(params0)), lambda n: min(n))
    expert_prefix = _PER_EXPERT.fullmatch(template.format(layer="{layer}")).group("prefix") + ".{expert}."
    # every layer's names are those the template gives (one prefix for all of an expert's tensors)
    for layer in modules:
        want = {f"{expert_prefix.format(layer=layer, expert=e)}{t}.weight" for e in range(n_experts) for t in roles}
        got = {n for p in params0 for n in names[layer, p]}
        if got != want:
            raise _Refused(f"{cls}'s checkpoint names in layer {layer} do not "
                           f"follow {expert_prefix}<tensor>.weight")
    tensors = tuple(sorted(roles))
    return Family(expert_prefix=expert_prefix, expert_tensors=tensors,
                  gate_up_down=(by_role.get("gate", ""), by_role["up"], by_role["down"]),
                  tensor_shapes=tuple((t, shapes[t]) for t in tensors), **common)


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
