"""`load_model`: a store -> a torch module whose routed experts stream from the Store."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import FormatError, MoestreamError, UsageError
from ..formats.families import FAMILIES, check_config
from ..formats.codecs import TORCH_DTYPES
from ..formats.constants import FLOAT8_QUANTS, INT_QUANTS, MIXED_QUANT
from ..storage.store import Store, parse_device
from . import decode_layer, decode_moe
from .dequant import dequantize, store_dequant
from .models import mixtral, olmoe, qwen2_moe, qwen3_moe
from .models.common import Attention, CausalLM, ModelConfig, Rotary, StreamingMoE
from .quant_kernels import bf16_decode_linears, quantize_linears
from .predictor import NextLayerProbes

#: How int8/int4 experts are computed (load_model's expert_compute), the default first.
EXPERT_COMPUTE = ("quantized", "dequantized")
#: The forward of each family (its facts: formats.families.FAMILIES).
FORWARDS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe}


def load_model(path: str | os.PathLike, *, device: str = "cpu", device_budget: int | str | None = None,
               host_budget: int | str | None = None, dtype: Optional[torch.dtype] = None,
               prefetch: bool = False, prefetch_threshold: float = 0.0, extra_guesses: int = 0,
               predictor: "str | os.PathLike | NextLayerProbes | None" = None, expert_compute: str = "quantized",
               dense_quant: Optional[str] = "auto", **store_options) -> CausalLM:
    """Open the store at `path` and build its model on `device`.

    Dense weights (embeddings, attention, norms, routers, shared experts) are loaded once;
    routed experts stay in the store and are fetched per layer as the router picks them, within
    `device_budget`/`host_budget` bytes (see moestream.open). dtype: compute dtype (default
    bfloat16 on CUDA; on CPU the dtype experts decode to: bf16 for int8/int4 and bf16 stores, so
    no expert is cast at every use, and fp32 for fp32 stores). prefetch: while a layer computes, prefetch the experts
    that the next layer's router picks on the current residual stream (speculative, bounded by
    the store's prefetch_budget), only experts whose router probability there reaches
    `prefetch_threshold` (0: every guess). Off by default: it cuts stall time, but the wrong guesses'
    reads, and on few cores the compute the hidden reads take back, cost more than it saves in
    every run so far (`moestream bench decode`, bench/prefetch.py, README). Every layer's
    experts are guessed (the first layer's from the token's embedding), the top-k of the guess
    and `extra_guesses` more: for prefetch and for recorded traces (docs/CACHING.md: one more
    guess cuts demand reads 3x in the cache simulator, and is slower on a 2-core machine).
    predictor: next-layer probes (a file from `moestream fit-predictor`, or a NextLayerProbes)
    that make the guesses instead of the routers (compute/predictor.py).
    expert_compute: "quantized" (default) holds int8/int4 experts in their stored form in every
    tier and multiplies them there (compute/quant_kernels.py; the budgets count those bytes);
    "dequantized" decodes them to bf16 on load, as before (more bytes an expert, the bf16
    matmuls). Lossless stores are the same either way.
    dense_quant: the dense linear layers (attention, shared experts, dense MLPs, lm_head; not the
    routers) quantized once at load and multiplied by the same kernels: "int8" or "int4" (group
    of an int store's, else 64), None to keep them in `dtype`, "auto" (default): int8 on a CPU for an
    int8/int4/mixed/float8 store computed quantized, None otherwise.
    At decode they are the largest read of a token after the experts (2 layers of Qwen3-30B-A3B's
    shapes: 88 MB of bf16 against 42 MB of int4 experts). `model(input_ids [B, T]) -> logits float32 [B, T, V]`;
    `model.generate(...)`; `model.store.stats()`. Close with `model.store.close()`."""
    dev = parse_device(device)
    dtype = _parse_dtype(dtype)
    if not (isinstance(prefetch_threshold, (int, float)) and 0.0 <= prefetch_threshold <= 1.0):
        raise UsageError(f"prefetch_threshold={prefetch_threshold!r}: must be a number in 0..1")
    store = open_compute_store(path, device=dev, expert_compute=expert_compute, device_budget=device_budget,
                               host_budget=host_budget, **store_options)
    try:
        idx = store.index
        if dtype is None:  # compute in the experts' own dtype on a CPU: no cast of every expert at every use
            first = next(iter(idx.extents.values())).tensors[0].dtype
            dtype = torch.bfloat16 if dev.type == "cuda" else TORCH_DTYPES[first]
        family = FORWARDS.get(idx.architecture)
        if family is None:
            raise MoestreamError(f"{path}: moestream has no native forward for {idx.architecture!r} (it has "
                                 f"{', '.join(FORWARDS)}); run it through transformers: moestream.from_pretrained, "
                                 "or generate --engine transformers")
        hf = check_config(store.config, f"{path}: config", FormatError)
        cfg = ModelConfig.from_hf(hf, FAMILIES[idx.architecture], idx.moe_layers, idx.experts_per_layer)
        if not 0 <= extra_guesses <= cfg.num_experts - cfg.top_k:
            raise UsageError(f"extra_guesses={extra_guesses}: must lie in 0..{cfg.num_experts - cfg.top_k} "
                             f"({cfg.num_experts} experts per layer, top-{cfg.top_k})")
        with torch.device("meta"):
            model = family.build(cfg, store, hf)
        model = model.to_empty(device=dev)
        dense = store.dense()
        problems = _state_problems(model, {k: tuple(v.shape) for k, v in dense.items()}, cfg, family)
        if problems:
            raise MoestreamError(f"{path}: dense tensors do not match the {idx.architecture} model: "
                                 + "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
        state = _dense_state(dense, cfg, getattr(family, "CHECKPOINT_RENAMES", {}), dtype)
        model.load_state_dict(state, strict=False, assign=True)
        # the model now holds the only references: each weight quantized below is freed as its
        # module is replaced
        del dense, state
        model.rotary = Rotary(cfg)
        model.to(device=dev, dtype=dtype)
        model.rotary.inv_freq = Rotary(cfg).inv_freq.to(dev)  # keep the frequencies in float32
        dense_quant = _dense_quant(dense_quant, idx, dev, expert_compute)
        routers = {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, StreamingMoE)}
        if dev.type == "cpu" and dtype == torch.bfloat16:
            # routers keep their bf16 weights and take the kernel's bf16 dot at decode: float32
            # accumulation, the logits rounded to bf16 as before. torch's bf16 GEMV of a 128x2048
            # router took 68 us, its float32 one 22 (held in float32 until 2026-12-02), in the model
            # ~190 us a call beside Numba's threads (py-spy)
            bf16_decode_linears(model, skip=lambda name: name not in routers)
        elif dev.type == "cpu" and dtype != torch.float32:
            for mlp in model.moe_layers().values():   # StreamingMoE.router_logits: float32 GEMV, same rounding
                mlp.gate.float()

        def kept(name: str) -> bool:      # routers and gates stay as above / torch's
            return name in routers or name.endswith("shared_expert_gate")
        if dense_quant is not None:
            model.dense_quant = dense_quant
            # the store's group where it is an int store's (a float8 store's follows its checkpoint's blocks)
            quantize_linears(model, dense_quant, idx.group_size if idx.quant in (*INT_QUANTS, MIXED_QUANT) else 64,
                             skip=kept)
        elif dev.type == "cpu" and dtype == torch.bfloat16:
            bf16_decode_linears(model, skip=kept)
        for module in model.modules():    # q, k, v in one call (in their final form: after the above)
            if isinstance(module, Attention):
                module.fuse_projections()
        model.prefetch_next_layer = prefetch
        model.prefetch_threshold = float(prefetch_threshold)
        model.guess_width = cfg.top_k + int(extra_guesses)
        model.dequant = store_dequant(store)
        if predictor is not None:
            given = isinstance(predictor, NextLayerProbes)
            probes = predictor if given else NextLayerProbes.load(predictor)
            model.use_probes(probes, "predictor" if given else f"{predictor}: does not fit {path}")
        if dev.type == "cpu":
            # the decode kernels' machine code and the experts' layouts now, not in the first token
            decode_moe.warm_up(store, sorted(model.moe_layers()), cfg.expert_names)
            if dtype == torch.bfloat16:
                decode_layer.warm_up()
        trim_heap()
        return model.eval()
    except BaseException:
        store.close()
        raise


def trim_heap() -> bool:
    """Give the heap memory that loading freed back to the OS (glibc's malloc_trim; False where
    there is none). Loading reads the dense weights in the store's dtype and quantizes them
    through float32 copies; glibc keeps what that frees in its heap (its mmap threshold grows
    with every large block freed), and a process under a memory limit pays for it as if it were
    cache: 8 layers of bench decode's model held 400 MB more RSS after load without this."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        return bool(name) and bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to trim this way
        return False


def open_compute_store(path: str | os.PathLike, *, device, expert_compute: str = "quantized",
                       **store_options) -> Store:
    """The Store an engine computes from (load_model, the transformers engine, the vLLM plug):
    expert_compute "quantized" holds int8/int4 experts as stored for the quantized kernels,
    "dequantized" decodes them on load, with compute's dequantizer either way; store_options
    (budgets, policy, ...) as Store takes them. The caller closes it."""
    if expert_compute not in EXPERT_COMPUTE:
        raise UsageError(f"expert_compute={expert_compute!r}: choose one of {', '.join(EXPERT_COMPUTE)}")
    store_options.setdefault("dequantize", dequantize)
    store_options.setdefault("keep_quantized", expert_compute == "quantized")
    return Store(path, device=device, **store_options)


#: what load_model's dense_quant="auto" quantizes an int store's dense layers to
DEFAULT_DENSE_QUANT = "int8"

#: compute dtypes load_model takes, by torch dtype or name
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype in COMPUTE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype.removeprefix("torch.")]
    raise UsageError(f"dtype={dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)} (a name or the torch dtype)")


def _dense_quant(choice: Optional[str], idx, dev: torch.device, expert_compute: str) -> Optional[str]:
    if choice == "auto":
        if dev.type != "cpu" or expert_compute != "quantized" or idx.quant not in (*INT_QUANTS, *FLOAT8_QUANTS,
                                                                                   MIXED_QUANT):
            return None
        # int8 for int4 stores too: on the trained routing model int8 dense layers add 0.0004
        # nats/token of KL to int4 experts' 0.0074, int4 ones 0.012 (bench/mixed_precision.py);
        # and for float8 stores, whose dense weights came from FP8 (bench decode's 2-layer model:
        # 127 tok/s against 103 with them in bf16, 3 alternating rounds)
        return DEFAULT_DENSE_QUANT
    if choice is not None and choice not in INT_QUANTS:
        raise UsageError(f"dense_quant={choice!r}: choose one of auto, {', '.join(INT_QUANTS)} or None")
    return choice


def dense_problems(architecture: str, config: dict, moe_layers, experts_per_layer: int,
                   dense: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps `dense` (checkpoint tensor name -> shape) from loading into the native forward of
    `architecture` under `config`, one line each (missing, unexpected, wrong shape); empty when it
    loads. The converter and `verify` ask this (injected at the edge: formats never import compute)
    so that a store that converts and verifies is one that loads. The model is built on the meta
    device: nothing is allocated."""
    family = FORWARDS[architecture]
    hf = check_config(config, "config", FormatError)
    cfg = ModelConfig.from_hf(hf, FAMILIES[architecture], moe_layers, experts_per_layer)
    with torch.device("meta"):
        model = family.build(cfg, None, hf)
    return _state_problems(model, dense, cfg, family)


def _state_problems(model: torch.nn.Module, dense: dict[str, tuple[int, ...]], cfg: ModelConfig, family) -> list[str]:
    renames = getattr(family, "CHECKPOINT_RENAMES", {})
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    have = {_state_key(name, renames): (name, shape) for name, shape in dense.items()}
    return state_problems(want, have, f"the {cfg.family} model",
                          tie_embedding="embed_tokens.weight" if cfg.tie_word_embeddings else None,
                          checkpoint_name=lambda key: key if key.startswith("lm_head") else "model." + key)


def state_problems(want: dict[str, tuple[int, ...]], have: dict[str, tuple[str, tuple[int, ...]]], model: str, *,
                   tie_embedding: Optional[str] = None, checkpoint_name=lambda key: key) -> list[str]:
    """What keeps a checkpoint's dense tensors from loading into a model, one line each (the
    native forward's and transformers' checks share it). want: the model's state key -> shape;
    have: state key -> (checkpoint name, shape); model: how to name it ("the mixtral model");
    tie_embedding: the embedding's state key when lm_head is tied to it (then it need not be
    there); checkpoint_name: the checkpoint name of a missing state key."""
    if tie_embedding is not None and "lm_head.weight" not in have and tie_embedding in have:
        have = {**have, "lm_head.weight": have[tie_embedding]}
    problems = []
    for key, shape in want.items():
        if key not in have:
            why = " (config.json has tie_word_embeddings false)" if key == "lm_head.weight" else ""
            problems.append(f"tensor {checkpoint_name(key)} is missing{why}")
        elif have[key][1] != shape:
            problems.append(f"tensor {have[key][0]} has shape {list(have[key][1])}, the model needs {list(shape)}")
    problems += [f"tensor {name} is not part of {model}" for key, (name, _) in have.items() if key not in want]
    return problems


def _state_key(name: str, renames: dict[str, str]) -> str:
    key = name[len("model."):] if name.startswith("model.") else name
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def _dense_state(dense: dict[str, torch.Tensor], cfg: ModelConfig, renames: dict[str, str],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {_state_key(name, renames): t.to(dtype) for name, t in dense.items()}
    if "lm_head.weight" not in state and cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state
