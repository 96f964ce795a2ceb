"""Group-wise int8/int4 dequantization kernels (docs/FORMAT.md gives the layout), with an
optional fused delta add (out = base + dequant(codes)).

- CPU: Numba `@njit(parallel=True)`, writing fp32, or bf16 bit patterns rounded to nearest
  even in the same pass (Numba has no half types on the CPU). bench/test_dequant_throughput.py
  compares it with a copy of the same output size.
- CUDA: Numba `@cuda.jit` (one element per thread for int8, one code byte for int4), writing
  fp32; bf16/fp16 outputs are one torch cast on the device.
  Tested in CI through Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) and on a GPU by
  `make gpu-check`.

`dequantize(...)` has the signature of `formats.codecs.Dequantizer` and dispatches on the
device of `codes`. Scale and minimum planes are read as bytes, so planes at odd offsets need no copy."""
from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import numpy as np
import torch
from numba import cuda, njit, prange

from ..formats.codecs import code_values, dequantize_torch, scale_values, view_plane
from ..formats.constants import MIXED_QUANT, QUANT_TYPES
from .row_dots import _bf16_rne, _f16

_CHUNK_GROUPS = 256
# Numba's default (workqueue) threading layer must not be entered from two threads at once;
# decode workers call in parallel, and each parallel kernel already uses every core.
_PARALLEL_LOCK = threading.Lock()


@njit(inline="always")
def _half_to_float_cpu(h):
    """IEEE fp16 bit pattern (int) -> float32 for the CPU kernel: row_dots._f16's shifts and one
    multiply for finite values (subnormals included), inf and NaN kept. Its predecessor's branches
    and `2.0 ** e` per group were a fifth of the vectorized kernel's time (int4 [768, 2048] to
    bf16: 0.30 -> 0.24 ms, int8 0.22 -> 0.18)."""
    if (h & 0x7C00) == 0x7C00:
        v = np.float32(np.inf) if (h & 0x3FF) == 0 else np.float32(np.nan)
        return -v if h & 0x8000 else v
    return _f16(h)


@njit(parallel=True, cache=True, nogil=True)
def _dequant_cpu(codes, scales, mins, scales_f32, values, base, out_f32, out_bits, numel, group, kind, has_base,
                 to_bf16):
    # Each group is dequantized into a float32 scratch row, then stored (as fp32, or rounded to
    # bf16 bits): the inner loops stay branch-free and vectorize. They index slices of the group
    # from 0: indexing the whole arrays at start + j kept Numba's negative-index check in every
    # loop and the loops scalar (an int4 [768, 2048] matrix to bf16: 1.26 ms, now ~0.24).
    # kind 0: int8, 1: int4 (fp16 scales and minimums, read as bytes); 2: float8, a code's value
    # from the type's table `values` times its group's float32 scale (scales_f32); 3: the same for
    # two table codes a byte, low nibble first (mxfp4)
    groups = (numel + group - 1) // group
    nchunks = (groups + _CHUNK_GROUPS - 1) // _CHUNK_GROUPS
    half = group // 2
    for c in prange(nchunks):
        row = np.empty(group, np.float32)
        for g in range(c * _CHUNK_GROUPS, min(groups, (c + 1) * _CHUNK_GROUPS)):
            start = g * group
            n = min(group, numel - start)
            if kind == 2:
                s = scales_f32[g]
                cg = codes[start:start + n]
                for j in range(n):
                    row[j] = values[cg[j]] * s
            elif kind == 3:  # codes cover whole groups, as int4's
                s = scales_f32[g]
                cg = codes[start >> 1:(start >> 1) + half]
                for j in range(half):
                    b = cg[j]
                    row[2 * j] = values[b & 15] * s
                    row[2 * j + 1] = values[b >> 4] * s
            else:
                s = np.float32(_half_to_float_cpu(np.int64(scales[2 * g]) | (np.int64(scales[2 * g + 1]) << 8)))
                if kind == 1:  # codes cover whole groups (the last one padded), two per byte, low nibble first
                    m = np.float32(_half_to_float_cpu(np.int64(mins[2 * g]) | (np.int64(mins[2 * g + 1]) << 8)))
                    cg = codes[start >> 1:(start >> 1) + half]
                    for j in range(half):
                        b = cg[j]
                        row[2 * j] = np.float32(b & 15) * s + m
                        row[2 * j + 1] = np.float32(b >> 4) * s + m
                else:
                    cg = codes[start:start + n]
                    for j in range(n):
                        row[j] = np.float32(np.int8(cg[j])) * s
            if has_base:
                bg = base[start:start + n]
                for j in range(n):
                    row[j] += bg[j]
            if to_bf16:  # round to nearest even (NaN payloads aside, which finite weights never give)
                ob = out_bits[start:start + n]
                for j in range(n):
                    ob[j] = _bf16_rne(row[j])
            else:
                of = out_f32[start:start + n]
                for j in range(n):
                    of[j] = row[j]


def dequantize_cpu_arrays(codes: np.ndarray, scales: np.ndarray, mins: Optional[np.ndarray], base: Optional[np.ndarray],
                          out: np.ndarray, numel: int, group_size: int, quant: str) -> None:
    """Fill `out` (float32, or uint16 bf16 bit patterns) with `numel` dequantized values.
    codes/scales/mins are uint8 arrays; base (float32, numel) is added when given."""
    to_bf16 = out.dtype == np.uint16
    empty_f = np.empty(1, np.float32)
    out_f32, out_bits = empty_f if to_bf16 else out, out if to_bf16 else np.empty(1, np.uint16)
    b = base if base is not None else empty_f
    qtype = QUANT_TYPES[quant]
    if qtype.float_codes:
        kind, values = (3 if qtype.bits == 4 else 2), _code_table(quant)
        if qtype.e8m0_scales:      # 2^(e - 127), NaN for 255: 1/32 of the output, in numpy
            scales_f32 = np.where(scales == 255, np.float32(np.nan),
                                  np.ldexp(np.float32(1), scales.astype(np.int32) - 127)).astype(np.float32)
        else:
            sc = scales if scales.ctypes.data % 4 == 0 else scales.copy()   # a float32 view needs 4-byte alignment
            scales_f32 = sc.view(np.float32)
    else:
        kind, values, scales_f32 = int(quant == "int4"), empty_f, empty_f
    with _PARALLEL_LOCK:
        _dequant_cpu(codes, scales, mins if mins is not None else scales, scales_f32, values, b, out_f32, out_bits,
                     numel, group_size, kind, base is not None, to_bf16)


@functools.lru_cache(maxsize=None)
def _code_table(kind: str) -> np.ndarray:
    return code_values(kind)


# ---- CUDA ------------------------------------------------------------------------------------
# Scales and minimums reach the kernels as float32 planes (converted on the device by torch,
# 1/32 of the output or less), so the per-element work is one load, one multiply-add, one store.
_cuda_kernels = None


def _cuda():
    """Build the CUDA kernels on first use (the simulator builds them too)."""
    global _cuda_kernels
    if _cuda_kernels is None:
        @cuda.jit
        def int8_kernel(codes, scales, base, out, numel, group, has_base):
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            while i < numel:
                q = np.int32(codes[i])
                if q > 127:
                    q -= 256
                v = np.float32(q) * scales[i // group]
                if has_base:
                    v += base[i]
                out[i] = v
                i += stride

        @cuda.jit
        def int4_kernel(codes, scales, mins, base, out, numel, group, has_base):
            b = cuda.grid(1)            # one code byte, two outputs
            stride = cuda.gridsize(1)
            nbytes = (numel + 1) // 2
            while b < nbytes:
                byte = codes[b]
                e = 2 * b
                g = e // group          # both nibbles share a group: group sizes are even
                s = scales[g]
                m = mins[g]
                v = np.float32(byte & 15) * s + m
                if has_base:
                    v += base[e]
                out[e] = v
                if e + 1 < numel:
                    v = np.float32(byte >> 4) * s + m
                    if has_base:
                        v += base[e + 1]
                    out[e + 1] = v
                b += stride
        @cuda.jit
        def lut_kernel(codes, values, scales, base, out, numel, group, has_base):
            i = cuda.grid(1)            # float8: the code's value from the type's table
            stride = cuda.gridsize(1)
            while i < numel:
                v = values[codes[i]] * scales[i // group]
                if has_base:
                    v += base[i]
                out[i] = v
                i += stride
        @cuda.jit
        def lut4_kernel(codes, values, scales, base, out, numel, group, has_base):
            i = cuda.grid(1)            # mxfp4: two table codes a byte, low nibble first
            stride = cuda.gridsize(1)
            while i < numel:
                b = codes[i // 2]
                c = b & 15 if i % 2 == 0 else b >> 4
                v = values[c] * scales[i // group]
                if has_base:
                    v += base[i]
                out[i] = v
                i += stride
        _cuda_kernels = (int8_kernel, int4_kernel, lut_kernel, lut4_kernel)
    return _cuda_kernels


def dequantize_cuda_arrays(codes, scales, mins, base, out, numel: int, group_size: int, quant: str,
                           threads: int = 256, stream=0) -> None:
    """CUDA twin of dequantize_cpu_arrays: `codes` uint8, `scales`/`mins` float32 (one per
    group), `base` float32 or None, `out` float32; CUDA device arrays (anything with
    __cuda_array_interface__, or numpy arrays under the simulator). The kernel is queued on
    `stream` (a Numba stream; 0: the default stream) and not waited for."""
    int8_kernel, int4_kernel, lut_kernel, lut4_kernel = _cuda()
    work = (numel + 1) // 2 if quant == "int4" else numel
    blocks = max(1, min(65535, (work + threads - 1) // threads))
    dummy = base if base is not None else out
    qtype = QUANT_TYPES[quant]
    if qtype.float_codes and qtype.bits == 4:
        lut4_kernel[blocks, threads, stream](codes, _device_table(quant), scales, dummy, out, numel, group_size,
                                             base is not None)
    elif qtype.float_codes:
        lut_kernel[blocks, threads, stream](codes, _device_table(quant), scales, dummy, out, numel, group_size,
                                            base is not None)
    elif quant == "int8":
        int8_kernel[blocks, threads, stream](codes, scales, dummy, out, numel, group_size, base is not None)
    else:
        int4_kernel[blocks, threads, stream](codes, scales, mins, dummy, out, numel, group_size, base is not None)


_DEVICE_TABLES: dict = {}


def _device_table(kind: str):
    """A table type's values (at most 1 KiB) on the current CUDA device, copied there once."""
    key = (kind, cuda.current_context().device.uuid)     # uuid: the simulator's devices have no id
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = cuda.to_device(_code_table(kind))    # synchronous: ready for any stream
    return _DEVICE_TABLES[key]


def _numba_stream(stream: torch.cuda.Stream):
    """torch's stream as a Numba stream, so that a kernel queues behind the torch work that made
    its inputs (the host-to-device copy of the codes) with no host-side wait."""
    handle = stream.cuda_stream
    return cuda.external_stream(handle) if handle else 0   # 0: the legacy default stream, for both


def _device_array(t: torch.Tensor):
    # sync=False: by default Numba synchronizes the stream a tensor's __cuda_array_interface__
    # names (the caller's current stream) for every array it wraps, a host-side wait per plane
    # on whatever the caller has queued; the kernel runs on that same stream instead
    return cuda.as_cuda_array(t, sync=False)


_CUDA_STATUS: Optional[tuple[bool, str]] = None


def cuda_kernel_status() -> tuple[bool, str]:
    """Whether the Numba CUDA kernel builds and runs here, and why not (probed once, on a
    tiny input checked against the CPU kernel)."""
    global _CUDA_STATUS
    if _CUDA_STATUS is None:
        try:
            if not cuda.is_available():
                _CUDA_STATUS = (False, "numba.cuda sees no CUDA GPU")
            else:
                codes = np.arange(64, dtype=np.uint8)
                scales = np.full(2, 0.5, np.float16)
                out = cuda.to_device(np.zeros(64, np.float32))
                dequantize_cuda_arrays(cuda.to_device(codes), cuda.to_device(scales.astype(np.float32)), None, None,
                                       out, 64, 32, "int8")
                want = np.empty(64, np.float32)
                dequantize_cpu_arrays(codes, scales.view(np.uint8), None, None, want, 64, 32, "int8")
                ok = np.array_equal(out.copy_to_host(), want)
                _CUDA_STATUS = (True, "numba-cuda kernels") if ok else (False, "numba-cuda kernel gave wrong values")
        except Exception as e:  # e.g. numba-cuda built for another numpy
            _CUDA_STATUS = (False, f"numba-cuda kernel does not build here ({type(e).__name__}: {e})")
    return _CUDA_STATUS


def cuda_kernels_usable() -> bool:
    return cuda_kernel_status()[0]


def dequant_backend(device: torch.device | str) -> str:
    """Which dequantizer `dequantize` uses for tensors on `device`, and why."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "numba-cpu kernels"
    ok, why = cuda_kernel_status() if dev.type == "cuda" else (False, f"no Numba kernel for {dev.type}")
    return why if ok else f"torch reference dequantizer ({why})"


def store_dequant(store) -> str:
    """What decodes `store`'s experts: the dequantizer in use for an int or mixed store, or
    none for a lossless one (the run report's "dequant")."""
    if store.index.quant in (*QUANT_TYPES, MIXED_QUANT):
        if getattr(store, "keep_quantized", False):
            where = ("numba-cpu kernels" if store.device.type == "cpu"
                     else f"{dequant_backend(store.device)} at each use")
            return f"none: held quantized, multiplied by {where}"
        return dequant_backend(store.device)
    return "none (lossless store)"


_warned = False


def _warn_fallback(dev: torch.device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"moestream: {dequant_backend(dev)}", RuntimeWarning, stacklevel=3)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor], *, quant: str,
               group_size: int, numel: int, base: Optional[torch.Tensor] = None,
               out_dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dequantize one tensor's planes (uint8 tensors on CPU or CUDA) with the Numba kernel of
    their device; returns a new 1-D tensor of `numel` elements (caller-owned), or `out`
    (numel elements of out_dtype, e.g. a view of a cache slot) filled in place."""
    dev = codes.device
    b = base.reshape(-1).to(device=dev, dtype=torch.float32).contiguous() if base is not None else None
    if dev.type == "cpu":
        if out_dtype in (torch.bfloat16, torch.float32):  # the kernel writes these two directly
            res = out.view(-1) if out is not None else torch.empty(numel, dtype=out_dtype)
            target = res.view(torch.int16).numpy().view(np.uint16) if out_dtype == torch.bfloat16 else res.numpy()
        else:
            res = torch.empty(numel, dtype=torch.float32)
            target = res.numpy()
        dequantize_cpu_arrays(codes.contiguous().numpy(), scales.contiguous().numpy(),
                              mins.contiguous().numpy() if mins is not None else None,
                              b.numpy() if b is not None else None, target, numel, group_size, quant)
        if res.dtype == out_dtype:
            return res
        return out.view(-1).copy_(res) if out is not None else res.to(out_dtype)
    if dev.type == "cuda" and cuda_kernels_usable():
        res = torch.empty(numel, dtype=torch.float32, device=dev)
        plane = QUANT_TYPES[quant].plane_dtype
        sf = scale_values(scales, quant)
        mf = view_plane(mins, plane).float() if mins is not None else None
        with torch.cuda.device(dev):
            dequantize_cuda_arrays(_device_array(codes.contiguous()), _device_array(sf),
                                   _device_array(mf) if mf is not None else None,
                                   _device_array(b) if b is not None else None, _device_array(res),
                                   numel, group_size, quant, stream=_numba_stream(torch.cuda.current_stream(dev)))
        return out.view(-1).copy_(res) if out is not None else res.to(out_dtype)
    # a device without a working Numba kernel: the plain-torch reference runs anywhere torch
    # does; said once as a warning and in dequant_backend() (load_model reports it)
    _warn_fallback(dev)
    return dequantize_torch(codes, scales, mins, quant=quant, group_size=group_size, numel=numel, base=base,
                            out_dtype=out_dtype, out=out)
