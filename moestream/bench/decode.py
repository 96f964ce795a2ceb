"""`moestream bench decode`: decode tokens/s of moestream against naive loading, accelerate's disk
offload and the I/O ceiling, each system in its own memory cgroup with the same limit.

The model has the expert shapes of Qwen3-30B-A3B (hidden 2048, expert intermediate 768, 128
experts, top-8) with fewer layers, so that its expert bytes are several times every budget.
Its weights are synthetic (N(0, 0.02), bf16) and its routing is *replayed from a trace*: every
system's routers are forced to the same expert choices, so cache behaviour does not depend on
random router weights. The trace is synthetic (per-layer Zipf popularity, reuse of the previous token's
experts, a cross-layer partner), calibrated to the routing of a small MoE trained here on real
text (moestream/bench/traces.py, docs/CACHING.md).

Each system runs in a child process placed in a cgroup-v1 memory cgroup whose limit (page cache
included) is budget + allowance, the allowance being the same fixed cost for all (the Python
process, torch, dense weights). The page cache is dropped before each (root only; the report
says when it was not). Reported per system: tokens/s, bytes read (the Store's counter and the
disk's own, /proc/diskstats), L1 hits, and the I/O ceiling tokens / (bytes read / B), where B is
moestream's raw cold read bandwidth (io_uring, O_DIRECT) on the same store in the same run.
The resident systems (every expert in L1 first) are timed as llama-bench times llama.cpp: a
1-token warm-up generation, then the mean tok/s of REPETITIONS generations; the systems that
stream run one generation from a cold cache.

Prefetch in a replayed run cannot use the real next-layer router (its weights are random and
its choices are overridden), so `best` prefetches from a *simulated predictor*: the trace's
next-layer experts, each replaced by a wrong one with probability 1 - accuracy (default 0.85,
the published accuracy of next-layer predictors). Wrong guesses cost real reads and evictions.

accelerate runs the same checkpoint the way `load_checkpoint_and_dispatch` does: its offload
folder (accelerate's own .dat files) is written once per store without a limit, then each run
builds the model on the meta device and `dispatch_model` streams the "disk" modules from those
files under the shared limit. `from_pretrained(device_map=..., offload_folder=...)` itself cannot
run under the limit: it loads the whole checkpoint first (killed at 1600 MiB on the 2-layer
store; 4.8 GB peak without a limit). transformers 5 fuses a layer's experts into two 3-D
tensors, so accelerate's smallest unit of offload is all 128 experts of a layer."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UsageError
from ..units import parse_size
from ..formats.profile import coverage_curve
from . import traces

GiB = 1 << 30
MiB = 1 << 20

#: Expert shapes of Qwen3-30B-A3B, with this many decoder layers (quick / full).
SHAPE = dict(hidden=2048, inter=768, experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128, vocab=4096)
#: accuracy of the simulated next-layer predictor behind `best`
PREFETCH_ACCURACY = traces.PREFETCH_ACCURACY
SYSTEMS = ("naive", "lru", "best-no-prefetch", "best", "accelerate")
BOUNDS = ("inmemory", "resident")
#: The same checkpoint converted to int8 and int4 (no zstd, no delta): their experts held
#: quantized and multiplied in place (compute/quant_kernels.py). Resident: every expert in L1;
#: best-no-prefetch-int4: what generate ships, under the same budget and limit as the bf16 systems;
#: best-int4: the same with best's simulated next-layer prefetch.
#: resident-int4-dense-int4: the int4 store with its dense layers in int4 too, the bits of
#: llama.cpp's Q4_0 file (attention in Q4_0; its output matrix in Q6_K), beside the default int8
#: dense layers, which cost half the KL (docs/BENCHMARKS.md, "Quantized experts: accuracy")
QUANT_BOUNDS = ("resident-int8", "resident-int4", "resident-int4-dense-int4")
QUANT_SYSTEMS = ("best-no-prefetch-int4", "best-int4")
#: llama.cpp on the same checkpoint as GGUF (bench/llama_cpp.py): in RAM (no limit, its default
#: repack) and, for Q4_0, under the shared limit (--repack 0: the repack copies the weights into
#: anonymous memory and is OOM-killed under a tight limit)
LLAMA_BOUNDS = ("llama.cpp-bf16", "llama.cpp-q8_0", "llama.cpp-q4_0")
LLAMA_SYSTEMS = ("llama.cpp-q4_0",)
#: the store each of our systems runs on (default: the bf16 one)
SYSTEM_QUANT = {"resident-int8": "int8", "resident-int4": "int4", "resident-int4-dense-int4": "int4",
                "best-no-prefetch-int4": "int4", "best-int4": "int4"}
#: llama-bench's -r (its tok/s the mean over them, after its 1-token warm-up generation), and the
#: timed generations of each resident system of ours after the same warm-up: both sides timed alike
REPETITIONS = 2

#: load_model's dense_quant of each system (default "auto": int8 for int stores)
SYSTEM_DENSE_QUANT = {"resident-int4-dense-int4": "int4"}
#: On CUDA, `best` twice more, reaching device memory two ways: io_uring into pinned host memory
#: and a copy to the device, against kvikio reading straight into device memory (GPUDirect
#: Storage where the machine has it). Both skip the checksum, which needs the host stage; `best`
#: itself (io_uring, verified) shows what verifying costs.
CUDA_SYSTEMS = ("best-uring-unverified", "best-kvikio")


# ---- the model and its store -------------------------------------------------------------------

def qwen3_moe_config(layers: int, s: dict[str, int] = SHAPE) -> dict[str, Any]:
    return {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": s["hidden"],
            "intermediate_size": 4 * s["inter"], "moe_intermediate_size": s["inter"], "num_experts": s["experts"],
            "num_experts_per_tok": s["top_k"], "norm_topk_prob": True, "num_hidden_layers": layers,
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
            "vocab_size": s["vocab"], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def build_store(workdir: Path, layers: int, log, s: dict[str, int] = SHAPE, quant: str = "keep") -> tuple[Path, Path]:
    """The synthetic checkpoint (hub layout, bf16) and its store (no zstd, no delta: plain extents,
    the zero-copy path; lossless, or `quant` int8/int4), built once and reused."""
    from ..formats.constants import DEFAULT_GROUP_SIZE
    from ..formats.convert import convert
    from ..formats.families import FAMILIES
    from .synthetic import write_random_safetensors
    name = f"qwen3moe-{layers}L" + ("" if s == SHAPE else f"-h{s['hidden']}-e{s['experts']}")
    ckpt, store = workdir / name, workdir / (f"{name}.moe" if quant == "keep" else f"{name}-{quant}.moe")
    if not (ckpt / "config.json").exists():
        log(f"writing a synthetic Qwen3-MoE checkpoint ({layers} layers) into {ckpt}")
        ckpt.mkdir(parents=True, exist_ok=True)
        fam, config = FAMILIES["qwen3_moe"], qwen3_moe_config(layers, s)
        h, d = s["hidden"], s["head_dim"]
        t: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h)),
                                                ("lm_head.weight", (s["vocab"], h)), ("model.norm.weight", (h,))]
        for l in range(layers):
            p = f"model.layers.{l}."
            t += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (s["heads"] * d, h)),
                  (p + "self_attn.k_proj.weight", (s["kv_heads"] * d, h)),
                  (p + "self_attn.v_proj.weight", (s["kv_heads"] * d, h)),
                  (p + "self_attn.o_proj.weight", (h, s["heads"] * d)),
                  (p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                  (fam.router.format(layer=l), (s["experts"], h))]
            shapes = fam.expert_shapes(config)
            for e in range(s["experts"]):
                t += [(fam.expert_tensor_name(l, e, x), shapes[x]) for x in fam.expert_tensors]
        (ckpt / "config.json").write_text(json.dumps(config))
        write_random_safetensors(ckpt / "model.safetensors.partial", t)
        os.replace(ckpt / "model.safetensors.partial", ckpt / "model.safetensors")
    if not store.exists():
        log(f"converting it into {store} ({'lossless' if quant == 'keep' else quant}, no zstd, no delta)")
        # the default group, or the largest that divides a tiny test shape's widths (only groups
        # inside a row are held quantized)
        group = next(g for g in (DEFAULT_GROUP_SIZE, 32, 16, 8, 2) if s["hidden"] % g == 0 and s["inter"] % g == 0)
        convert(ckpt, store, quant=quant, zstd_level=None, delta=False, group_size=group, progress=False)
    return ckpt, store


def synthetic_trace(tokens: int, layers: int, *, experts: int, top_k: int, seed: int = 0) -> np.ndarray:
    """[tokens, layers, top_k] expert ids from the routing generator calibrated to the trained
    routing model's held-out traces (bench/traces.py, CALIBRATED)."""
    return traces.synthetic_trace(tokens, layers, experts, top_k, seed=seed, **traces.CALIBRATED).experts


#: a system whose rounds spread wider than this (fastest / slowest) ran on a machine whose speed
#: changed under it: ratios that use it are withheld, not published
SPREAD_LIMIT = 1.5
#: a system under a memory limit may not beat its store's all-in-memory upper bound by more than this
BOUND_SLACK = 1.10


def cpu_times() -> Optional[list[int]]:
    """The machine's cumulative CPU times from /proc/stat (user nice system idle iowait irq softirq
    steal ...), None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def machine_load(t0: Optional[list[int]], load0: tuple[float, float, float]) -> dict[str, Any]:
    """Load averages at the start and end of the run and the share of CPU time stolen by the
    hypervisor (steal) and spent busy in between: how shared the machine was while we measured."""
    t1 = cpu_times()
    out: dict[str, Any] = {"loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}
    if t0 and t1 and len(t0) > 7 and len(t1) > 7:
        d = [b - a for a, b in zip(t0, t1)]
        total = sum(d[:8]) or 1
        out["steal_share"] = d[7] / total
        out["busy_share"] = 1 - (d[3] + d[4]) / total
    return out


def noise_warnings(results: list[dict[str, Any]]) -> tuple[list[str], set[tuple[str, Optional[float]]]]:
    """(warnings, flagged (system, budget) pairs): systems whose rounds spread beyond SPREAD_LIMIT,
    and systems under a limit faster than their store's all-in-memory bound (and that bound)."""
    warnings, flagged = [], set()
    for r in results:
        xs = [x for x in r.get("samples_tokens_per_s") or [] if x > 0]
        if len(xs) > 1 and max(xs) / min(xs) > SPREAD_LIMIT:
            flagged.add((r["system"], r.get("budget_fraction")))
            warnings.append(f"{r['system']} (budget {r.get('budget_fraction') or 'all'}): rounds spread "
                            f"{min(xs):.1f}-{max(xs):.1f} tok/s, {max(xs) / min(xs):.2f}x, beyond {SPREAD_LIMIT}x")
    bounds = {q: [r for r in results if r["system"] in names and "error" not in r]
              for q, names in (("bf16", ("inmemory", "resident")), ("int4", ("resident-int4",)))}
    for r in results:
        if r.get("budget_fraction") is None or "error" in r or r["system"].startswith(("llama.cpp", "accelerate")):
            continue
        upper = bounds["int4" if r["system"].endswith("-int4") else "bf16"]
        if upper and r["tokens_per_s"] > BOUND_SLACK * max(u["tokens_per_s"] for u in upper):
            top = max(upper, key=lambda u: u["tokens_per_s"])
            flagged |= {(r["system"], r["budget_fraction"]), (top["system"], None)}
            warnings.append(f"{r['system']} at {r['budget_fraction']:.0%} ran {r['tokens_per_s']:.1f} tok/s, above "
                            f"its all-in-memory bound {top['system']} ({top['tokens_per_s']:.1f}): the machine's "
                            "speed changed between them")
    return warnings, flagged


def _unless_noisy(value, systems, flagged, withheld: dict, name: str):
    noisy = [r["system"] for r in systems if r and (r["system"], r.get("budget_fraction")) in flagged]
    if value is not None and noisy:
        withheld[name] = f"{', '.join(noisy)} too noisy (see warnings)"
        return None
    return value


def coverage(trace: np.ndarray) -> dict[str, float]:
    """Share of all expert activations taken by the most used 1/5/20 % of (layer, expert) pairs."""
    t, l, _ = trace.shape
    counts = np.zeros((l, int(trace.max()) + 1))
    for layer in range(l):
        np.add.at(counts[layer], trace[:, layer].reshape(-1), 1)
    curve = coverage_curve(counts)
    return {f"top_{p}%": curve[p - 1] for p in (1, 5, 20)}


# ---- one system, in a child process ------------------------------------------------------------

class _Clock:
    """Which trace rows the current forward covers (set by a pre-hook on the model)."""
    start = 0
    count = 1


def _forced_router(trace: np.ndarray, layer_index: int, clock: _Clock, top_k: int):
    import torch

    def route(x, logits=None):      # the router's own logits (when the fused decode call made them) unused
        rows = trace[clock.start:clock.start + clock.count, layer_index]                # [N, A]
        experts = torch.as_tensor(rows, device=x.device)
        weights = torch.full(experts.shape, 1.0 / top_k, dtype=x.dtype, device=x.device)
        return weights, experts
    return route


class InMemoryExperts:
    """Every expert as an in-memory tensor (on `device`) behind the Store's fetch interface: the
    upper bound that the streaming forward can reach (no reads, no cache bookkeeping)."""

    def __init__(self, store, device="cpu"):
        from ..formats.reader import StoreReader
        with StoreReader(store.path, verify=False) as r:
            self.experts = {k: {n: t.to(device) for n, t in r.expert(*k).items()} for k in r.index.extents}
        self.expert_slots = len(self.experts)
        self.prefetching = False

    def fetch_ready(self, layer, experts):
        return {int(e): self.experts[(layer, int(e))] for e in experts}, {}

    def wait_first(self, futures):
        return next(iter(futures))

    def note_routing(self, layer, experts):
        return 0


def _disk_sectors_read(path: str) -> Optional[int]:
    """Sectors read so far by the block device (or partition) holding `path`, from the kernel's
    own counters (/sys/dev/block/M:m/stat, the same numbers as /proc/diskstats)."""
    dev = os.stat(path).st_dev
    try:
        return int(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


#: the Store's counters a system reports, counted over its timed generations' decode steps
#: (its "decode_seconds" is the codec's: reported as decode_codec_seconds)
_COUNTED = ("bytes_read", "hits_l1", "misses", "requests", "stall_seconds", "checksum_seconds", "decode_seconds",
            "reads", "read_seconds", "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_cancelled",
            "prefetch_wasted_bytes", "device_reads")


def run_system(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode `spec["tokens"]` tokens with one system; returns its figures."""
    import torch
    torch.manual_seed(0)
    trace = np.asarray(spec["trace"], np.int64)
    system, store_path = spec["system"], spec["store"]
    prompt = spec["prompt_tokens"]
    ids = torch.arange(3, 3 + prompt).reshape(1, prompt)
    clock = _Clock()
    shape = spec["shape"]
    top_k = shape["top_k"]
    if system == "accelerate":
        return _run_accelerate(spec, trace, ids, clock)
    if system.startswith("llama.cpp-"):
        return _run_llama_cpp(spec)
    if system == "accelerate-offload":
        return _prepare_accelerate_offload(spec)
    from ..compute.loader import load_model
    from ..compute.models.common import StreamingMoE
    device = spec.get("device", "cpu")
    opts: dict[str, Any] = dict(host_budget=0, device_budget=spec["device_budget"], policy=spec.get("policy", "next-use"),
                                device=device, io=spec.get("io", "auto"), verify=spec.get("verify", True),
                                dense_quant=spec.get("dense_quant", "auto"))
    acc = spec.get("prefetch_accuracy")
    if acc is not None:
        opts["prefetch_budget"] = top_k * spec["extent_bytes"]
    model = load_model(store_path, **opts)
    moes = [m for m in model.modules() if isinstance(m, StreamingMoE)]
    rng = random.Random(1)
    for i, m in enumerate(moes):
        m.route = _forced_router(trace, i, clock, top_k)
        if acc is not None:
            # the model's own prefetch path, its predictor simulated: layer i's guess (made while
            # layer i-1 runs; the first layer's from the embedding) is the trace's truth, each
            # expert wrong with p 1-acc (traces.simulated_guess)
            def guess(x, width=None, i=i):
                truth = trace[clock.start, i].tolist() if clock.count == 1 else []
                g = traces.simulated_guess(truth, shape["experts"], acc, rng, width if truth else 0)
                return torch.tensor([g], dtype=torch.long), torch.ones(1, len(g))   # [1, G], [1, G]
            m.guess = guess
    if acc is not None:
        model.prefetch_next_layer, model.prefetch_threshold = True, 0.0
    if system == "inmemory":
        mem = InMemoryExperts(model.store, device)
        for m in moes:
            m.store = mem

    store = model.store
    before: dict = {}

    def pre_hook(mod, args):
        clock.start, clock.count = int(args[2]) if len(args) > 2 else 0, int(args[0].shape[1])
        if clock.count == 1 and not before:  # the first decode step: count from here, not the prefill
            before.update(stats=store.stats() if system != "inmemory" else None,
                          disk=_disk_sectors_read(store_path))
            for m in moes:
                m.expert_seconds = 0.0
    model.register_forward_pre_hook(pre_hook)
    repetitions = 1
    if system.startswith("resident"):  # warm: every expert into L1 first (resident-int8/int4 too)
        load_every_expert(model.store)
        # then timed as llama-bench times its side: a 1-token warm-up generation, then the mean
        # tok/s of REPETITIONS generations (its -r); every expert is held, so neither
        # changes what the cache holds. A process's first generation ran 5-15 % slower
        # throughout than its next ones on the development machine (2026-12-07)
        model.generate(ids, 2)
        repetitions = REPETITIONS
    rates: list[float] = []
    decode_tokens, decode_seconds, matmul_seconds = 0, 0.0, 0.0
    counted = dict.fromkeys(_COUNTED, 0)
    disk_bytes: Optional[int] = 0
    for _ in range(repetitions):      # each counted from its first decode step (not its prefill)
        before.clear()
        timings: dict = {}
        model.generate(ids, spec["tokens"], timings=timings)
        n = timings["decode_tokens"] - 1                   # the first new token comes from the prefill
        rates.append(n / timings["decode_seconds"])
        decode_tokens, decode_seconds = decode_tokens + n, decode_seconds + timings["decode_seconds"]
        matmul_seconds += sum(m.expert_seconds for m in moes)
        disk1, disk0 = _disk_sectors_read(store_path), before["disk"]
        disk_bytes = None if None in (disk_bytes, disk0, disk1) else disk_bytes + (disk1 - disk0) * 512
        s0 = before["stats"] or store.stats()
        st = store.stats() if system != "inmemory" else s0
        for k in _COUNTED:
            counted[k] += st.get(k, 0) - s0.get(k, 0)
    out = {
        "system": system, "tokens": decode_tokens, "decode_seconds": decode_seconds,
        "tokens_per_s": sum(rates) / len(rates), "repetitions": repetitions,
        "prefill_seconds": timings["prefill_seconds"], "disk_bytes_read": disk_bytes,
        **{k: v for k, v in counted.items() if k != "decode_seconds"},
        "decode_codec_seconds": counted["decode_seconds"], "expert_matmul_seconds": matmul_seconds,
        "vm_hwm_bytes": _vm_hwm(), "backend": st.get("backend"), "device": device,
        "expert_slots": model.store.expert_slots, "store_quant": model.store.index.quant,
        "dense_quant": getattr(model, "dense_quant", None),   # load_model's default: the experts' type
    }
    if device.startswith("cuda"):
        # kernels run asynchronously: the host's time around an expert's matmuls is the time to
        # queue them, not to run them (decode_seconds is right: every token syncs at sampling)
        out["expert_matmul_seconds"] = out["rest_seconds"] = None
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["rest_seconds"] = out["decode_seconds"] - out["stall_seconds"] - out["expert_matmul_seconds"]
    if system != "inmemory":
        store.close()
    return out


def _run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-bench on the checkpoint's GGUF (built beforehand by the parent), in this child's
    cgroup when the parent gave it one; disk bytes from the kernel's counters."""
    from . import llama_cpp
    src, gguf_path = Path(spec["llama_cpp"]), Path(spec["gguf"])
    limited = spec.get("memory_limit") is not None
    disk0 = _disk_sectors_read(str(gguf_path))
    r = llama_cpp.run_bench(src, gguf_path, spec["tokens"], threads=os.cpu_count() or 2, repack=not limited,
                             repetitions=REPETITIONS)
    disk1 = _disk_sectors_read(str(gguf_path))
    return {"system": spec["system"], "tokens": spec["tokens"], "tokens_per_s": r["tokens_per_s"],
            "stddev_tokens_per_s": r["stddev_tokens_per_s"], "llama_bench": r["command"],
            "disk_bytes_read": (disk1 - disk0) * 512 if disk0 is not None and disk1 is not None else None,
            "bytes_read": None, "device": "cpu",
            # llama-bench's own peak (children's ru_maxrss: at least this Python's RSS at the fork)
            "vm_hwm_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "note": "llama-bench: random token ids, the model's own (random) routers; its warm-up run and "
                    f"{REPETITIONS} repetitions of {spec['tokens']} tokens" + ("; --repack 0 under the limit" if limited else "")}


def accelerate_offload_folder(checkpoint: Path) -> Path:
    """Where accelerate's offload folder of `checkpoint` is kept (beside it, built once)."""
    return checkpoint.parent / f"{checkpoint.name}.accelerate-offload"


def _prepare_accelerate_offload(spec) -> dict[str, Any]:
    """Write accelerate's own offload folder (index.json + one .dat per weight, in the model's
    names: transformers 5 fuses each layer's experts into two 3-D tensors) for the checkpoint.
    Runs once, in a child without a memory limit: loading the checkpoint needs all of it in
    memory, which is what kills `from_pretrained(device_map=..., offload_folder=...)` under the
    shared limit. The folder is written under a temporary name and renamed when complete."""
    import torch
    import transformers
    from accelerate.utils import offload_state_dict
    folder = Path(spec["accelerate_offload"])
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16)
    offload_state_dict(str(partial), model.state_dict())
    os.replace(partial, folder)
    return {"system": "accelerate-offload", "folder": str(folder)}


def accelerate_device_map(model, budget: int, device: "str | int" = "cpu") -> dict[str, "str | int"]:
    """accelerate's device map for a budget of `budget` expert bytes: every dense module on
    `device` ("cpu", or a CUDA index; moestream keeps them there too, outside its budget), then
    each layer's experts module on `device` while the budget lasts and on "disk" after. Like `infer_auto_device_map`,
    it keeps room in the budget for the largest offloaded module, which is loaded whole at each
    forward. `infer_auto_device_map` itself puts the whole model on disk at these budgets (its
    no-split unit, a decoder layer, is larger than the budget), so this map is the kinder one."""
    experts = {name: sum(p.numel() * p.element_size() for p in m.parameters())
               for name, m in model.named_modules() if name.split(".")[-1] == "experts"}
    left = budget - max(experts.values(), default=0)
    device_map: dict[str, "str | int"] = {}
    for name, module in model.named_modules():
        if not name or any(name == k or name.startswith(k + ".") for k in device_map):
            continue
        if name in experts:
            device_map[name] = device if experts[name] <= left else "disk"
            left -= experts[name] if experts[name] <= left else 0
        elif not any(k.startswith(name + ".") for k in experts):
            device_map[name] = device    # a module with no experts inside
    return device_map


def _run_accelerate(spec, trace, ids, clock) -> dict[str, Any]:
    """transformers + accelerate disk offload of the same model, routers forced to the trace:
    the model is built on the meta device, its CPU modules loaded from the offload folder, and
    `dispatch_model(..., offload_dir=)` streams the "disk" modules from accelerate's own
    memory-mapped .dat files at every forward (the path `load_checkpoint_and_dispatch` sets up).
    On CUDA the modules in the budget sit on the GPU (dispatch_model moves them there) and the
    offloaded ones are copied to it at each forward."""
    import torch
    import transformers
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import OffloadedWeightsLoader, set_module_tensor_to_device
    folder = spec["accelerate_offload"]
    config = transformers.AutoConfig.from_pretrained(spec["checkpoint"])
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    device = spec.get("device", "cpu")
    # accelerate names a CUDA device by its index
    target: "str | int" = (torch.device(device).index or 0) if device.startswith("cuda") else "cpu"
    device_map = accelerate_device_map(model, int(spec["device_budget"]), target)
    weights = OffloadedWeightsLoader(save_folder=folder)
    on_disk = tuple(k + "." for k, v in device_map.items() if v == "disk")
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name in weights and not name.startswith(on_disk):   # a copy: not a view of the page cache
            set_module_tensor_to_device(model, name, "cpu", value=weights[name].clone())
    model = dispatch_model(model, device_map, main_device=target, offload_dir=folder)
    model.eval()
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    for i, r in enumerate(routers):
        forced = _forced_router(trace, i, clock, spec["shape"]["top_k"])

        def fwd(hidden, forced=forced):
            w, e = forced(hidden.reshape(-1, hidden.shape[-1]))
            return None, w, e
        r.forward = fwd
    step = {"pos": 0}
    calls: list[tuple[int, float, float]] = []           # (tokens, start, end) of each forward

    def pre_hook(mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        clock.start, clock.count = step["pos"], int(x.shape[1])
        step["pos"] += int(x.shape[1])
        calls.append((int(x.shape[1]), time.perf_counter(), 0.0))

    def post_hook(mod, args, kwargs, output):
        n, t0, _ = calls[-1]
        calls[-1] = (n, t0, time.perf_counter())
        if len(calls) == 1:
            before["disk"] = _disk_sectors_read(folder)
    before: dict = {}
    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True)
    with torch.no_grad():
        model.generate(ids.to(device), max_new_tokens=spec["accelerate_tokens"] + 1, min_new_tokens=spec["accelerate_tokens"] + 1,
                       do_sample=False, use_cache=True)
    disk1 = _disk_sectors_read(folder)
    decode = calls[1:]                                   # the first call is the prefill
    decode_seconds = decode[-1][2] - calls[0][2]
    return {"system": "accelerate", "tokens": len(decode), "decode_seconds": decode_seconds,
            "tokens_per_s": len(decode) / decode_seconds, "prefill_seconds": calls[0][2] - calls[0][1],
            "disk_bytes_read": (disk1 - before["disk"]) * 512 if disk1 is not None else None, "bytes_read": None,
            "device_map": {str(v): sum(1 for x in device_map.values() if x == v) for v in set(device_map.values())},
            "experts_on_disk": sum(1 for k, v in device_map.items() if v == "disk" and k.endswith(".experts")),
            "vm_hwm_bytes": _vm_hwm(), "device": device}


# ---- the parent: cgroups, page cache, the I/O ceiling -----------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        return False, f"no cgroup-v1 memory controller at {CGROUP_ROOT}"
    return True, "cgroup v1 memory controller"


def common_spec(work: Path, layers: int, *, tokens: int = 64, prompt: int = 8, accelerate_tokens: int = 3,
                shape: dict[str, int] = SHAPE, log=print) -> tuple[dict[str, Any], int]:
    """The spec every system of one run shares (store built once in `work`, the routing trace),
    and the store's decoded expert bytes."""
    from ..formats.reader import StoreReader
    ckpt, store = build_store(work, layers, log, shape)
    with StoreReader(store) as r:
        extents = list(r.index.extents.values())
    trace = synthetic_trace(prompt + max(tokens, accelerate_tokens) + 2, layers, experts=shape["experts"],
                            top_k=shape["top_k"])
    base = dict(store=str(store), checkpoint=str(ckpt), workdir=str(work), trace=trace.tolist(), tokens=tokens,
                accelerate_offload=str(accelerate_offload_folder(ckpt)),
                prompt_tokens=prompt, extent_bytes=max(x.padded_length for x in extents),
                accelerate_tokens=accelerate_tokens, shape=shape, extents=len(extents))
    return base, sum(x.decoded_length for x in extents)


def system_spec(base: dict[str, Any], system: str, budget: int,
                prefetch_accuracy: float = PREFETCH_ACCURACY) -> dict[str, Any]:
    """What `system` runs with at a device budget of `budget` bytes (base: the run's common spec)."""
    spec = dict(base, system=system, device_budget=budget)
    if base.get("device", "cpu").startswith("cuda"):
        # named, not "auto" (which takes kvikio where it is installed): uring + a copy to the
        # device is the path every system but best-kvikio takes
        spec.update(io="uring")
    if system in CUDA_SYSTEMS:
        spec.update(policy="next-use", prefetch_accuracy=prefetch_accuracy, verify=False,
                    io="kvikio" if system == "best-kvikio" else "uring")
    if system == "naive":       # one layer's experts, no cache to speak of
        spec.update(device_budget=base["shape"]["top_k"] * base["extent_bytes"], policy="lru")
    elif system == "lru":
        spec.update(policy="lru")
    elif system in ("best-no-prefetch", "best-no-prefetch-int4"):
        spec.update(policy="next-use")
    elif system in ("best", "best-int4"):
        spec.update(policy="next-use", prefetch_accuracy=prefetch_accuracy)
    return spec


def load_every_expert(store) -> None:
    """Every expert of `store` fetched once, so that a budget holding them all serves each token
    from L1 (the resident systems, and the scripts in bench/ that time a resident decode)."""
    for layer in store.layers:
        for f in store.fetch(layer, range(store.experts_per_layer)):
            f.result()


def resident_budget(expert_bytes: int, extent_bytes: int) -> int:
    """A device budget that holds every expert of the bf16 store (`expert_bytes` in all, its
    largest extent `extent_bytes`) with room to spare: the resident bounds' and warm-ups' (an int
    store's experts take less)."""
    return int(expert_bytes * 1.05) + 64 * extent_bytes


#: tokens of each warm-up run (warm_up_systems): enough to call every kernel of a decode step
WARM_UP_TOKENS = 4


def warm_up_systems(systems: Sequence[str]) -> list[str]:
    """One resident system per kind of store the given systems of ours run (bf16, int8, int4, int4
    with int4 dense layers), run once before the timed rounds and not counted: a kernel's first
    call in a process after a source change compiles it (seconds) and writes Numba's disk cache,
    which every later child reads. Without it the first system of each kind paid the compile
    inside its timed decode (37 against 92-96 tok/s for `resident` in one run, 2026-12-06)."""
    out: list[str] = []
    for s in systems:
        if s.startswith(("llama.cpp-", "accelerate")):
            continue
        q = SYSTEM_QUANT.get(s)
        warm = ("resident" if q is None else f"resident-{q}-dense-int4" if SYSTEM_DENSE_QUANT.get(s) == "int4"
                else f"resident-{q}")
        if warm not in out:
            out.append(warm)
    return out


def run_child(spec: dict[str, Any], limit: Optional[int], tree: Optional[str] = None) -> dict[str, Any]:
    """Run one system in a child process, inside a fresh memory cgroup of `limit` bytes (page
    cache included) when given, with the moestream of source `tree` (default: this one; for
    bench/compare_trees.py). Returns its figures, or {"error": ...} (e.g. killed by the limit)."""
    from .io import drop_page_cache
    drop_page_cache()
    cg = None
    if limit is not None:
        cg = CGROUP_ROOT / f"moestream-bench-{os.getpid()}-{spec['system']}"
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        try:
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            pass  # no swap accounting: there is no swap on these machines either
    spec_file = Path(spec["workdir"]) / f"spec-{spec['system']}.json"
    spec_file.write_text(json.dumps(spec))

    def enter():
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
    try:
        p = subprocess.run([sys.executable, "-m", "moestream.bench.decode", "--child", str(spec_file)],
                           capture_output=True, text=True, preexec_fn=enter, cwd=tree,
                           env=dict(os.environ, PYTHONPATH=str(Path(tree).resolve())) if tree else None)
        if p.returncode != 0:
            peak = int((cg / "memory.max_usage_in_bytes").read_text()) if cg is not None else 0
            if p.returncode == -9 and cg is not None and peak >= 0.95 * limit:
                what = f"killed by the {limit / MiB:.0f} MiB memory limit (peak {peak / MiB:.0f} MiB)"
            else:
                lines = [l for l in p.stderr.strip().splitlines() if "%|" not in l]  # no progress bars
                what = (lines[-1] if lines else f"exit {p.returncode}")[-300:]
            return {"system": spec["system"], "error": what, "returncode": p.returncode}
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        spec_file.unlink(missing_ok=True)
        if cg is not None:
            try:
                cg.rmdir()
            except OSError:
                pass


def fetch_all(store, keys, in_flight: int = 16) -> float:
    """Fetch every (layer, expert) of `keys` from the open Store once, `in_flight` at a time, a
    new one as soon as one lands (results dropped); returns the seconds it took."""
    t0 = time.perf_counter()
    inflight: set = set()
    for l, e in keys:
        if len(inflight) == in_flight:
            inflight.remove(store.wait_first(inflight))
        inflight.update(store.fetch(l, [e]))
    for f in inflight:
        f.result()
    return time.perf_counter() - t0


def raw_read_bandwidth(store: Path, log) -> tuple[float, float]:
    """(raw uring cold GB/s over every extent in random order, at its best point of bench io's
    grid of request sizes and depths; Store.fetch cold GB/s over the same extents: read +
    checksum + decode), measured back to back."""
    from ..formats.reader import StoreReader
    from ..storage import Store
    from .io import drop_page_cache, uring_sweep
    with StoreReader(store) as r:
        keys = sorted(r.index.extents)
        order = list(range(len(keys)))
        random.Random(0).shuffle(order)
        keys = [keys[i] for i in order]
        regions = [r.index.extents[k] for k in keys]
    raw = max(x["gbps"] for x in uring_sweep(str(store), order, max(x.padded_length for x in regions), log))
    drop_page_cache()
    with Store(store, device_budget=32 * regions[0].decoded_length, host_budget=0, queue_depth=128) as s:
        seconds = fetch_all(s, keys)
        fetch = s.stats()["bytes_read"] / seconds / 1e9
    log(f"raw uring cold random reads {raw:.2f} GB/s; Store.fetch (read + checksum + decode) {fetch:.2f} GB/s")
    return raw, fetch


def bench_decode(*, quick: bool = False, workdir: Optional[str] = None, budgets: Optional[list[float]] = None,
                 tokens: Optional[int] = None, layers: Optional[int] = None, accelerate_tokens: Optional[int] = None,
                 allowance: Optional[int] = None, prefetch_accuracy: float = PREFETCH_ACCURACY,
                 systems: Optional[tuple[str, ...]] = None, shape: dict[str, int] = SHAPE, prompt: int = 8,
                 repeat: int = 2, device: str = "cpu", log=print) -> dict[str, Any]:
    """Run the decode benchmark; returns every figure as plain data.

    device: "cpu" or "cuda[:N]". On CUDA the budgets are bytes of device memory (the Store's L1
    there, accelerate's modules placed there), the memory cgroup bounds host memory only (page
    cache included; it cannot bound GPU memory), and CUDA_SYSTEMS compare kvikio reads straight
    into device memory with io_uring reads and a copy. allowance: bytes of the memory limit
    beyond the budget, the same for every system (default 1 GiB on CPU; 3 GiB on CUDA, whose
    libraries and context take host memory of their own)."""
    cuda = device.startswith("cuda")
    if cuda:
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA device here")
    streamed = SYSTEMS + (CUDA_SYSTEMS if cuda else ()) + QUANT_SYSTEMS + (() if cuda else LLAMA_SYSTEMS)
    bounds = BOUNDS + QUANT_BOUNDS + (() if cuda else LLAMA_BOUNDS)
    systems = systems or tuple(dict.fromkeys(streamed + bounds))
    for system in systems:
        if system not in streamed + bounds:
            raise UsageError(f"--system {system}: not a system on {device} (those are {', '.join(dict.fromkeys(streamed + bounds))})")
    allowance = allowance if allowance is not None else (3 * GiB if cuda else GiB)
    work = Path(workdir or os.environ.get("TMPDIR", "/tmp")) / "moestream-bench-decode"
    work.mkdir(parents=True, exist_ok=True)
    layers = layers or (2 if quick else 4)
    tokens = tokens or 64
    budgets = budgets or ([0.25] if quick else [0.10, 0.25, 0.50])
    accelerate_tokens = accelerate_tokens or (2 if quick else 4)
    base, expert_bytes = common_spec(work, layers, tokens=tokens, prompt=prompt, accelerate_tokens=accelerate_tokens,
                                     shape=shape, log=log)
    base["device"] = device
    store, extent_bytes, trace = Path(base["store"]), base["extent_bytes"], np.asarray(base["trace"])
    quant_stores: dict[str, dict[str, Any]] = {}   # int8/int4: store, its expert and extent bytes
    for q in sorted({SYSTEM_QUANT[x] for x in systems if x in SYSTEM_QUANT}):
        from ..formats.reader import StoreReader
        qs = build_store(work, layers, log, shape, quant=q)[1]
        with StoreReader(qs) as r:
            ext = list(r.index.extents.values())
        quant_stores[q] = dict(store=str(qs), extent_bytes=max(x.padded_length for x in ext),
                               expert_bytes=sum(x.padded_length for x in ext))
    llama = [x for x in systems if x.startswith("llama.cpp-")]
    llama_why = ""
    if llama:
        from . import llama_cpp
        src, llama_why = llama_cpp.ensure_built(work, log)
        if src is None:
            log(f"llama.cpp systems skipped: {llama_why}")
            systems = tuple(x for x in systems if x not in llama)
        else:
            base["llama_cpp"] = str(src)
            ggufs = {x: str(llama_cpp.model_file(src, Path(base["checkpoint"]), x.split("-", 1)[1], log)) for x in llama}

    def own_spec(spec: dict[str, Any]) -> dict[str, Any]:
        """The spec with the system's own store (int8/int4, and its dense layers' type) or GGUF (llama.cpp)."""
        q = SYSTEM_QUANT.get(spec["system"])
        if q is not None:
            spec = dict(spec, store=quant_stores[q]["store"], extent_bytes=quant_stores[q]["extent_bytes"],
                        dense_quant=SYSTEM_DENSE_QUANT.get(spec["system"], "auto"))
        if spec["system"].startswith("llama.cpp-"):
            spec = dict(spec, gguf=ggufs[spec["system"]])
        return spec
    cg_ok, cg_why = cgroup_available()
    root = os.geteuid() == 0
    log(f"store {store}: {expert_bytes / GiB:.2f} GiB of experts in {base['extents']} extents; device {device}; "
        f"memory limits: {'cgroup v1' if cg_ok else 'NONE (' + cg_why + ')'}; page cache "
        f"{'dropped before each system' if root else 'NOT dropped (not root)'}")
    # B is taken twice, before and after the systems, and the faster is kept: the disk's
    # throughput drifts by up to 3x over minutes (0.9 and 2.4 GB/s in one sitting), and a B taken
    # in a slow minute would credit every system with a ceiling it never had
    bandwidths = [raw_read_bandwidth(store, log)]
    if "accelerate" in systems and not Path(base["accelerate_offload"]).exists():
        log(f"writing accelerate's offload folder {base['accelerate_offload']} (once, without a memory limit)")
        prep = run_child(dict(base, system="accelerate-offload"), None)
        if "error" in prep:
            raise RuntimeError(f"could not write accelerate's offload folder: {prep['error']}")
    results: list[dict[str, Any]] = []
    runs: dict[tuple[str, Optional[float]], list[dict[str, Any]]] = {}

    def ceiling(res, raw):
        br = res.get("bytes_read") if res.get("bytes_read") is not None else res.get("disk_bytes_read")
        if "error" not in res and br:
            res["io_ceiling_tokens_per_s"] = res["tokens"] / (br / (raw * 1e9))
            res["vs_io_ceiling"] = res["tokens_per_s"] / res["io_ceiling_tokens_per_s"]
        return br

    def record(res, budget_fraction, limit):
        res.update(budget_fraction=budget_fraction, memory_limit=limit)
        br = ceiling(res, bandwidths[0][0])     # against the first B until the second is taken
        runs.setdefault((res["system"], budget_fraction), []).append(res)
        log(f"  {res['system']:>17} budget {budget_fraction if budget_fraction is not None else '-':>5}: " +
            (f"ERROR {res['error']}" if "error" in res else
             f"{res['tokens_per_s']:6.2f} tok/s" + (f", {res['hits_l1']} hits of {res['requests']}" if "hits_l1" in res else "") +
             (f", {br / MiB:.0f} MiB read" if br else "") +
             (f", {res['vs_io_ceiling']:.2f} of the I/O ceiling" if "vs_io_ceiling" in res else "")))

    # The machine is shared and noisy (the same run has given 13 and 49 tok/s minutes apart, and
    # the disk's throughput drifts by 3x over minutes): every system runs `repeat` times, taking
    # turns in an order that rotates each round (no system always follows the same one), and the
    # median run is reported.
    for system in warm_up_systems(systems):
        log(f"warm-up: {system}, {WARM_UP_TOKENS} tokens (compiles the kernels into Numba's cache; not counted)")
        run_child(own_spec(dict(base, system=system, tokens=WARM_UP_TOKENS,
                                device_budget=resident_budget(expert_bytes, extent_bytes))), None)
    cpu0, load0 = cpu_times(), os.getloadavg()
    for rep in range(repeat):
        log(f"round {rep + 1}/{repeat}")
        for system in bounds:
            if system in systems:  # upper bounds: every expert in memory, no limit (they need it all)
                record(run_child(own_spec(dict(base, system=system,
                                               device_budget=resident_budget(expert_bytes, extent_bytes))),
                                 None), None, None)
        for frac in budgets:
            budget = int(expert_bytes * frac)
            for system in streamed[rep % len(streamed):] + streamed[:rep % len(streamed)]:
                if system not in systems or (system == "accelerate" and rep > 0):
                    # accelerate once: under the limit it is two orders of magnitude slower than
                    # the others (minutes a run), far beyond what the disk's drift could change
                    continue
                limit = budget + allowance if cg_ok else None
                spec = own_spec(dict(system_spec(base, system, budget, prefetch_accuracy), memory_limit=limit))
                res = run_child(spec, limit)
                if system == "accelerate" and "error" in res and limit is not None:
                    # the closest configuration accelerate supports: the same offload without a limit
                    record(res, frac, limit)
                    res = run_child(spec, None)
                    res["note"] = "accelerate could not run under the shared limit; rerun without a limit"
                    res["system"] = "accelerate (no limit)"
                    limit = None
                record(res, frac, limit)
    bandwidths.append(raw_read_bandwidth(store, log))
    raw, fetch = max(b[0] for b in bandwidths), max(b[1] for b in bandwidths)
    for rs in runs.values():
        for r in rs:
            ceiling(r, raw)
    for (system, frac), rs in runs.items():
        ok = sorted((r for r in rs if "error" not in r), key=lambda r: r["tokens_per_s"])
        if not ok:
            results.append(rs[0])
            continue
        med = dict(ok[(len(ok) - 1) // 2])
        med["samples_tokens_per_s"] = [r["tokens_per_s"] for r in rs if "error" not in r]
        results.append(med)

    def find(system, frac):
        for r in results:
            if r["system"] == system and r["budget_fraction"] == frac and "error" not in r:
                return r
        return None

    at = 0.25 if 0.25 in budgets else budgets[0]
    best, naive, lru = find("best", at), find("naive", at), find("lru", at)
    acc = find("accelerate", at) or find("accelerate (no limit)", at)
    nopf = find("best-no-prefetch", at)
    res, inmem = find("resident", None), find("inmemory", None)

    load = machine_load(cpu0, load0)
    warnings, flagged = noise_warnings(results)
    withheld: dict[str, str] = {}

    def ratio(a, b, name: Optional[str] = None):
        if not (a and b):
            return None
        noisy = [x["system"] for x in (a, b) if (x["system"], x.get("budget_fraction")) in flagged]
        if noisy:
            withheld[name or f"{a['system']}_vs_{b['system']}"] = f"{', '.join(noisy)} too noisy (see warnings)"
            return None
        return a["tokens_per_s"] / b["tokens_per_s"]

    def bound_of(r, resident):
        """min(the same store's all-resident tok/s, r's I/O ceiling): on two cores compute, not
        I/O, bounds decode, and streaming should cost little beyond whichever binds."""
        if not r or not resident or not r.get("io_ceiling_tokens_per_s"):
            return None
        return min(resident["tokens_per_s"], r["io_ceiling_tokens_per_s"])
    res8, res4 = find("resident-int8", None), find("resident-int4", None)
    res44 = find("resident-int4-dense-int4", None)
    ll = {q: find(f"llama.cpp-{q}", None) for q in ("bf16", "q8_0", "q4_0")}
    int4_lim, ll4_lim = find("best-no-prefetch-int4", at), find("llama.cpp-q4_0", at)
    b_best, b_int4 = bound_of(best, res), bound_of(int4_lim, res4)
    out = {
        "command": "moestream bench decode" + (" --quick" if quick else "") + (f" --device {device}" if cuda else ""),
        "device": device, "device_name": _device_name(device),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "page_cache": "dropped before each system" if root else "not dropped (not root)",
        "memory_limit": (f"cgroup v1: budget + {allowance / MiB:.0f} MiB allowance, page cache included"
                         + ("; host memory only: the budget is device memory, which no cgroup bounds" if cuda else ""))
        if cg_ok else f"none: {cg_why}",
        "model": dict(shape, layers=layers, expert_bytes=expert_bytes, extent_bytes=extent_bytes, store="bf16 lossless, plain extents"),
        "trace": {"kind": f"synthetic, calibrated to the trained routing model {traces.CALIBRATED}",
                  "coverage": coverage(trace)},
        "tokens": tokens, "accelerate_tokens": accelerate_tokens, "budgets": budgets, "repeat": repeat,
        "warm_up": {"systems": warm_up_systems(systems), "tokens": WARM_UP_TOKENS, "counted": False},
        "accelerate_under_limit": acc is not None and acc["system"] == "accelerate",
        "prefetch_predictor": f"simulated, accuracy {prefetch_accuracy}; every layer, the first from the embedding",
        "raw_uring_cold_gbps": raw, "store_fetch_cold_gbps": fetch, "store_fetch_vs_raw": fetch / raw,
        "bandwidth_samples_gbps": {"raw_uring_cold": [b[0] for b in bandwidths],
                                   "store_fetch_cold": [b[1] for b in bandwidths], "taken": "before and after the systems; the faster is B"},
        # a system above its ceiling means B was taken in a slow minute of the disk: the ratios
        # against B are then too kind, and the report says so instead of passing them on
        "ceiling_exceeded_by": sorted({r["system"] for r in results if (r.get("vs_io_ceiling") or 0) > 1.0}),
        "results": results, "budget_for_ratios": at,
        # how shared the machine was, and what its noise did to the figures: a ratio that uses a
        # system whose rounds spread beyond SPREAD_LIMIT, or a limited system faster than its
        # all-in-memory bound, is withheld (None here, named in ratios_withheld)
        "machine_load": load, "warnings": warnings, "ratios_withheld": withheld,
        "best_vs_naive": ratio(best, naive, "best_vs_naive"), "best_vs_lru": ratio(best, lru, "best_vs_lru"), "best_vs_accelerate": ratio(best, acc, "best_vs_accelerate"),
        # what load_model/generate ship: next-use, prefetch off
        "default_vs_naive": ratio(nopf, naive, "default_vs_naive"), "default_vs_accelerate": ratio(nopf, acc, "default_vs_accelerate"),
        "best_vs_io_ceiling": best.get("vs_io_ceiling") if best else None,
        # the most best_vs_io_ceiling can be on this machine: the same model with every expert in
        # memory (no reads at all) against best's I/O ceiling; below 1 decode is bound by compute
        "inmemory_vs_io_ceiling": inmem["tokens_per_s"] / best["io_ceiling_tokens_per_s"]
        if inmem and best and best.get("io_ceiling_tokens_per_s") else None,
        "resident_vs_inmemory": ratio(res, inmem, "resident_vs_inmemory"),
        # quantized experts held as stored and multiplied in place, against the bf16 store and llama.cpp
        "int8_resident_vs_bf16_resident": ratio(res8, res, "int8_resident_vs_bf16_resident"), "int4_resident_vs_bf16_resident": ratio(res4, res, "int4_resident_vs_bf16_resident"),
        "bf16_vs_llama_cpp_bf16_resident": ratio(res, ll["bf16"], "bf16_vs_llama_cpp_bf16_resident"),
        "int8_vs_llama_cpp_q8_0_resident": ratio(res8, ll["q8_0"], "int8_vs_llama_cpp_q8_0_resident"),
        "int4_vs_llama_cpp_q4_0_resident": ratio(res4, ll["q4_0"], "int4_vs_llama_cpp_q4_0_resident"),
        # every weight in int4, as Q4_0 has it (not the default: see SYSTEM_DENSE_QUANT)
        "int4_dense_int4_resident_vs_bf16_resident": ratio(res44, res, "int4_dense_int4_resident_vs_bf16_resident"),
        "int4_dense_int4_vs_llama_cpp_q4_0_resident": ratio(res44, ll["q4_0"], "int4_dense_int4_vs_llama_cpp_q4_0_resident"),
        "int4_vs_llama_cpp_q4_0_limited": ratio(int4_lim, ll4_lim, "int4_vs_llama_cpp_q4_0_limited"),
        "best_int4_vs_llama_cpp_q4_0_limited": ratio(find("best-int4", at), ll4_lim, "best_int4_vs_llama_cpp_q4_0_limited"),
        # experts the L1 holds at the same budget: the int4 store's against the bf16 store's
        "int4_l1_experts_vs_bf16": int4_lim["expert_slots"] / nopf["expert_slots"] if int4_lim and nopf else None,
        "l1_experts": {"bf16": nopf and nopf["expert_slots"], "int4": int4_lim and int4_lim["expert_slots"]},
        "best_vs_bound": _unless_noisy(best["tokens_per_s"] / b_best if b_best else None, (best, res), flagged,
                                       withheld, "best_vs_bound"),
        "int4_vs_bound": _unless_noisy(int4_lim["tokens_per_s"] / b_int4 if b_int4 else None, (int4_lim, res4),
                                       flagged, withheld, "int4_vs_bound"),
        "llama_cpp": {"built": not llama_why, "why_not": llama_why or None, "version": "llama.cpp vendored by "
                      "llama-cpp-python 0.3.36 (commit 0c1e570)", "routing": "llama-bench: random token ids and the "
                      "model's own random routers (ours replay the trace); in RAM with its default repack, "
                      "under the limit with --repack 0 and mmap"},
        # on CUDA: kvikio straight into device memory over io_uring + a copy, both unverified
        "kvikio_direct_vs_uring_h2d": ratio(find("best-kvikio", at), find("best-uring-unverified", at)) if cuda else None,
        "prefetch_on_vs_off": {"tokens_per_s": [best and best["tokens_per_s"], nopf and nopf["tokens_per_s"]],
                               "stall_seconds": [best and best["stall_seconds"], nopf and nopf["stall_seconds"]],
                               "hits_l1": [best and best["hits_l1"], nopf and nopf["hits_l1"]],
                               "bytes_read": [best and best["bytes_read"], nopf and nopf["bytes_read"]],
                               "wasted_bytes": best and best["prefetch_wasted_bytes"],
                               "issued_used_late_cancelled": best and [best["prefetch_issued"], best["prefetch_used"],
                                                                       best.get("prefetch_late"), best["prefetch_cancelled"]]},
    }
    for w in warnings:
        log(f"WARNING: {w}")
    if withheld:
        log(f"WARNING: ratios withheld as too noisy: {', '.join(withheld)} (run again on a quieter machine, or with more --repeat)")
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def format_table(d: dict[str, Any]) -> str:
    lines = [f"# {d['command']} — {d['machine']}" + (f"; {d['device_name']}" if d.get("device", "cpu") != "cpu" else ""),
             f"# page cache {d['page_cache']}; memory limit {d['memory_limit']}",
             f"# model: {d['model']['layers']} layers x {d['model']['experts']} experts (hidden {d['model']['hidden']}, "
             f"expert intermediate {d['model']['inter']}, top-{d['model']['top_k']}), {d['model']['expert_bytes'] / GiB:.2f} GiB "
             f"of bf16 experts; trace {d['trace']['kind']}; prefetch predictor {d['prefetch_predictor']}",
             f"# raw uring cold {d['raw_uring_cold_gbps']:.2f} GB/s, Store.fetch cold {d['store_fetch_cold_gbps']:.2f} GB/s "
             f"(store_fetch_vs_raw {d['store_fetch_vs_raw']:.2f}); the faster of the samples "
             f"{d['bandwidth_samples_gbps']['raw_uring_cold']} taken before and after the systems", "",
             "Seconds over the decode: stall = waiting for reads (main thread), matmul = expert matmuls, rest = "
             "the rest of the main thread (attention, lm_head, Python); checksum and decode run on the Store's "
             "threads, overlapped.", "",
             "| system | budget | tok/s | L1 hits / requests | MiB read | vs I/O ceiling | stall s | matmul s | rest s "
             "| checksum s | decode s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        b = f"{r['budget_fraction']:.0%}" if r["budget_fraction"] is not None else "all"
        if "error" in r:
            lines.append(f"| {r['system']} | {b} | failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        br = r.get("bytes_read") if r.get("bytes_read") is not None else r.get("disk_bytes_read")

        def f(k, fmt="{:.2f}"):
            return fmt.format(r[k]) if r.get(k) is not None else "-"
        lines.append(f"| {r['system']} | {b} | {r['tokens_per_s']:.2f} | "
                     f"{r.get('hits_l1', '-')} / {r.get('requests', '-')} | {(br or 0) / MiB:.0f} | {f('vs_io_ceiling')} | "
                     f"{f('stall_seconds')} | {f('expert_matmul_seconds')} | {f('rest_seconds')} | "
                     f"{f('checksum_seconds')} | {f('decode_codec_seconds')} | {r['vm_hwm_bytes'] / MiB:.0f} |")
    lines.append("")
    keys = ["best_vs_naive", "best_vs_lru", "best_vs_accelerate", "best_vs_io_ceiling", "inmemory_vs_io_ceiling",
            "default_vs_naive", "default_vs_accelerate", "resident_vs_inmemory", "store_fetch_vs_raw",
            "int8_resident_vs_bf16_resident", "int4_resident_vs_bf16_resident", "bf16_vs_llama_cpp_bf16_resident",
            "int8_vs_llama_cpp_q8_0_resident", "int4_vs_llama_cpp_q4_0_resident",
            "int4_dense_int4_resident_vs_bf16_resident", "int4_dense_int4_vs_llama_cpp_q4_0_resident",
            "int4_vs_llama_cpp_q4_0_limited",
            "int4_l1_experts_vs_bf16", "best_vs_bound", "int4_vs_bound"]
    for k in keys + (["kvikio_direct_vs_uring_h2d"] if d.get("device", "cpu") != "cpu" else []):
        lines.append(f"{k} = {d[k]:.2f}" if d.get(k) is not None else
                     f"{k} = withheld (too noisy)" if k in (d.get("ratios_withheld") or {}) else f"{k} = n/a")
    ml = d.get("machine_load") or {}
    if ml:
        lines.append(f"machine load: loadavg {ml['loadavg_start'][0]:.2f} -> {ml['loadavg_end'][0]:.2f}"
                     + (f", CPU steal {ml['steal_share']:.1%}, busy {ml['busy_share']:.0%}" if "steal_share" in ml else ""))
    for w in d.get("warnings") or []:
        lines.append(f"WARNING: {w}")
    for k, why in (d.get("ratios_withheld") or {}).items():
        lines.append(f"WARNING: {k} withheld: {why}")
    if d.get("ceiling_exceeded_by"):
        lines.append(f"WARNING: {', '.join(d['ceiling_exceeded_by'])} ran above the I/O ceiling: the disk was faster "
                     "during the systems than in both bandwidth samples, so every vs-ceiling ratio here is too kind")
    return "\n".join(lines)


def plot(d: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in SYSTEMS + CUDA_SYSTEMS + QUANT_SYSTEMS + LLAMA_SYSTEMS + ("accelerate (no limit)",):
        pts = sorted((r["budget_fraction"], r["tokens_per_s"]) for r in d["results"]
                     if r["system"] == system and "error" not in r and r["budget_fraction"] is not None)
        if pts:
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=system)
    shown = ("inmemory", "resident", "resident-int4", "llama.cpp-q4_0")
    for r in (r for r in d["results"] if r["system"] in shown and r["budget_fraction"] is None and "error" not in r):
        color = {"inmemory": "black", "resident": "grey", "resident-int4": "tab:green", "llama.cpp-q4_0": "tab:red"}[r["system"]]
        ax.axhline(r["tokens_per_s"], linestyle="--", linewidth=1, color=color,
                   label=f"{r['system']} (all experts in memory)")
    ax.set_xlim(0, 60)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("device budget, % of expert bytes (memory limit = budget + allowance)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"moestream bench decode: {d['model']['layers']}L x {d['model']['experts']} experts, "
                 f"{d.get('device_name') or d.get('device', 'cpu')}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `moestream bench decode` (shared by the CLI and `python -m`)."""
    p.add_argument("--quick", action="store_true", help="2 layers, the 25%% budget only, 2 accelerate tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.add_argument("--plot", metavar="FILE.png", help="tokens/s against budget per system")
    p.add_argument("--workdir", help="where the model and store are built (kept for later runs; default $TMPDIR)")
    p.add_argument("--tokens", type=int, help="decode tokens per system (default 64)")
    p.add_argument("--layers", type=int, help="decoder layers (default 2 with --quick, else 4)")
    p.add_argument("--budget", type=float, action="append", help="a fraction of expert bytes, repeatable "
                   "(default 0.10, 0.25, 0.50; 0.25 with --quick)")
    p.add_argument("--system", action="append",
                   choices=tuple(dict.fromkeys(SYSTEMS + CUDA_SYSTEMS + QUANT_SYSTEMS + LLAMA_SYSTEMS + BOUNDS
                                               + QUANT_BOUNDS + LLAMA_BOUNDS)),
                   help="run only these (repeatable; " + ", ".join(CUDA_SYSTEMS) + " on CUDA only)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model computes and the "
                   "budgets live")
    p.add_argument("--allowance", help="memory limit beyond the budget, the same for every system "
                   "(default 1GiB on CPU, 3GiB on CUDA)")
    p.add_argument("--repeat", type=int, default=2, help="runs per system, taking turns; the median is reported")


def run(a: argparse.Namespace) -> int:
    for b in a.budget or []:
        if not 0 < b <= 1:
            raise UsageError(f"--budget {b}: a fraction of the expert bytes in (0, 1]")
    if a.tokens is not None and a.tokens < 2:
        raise UsageError("--tokens must be at least 2")
    if a.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if a.plot:   # before the run, not after it: a missing plotter must not cost the results
        from ..extras import require
        require("matplotlib", "--plot")
    if a.layers is not None and a.layers < 2:
        raise UsageError("--layers must be at least 2")
    if a.device != "cpu" and not a.device.startswith("cuda"):
        raise UsageError(f"--device {a.device}: cpu or cuda[:N]")
    allowance = parse_size(a.allowance, "--allowance") if a.allowance else None
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if a.json else (lambda m: print(m, flush=True))
    d = bench_decode(quick=a.quick, workdir=a.workdir, budgets=a.budget, tokens=a.tokens, layers=a.layers,
                     systems=tuple(a.system) if a.system else None, repeat=a.repeat, device=a.device,
                     allowance=allowance, log=log)
    if a.plot:
        plot(d, a.plot)
    print(json.dumps(d, indent=2) if a.json else "\n" + format_table(d))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moestream.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    add_arguments(p)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_system(json.loads(Path(a.child).read_text()))))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
