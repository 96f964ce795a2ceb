"""`make gpu-check`: the checks that need a CUDA GPU (never run in CI).

1. kvikio reads of experts straight into CUDA memory, against the posix and uring paths
   (moestream bench io on a synthetic store, same run);
2. the Numba CUDA dequant kernels against the Numba CPU kernels on random inputs, and their
   throughput against a device-to-device copy of the output size;
3. the streaming forward with device="cuda": logits and greedy tokens against transformers
   for each family; plain, int8 and int4 stores against the CPU forward of the same store
   (the Store's CUDA decode streams); then decode tokens/s on a synthetic model larger than
   its device budget;
4. `moestream bench decode --quick --device cuda` (one round): the Qwen3-30B-A3B-shaped model
   at a 25 % device budget, naive / LRU / best / accelerate, and best reading with kvikio
   straight into device memory against io_uring + a copy.

`python -m moestream.gpu_check [SECTION ...]` runs only the named sections (environment, dequant,
forward, store_paths, decode_speed, bench_decode, io); a lent machine's 10-minute call may not
fit them all. Prints a table and writes every figure to $OUT/gpu_check.json (or ./gpu_check.json)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

RESULTS: dict = {}
FAILED: list[str] = []


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                RESULTS[name] = fn(*a, **k)
                print(f"   done in {time.perf_counter() - t0:.1f} s", flush=True)
            except Exception as e:
                FAILED.append(name)
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
        return run
    return wrap


@section("environment")
def environment():
    import numba
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
           "numba": numba.__version__}
    from moestream.compute.dequant import cuda_kernels_usable
    from moestream.storage.backends import kvikio_usable
    env["numba_cuda_usable"] = cuda_kernels_usable()
    env["kvikio"] = kvikio_usable()
    from moestream.compute.dequant import dequant_backend
    env["dequant_cuda"] = dequant_backend("cuda")
    try:
        import kvikio
        import kvikio.defaults
        env["kvikio_version"] = kvikio.__version__
        env["kvikio_compat_mode_preferred"] = kvikio.defaults.is_compat_mode_preferred()
    except Exception as e:
        env["kvikio_version"] = f"unavailable: {e}"
    print(json.dumps(env, indent=2))
    return env


@section("io: kvikio into CUDA memory vs posix and uring")
def io_check(work: Path, size: int):
    from moestream.bench.io import bench_io, format_table
    backends = ["kvikio", "posix", "uring"]
    d = bench_io(synthetic=size, workdir=str(work), repeat=3, backends=backends, progress=print)
    print(format_table(d))
    return d


@section("dequant: CUDA kernels vs CPU kernels")
def dequant_check():
    from moestream.compute.dequant import cuda_kernel_status, dequantize
    from moestream.formats.codecs import quantize, split_quantized
    ok, why = cuda_kernel_status()
    if not ok:  # the torch fallback would pass the comparison: that is not what this checks
        raise RuntimeError(f"Numba CUDA kernels unusable: {why}")
    rng = np.random.default_rng(0)
    rows = []
    for quant in ("int8", "int4"):
        for numel, with_base in ((1_000_003, False), (1_000_003, True), (64 << 20, False)):
            x = rng.standard_normal(numel).astype(np.float32)
            buf = torch.frombuffer(bytearray(quantize(x, quant, 64)), dtype=torch.uint8)
            c, s, m = split_quantized(buf, numel, quant, 64)
            base = torch.from_numpy(rng.standard_normal(numel).astype(np.float32)) if with_base else None
            cpu = dequantize(c, s, m, quant=quant, group_size=64, numel=numel, base=base, out_dtype=torch.float32)
            gc, gs, gm = c.cuda(), s.cuda(), (m.cuda() if m is not None else None)
            gb = base.cuda() if base is not None else None
            gpu = dequantize(gc, gs, gm, quant=quant, group_size=64, numel=numel, base=gb, out_dtype=torch.float32)
            torch.cuda.synchronize()
            err = (gpu.cpu() - cpu).abs().max().item()
            rel = err / cpu.abs().max().item()
            for _ in range(3):
                dequantize(gc, gs, gm, quant=quant, group_size=64, numel=numel, base=gb, out_dtype=torch.bfloat16)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 10
            e0.record()
            for _ in range(reps):
                dequantize(gc, gs, gm, quant=quant, group_size=64, numel=numel, base=gb, out_dtype=torch.bfloat16)
            e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / reps
            out_bytes = numel * 2
            src = torch.empty(out_bytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            e0.record()
            for _ in range(reps):
                dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            copy_ms = e0.elapsed_time(e1) / reps
            row = {"quant": quant, "numel": numel, "delta": with_base, "max_abs_err_vs_cpu": err, "rel_err": rel,
                   "ms": ms, "out_gbps": out_bytes / ms / 1e6, "d2d_copy_gbps": 2 * out_bytes / copy_ms / 1e6}
            rows.append(row)
            print(f"   {quant} n={numel:>9} delta={with_base!s:5} max|gpu-cpu|={err:.2e} (rel {rel:.1e}) "
                  f"{row['out_gbps']:.1f} GB/s out (bf16), copy {row['d2d_copy_gbps']:.1f} GB/s (read+write)")
            if rel > 1e-6:
                raise AssertionError(f"CUDA kernel differs from the CPU kernel: rel {rel}")
    return rows


@section("forward on cuda: logits and greedy tokens vs transformers")
def forward_check(work: Path):
    import moestream
    from transformers import AutoModelForCausalLM
    from moestream.compute import load_model
    from moestream.demo import build_checkpoint
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for i, fam in enumerate(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]):
        ck = build_checkpoint(fam, work / f"ck_{fam}", seed=i, with_tokenizer=False)
        store = moestream.convert(ck, work / f"st_{fam}", progress=False)
        ref = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).cuda().eval()
        model = load_model(store, device="cuda", dtype=torch.float32, device_budget=3 * 3 * 64 * 96 * 4, host_budget=0)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)).cuda()
        with torch.no_grad():
            diff = (ref(ids).logits - model(ids)).abs().max().item()
        want = ref.generate(ids[:1, :6], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        got = model.generate(ids[:1, :6], 20)
        same = bool(torch.equal(want, got))
        st = model.store.stats()
        model.store.close()
        rows.append({"family": fam, "max_abs_logit_diff": diff, "greedy_20_equal": same, "misses": st["misses"]})
        print(f"   {fam:>10}: max |logit diff| {diff:.2e}, greedy 20 tokens equal: {same}, expert reads {st['misses']}")
        if diff > 1e-4 or not same:
            raise AssertionError(f"{fam}: cuda forward differs from transformers")
    return rows


@section("forward on cuda vs on cpu: plain, int8 and int4 stores, prefetch on, kvikio into device memory")
def store_paths_check(work: Path):
    """The CUDA decode path (pinned slab -> device on the Store's own streams, Numba dequant on
    those streams, event waits) against the CPU forward of the same store: plain extents come
    straight from a pinned slab that is reused as soon as the copy's event completes, so a
    missing wait shows as wrong logits here. Prefetch on, so decode threads run beside compute.
    With kvikio, the plain store also runs with io="kvikio", verify=False: extents read straight
    into device memory and used in place."""
    import moestream
    from moestream.compute import load_model
    from moestream.demo import build_checkpoint
    from moestream.storage.backends import kvikio_usable
    torch.backends.cuda.matmul.allow_tf32 = False
    ck = build_checkpoint("mixtral", work / "ck_paths", seed=11, with_tokenizer=False)
    rows = []
    for quant, zstd in (("keep", None), ("int8", 3), ("int4", None)):   # keep: plain fp32 extents
        store = moestream.convert(ck, work / f"paths_{quant}_{zstd}", quant=quant,   # zstd wherever smaller
                                  zstd_level=zstd, zstd_min_saving=0, delta=False, progress=False)
        ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
        runs = [("cpu", {}), ("cuda", {})]
        if quant == "keep" and kvikio_usable()[0]:   # plain extents straight into device memory
            runs.append(("cuda", {"io": "kvikio", "verify": False}))
        logits = []
        for dev, options in runs:
            model = load_model(store, device=dev, dtype=torch.float32, device_budget=3 * 3 * 64 * 96 * 4,
                               host_budget=0, prefetch=True, **options)
            with torch.no_grad():
                got = model(ids.to(dev))
                got = torch.stack([got] + [model(ids.to(dev)) for _ in range(2)])   # misses, then reuse
            logits.append(got.cpu())
            st = model.store.stats()
            model.store.close()
            if dev == "cpu":
                continue
            diff = (logits[0] - logits[-1]).abs().max().item()
            rows.append({"store": quant, "zstd": zstd, **options, "max_abs_logit_diff_vs_cpu": diff,
                         "misses": st["misses"], "device_reads": st["device_reads"], "backend": st["backend"]})
            print(f"   {quant} zstd={zstd} io={st['backend']}: max |cuda - cpu| {diff:.2e}, expert reads "
                  f"{st['misses']}, straight into device memory {st['device_reads']}")
            if diff > 1e-4:
                raise AssertionError(f"{quant} store, {options or 'defaults'}: the cuda forward differs from the cpu one")
            if options and not st["device_reads"]:
                raise AssertionError("io='kvikio', verify=False: no extent was read straight into device memory")
    return rows


@section("decode tokens/s on cuda, synthetic model larger than the device budget")
def decode_speed(work: Path, size: int):
    import moestream
    from moestream.compute import load_model
    from moestream.formats import StoreReader
    from moestream.bench.io import write_synthetic_checkpoint
    src = write_synthetic_checkpoint(work / "speed_ck", size)
    rows = []
    for quant, zstd in (("int4", None), ("bf16", None), ("int4", 3)):
        store = moestream.convert(src, work / f"speed_{quant}_{zstd}", quant=quant, zstd_level=zstd,
                                  zstd_min_saving=0, delta=False, progress=False)
        with StoreReader(store) as r:
            decoded = sum(reg.decoded_length for reg in r.index.extents.values())
        for frac in (0.25, 1.5):
            budget = int(decoded * frac)
            model = load_model(store, device="cuda", device_budget=budget, host_budget=0)
            ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
            timings: dict = {}
            model.generate(ids, 4)  # warm-up: kernels compiled, dense weights in place
            model.store.close()
            model = load_model(store, device="cuda", device_budget=budget, host_budget=0)
            model.generate(ids, 32, timings=timings)
            st = model.store.stats()
            model.store.close()
            tps = (timings["decode_tokens"] - 1) / timings["decode_seconds"]
            row = {"quant": quant, "zstd": zstd, "expert_bytes_decoded": decoded, "device_budget": budget,
                   "decode_tok_s": tps, "prefill_tok_s": timings["prefill_tokens"] / timings["prefill_seconds"],
                   "hits_l1": st["hits_l1"], "misses": st["misses"], "bytes_read": st["bytes_read"],
                   "stall_s": st["stall_seconds"], "backend": st["backend"]}
            rows.append(row)
            row["dequant"] = model.dequant
            print(f"   {quant} zstd={zstd} budget {frac:.2f}x experts: decode {tps:.2f} tok/s, "
                  f"{st['misses']} reads, {st['hits_l1']} L1 hits, stall {st['stall_seconds']:.2f} s, io {st['backend']}")
    return rows


@section("bench decode --quick --device cuda: kvikio direct vs io_uring + copy, peers under one host memory limit")
def bench_decode_cuda(work: Path):
    from moestream.bench.decode import bench_decode, format_table
    d = bench_decode(quick=True, workdir=str(work), repeat=1, device="cuda", log=lambda m: print("   " + m, flush=True))
    print(format_table(d))
    return d


#: section name -> its run, given (workdir, model bytes, io bytes); in the order they run
SECTIONS = {"environment": lambda work, model, io: environment(),
            "dequant": lambda work, model, io: dequant_check(),
            "forward": lambda work, model, io: forward_check(work),
            "store_paths": lambda work, model, io: store_paths_check(work),
            "decode_speed": lambda work, model, io: decode_speed(work, model),
            "bench_decode": lambda work, model, io: bench_decode_cuda(work),
            "io": lambda work, model, io: io_check(work, io)}


def main(argv: "list[str] | None" = None) -> int:
    only = sys.argv[1:] if argv is None else argv
    unknown = [n for n in only if n not in SECTIONS]
    if unknown:
        print(f"gpu-check: no section {', '.join(unknown)} (sections: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing was run", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("OUT", "."))
    work = Path(tempfile.mkdtemp(prefix="moestream-gpu-", dir=os.environ.get("MOESTREAM_GPU_WORKDIR")))
    io_size = int(float(os.environ.get("MOESTREAM_GPU_IO_GIB", "2")) * (1 << 30))
    model_size = int(float(os.environ.get("MOESTREAM_GPU_MODEL_GIB", "1")) * (1 << 30))
    try:
        for name, run in SECTIONS.items():
            if not only or name in only:
                run(work, model_size, io_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(f"\ngpu-check: {len(RESULTS) - len(FAILED)} sections passed, failed: {FAILED or 'none'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
