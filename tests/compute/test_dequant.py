"""Dequant kernels against an independent numpy reference, on random inputs of odd sizes."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moestream.compute.dequant import dequantize
from moestream.formats.codecs import dequantize_torch, quantize, split_quantized


def numpy_reference(buf: bytes, numel: int, quant: str, g: int, base=None) -> np.ndarray:
    """float64 dequantization straight from the byte layout in docs/FORMAT.md."""
    groups = -(-numel // g)
    raw = np.frombuffer(buf, np.uint8)
    if quant == "int8":
        codes = raw[: groups * g].view(np.int8).astype(np.float64)
        scales = raw[groups * g: groups * g + 2 * groups].view(np.float16).astype(np.float64)
        vals = codes.reshape(groups, g) * scales[:, None]
    else:
        packed = raw[: groups * g // 2]
        codes = np.empty(groups * g, np.float64)
        codes[0::2], codes[1::2] = packed & 15, packed >> 4
        off = groups * g // 2
        scales = raw[off: off + 2 * groups].view(np.float16).astype(np.float64)
        mins = raw[off + 2 * groups: off + 4 * groups].view(np.float16).astype(np.float64)
        vals = codes.reshape(groups, g) * scales[:, None] + mins[:, None]
    out = vals.reshape(-1)[:numel]
    return out + base if base is not None else out


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), quant=st.sampled_from(["int8", "int4"]), g=st.sampled_from([2, 6, 32, 64, 128]),
       with_base=st.booleans(), out_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
@example(numel=1, quant="int4", g=2, with_base=True, out_dtype=torch.float32, seed=13520)   # base cancels the value
def test_cpu_kernel_matches_numpy(numel, quant, g, with_base, out_dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(numel) * rng.uniform(0.001, 3)).astype(np.float32)
    buf = quantize(x, quant, g)
    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    codes, scales, mins = split_quantized(t, numel, quant, g)
    base = rng.standard_normal(numel).astype(np.float32) if with_base else None
    got = dequantize(codes, scales, mins, quant=quant, group_size=g, numel=numel,
                     base=torch.from_numpy(base) if base is not None else None, out_dtype=out_dtype)
    ref = numpy_reference(buf, numel, quant, g, base.astype(np.float64) if base is not None else None)
    assert got.dtype == out_dtype and got.shape == (numel,)
    want = torch.from_numpy(ref).float().to(out_dtype)  # one rounding of the fp32 value
    diff = (got.double() - want.double()).abs().max().item()
    # fp32 arithmetic vs float64 reference: each fp32 operation (code x scale, + min, + base) rounds
    # by half an fp32 ulp of its own operands, which can exceed the result where the base cancels
    # the value; then one rounding to the output dtype
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    operands = np.abs(numpy_reference(buf, numel, quant, g)).max() + (np.abs(base).max() if base is not None else 0)
    assert diff <= ulp * np.abs(ref).max() + 2**-23 * operands + 1e-30


def test_every_fp16_scale_is_read_as_torch_reads_it():
    """The CPU kernel's fp16 -> float32 (scales and minimums): all 65536 bit patterns, subnormals,
    zeros, infinities and NaNs included, against torch's conversion."""
    from numba import njit
    from moestream.compute.dequant import _half_to_float_cpu

    @njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = _half_to_float_cpu(np.int64(bits[i]))
    bits = np.arange(65536, dtype=np.int64)
    got = np.empty(65536, np.float32)
    convert(bits, got)
    want = torch.from_numpy(bits.astype(np.uint16).view(np.float16)).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))   # -0.0 kept too


def test_cpu_kernel_rounds_bf16_like_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096).astype(np.float32)
    buf = quantize(x, "int8", 64)
    c, s, m = split_quantized(torch.frombuffer(bytearray(buf), dtype=torch.uint8), 4096, "int8", 64)
    f32 = dequantize(c, s, m, quant="int8", group_size=64, numel=4096, out_dtype=torch.float32)
    bf = dequantize(c, s, m, quant="int8", group_size=64, numel=4096, out_dtype=torch.bfloat16)
    assert torch.equal(bf, f32.to(torch.bfloat16))


#: the float8 store types and the torch dtype of their codes (torch's decode is the reference)
FLOAT8 = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}


def float8_payload(kind: str, numel: int, g: int, seed: int) -> tuple[bytes, torch.Tensor]:
    """A float8 payload of every finite code (codes, then one float32 scale per group) and the
    values torch gives its codes times their scales."""
    rng = np.random.default_rng(seed)
    groups = -(-numel // g)
    codes = torch.from_numpy(rng.integers(0, 256, groups * g).astype(np.uint8))
    nonfinite = ~torch.isfinite(codes.view(FLOAT8[kind]).float())
    codes[nonfinite] = 0x38                     # checkpoints hold no NaN or inf codes (the converter refuses them)
    scales = torch.from_numpy(rng.uniform(1e-4, 2, groups).astype(np.float32))
    want = codes.view(FLOAT8[kind]).float() * scales.repeat_interleave(g)
    return codes.numpy().tobytes() + scales.numpy().tobytes(), want[:numel]


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1, 3000), kind=st.sampled_from(list(FLOAT8)), g=st.sampled_from([2, 16, 64, 128]),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_cpu_kernel_decodes_float8_as_torch_does(numel, kind, g, out_dtype, seed):
    buf, want = float8_payload(kind, numel, g, seed)
    codes, scales, mins = split_quantized(torch.frombuffer(bytearray(buf), dtype=torch.uint8), numel, kind, g)
    got = dequantize(codes, scales, mins, quant=kind, group_size=g, numel=numel, out_dtype=out_dtype)
    assert torch.equal(got, want.to(out_dtype))       # one float32 product, then one rounding


def mxfp4_payload(rows: int, groups: int, seed: int):
    """A random mxfp4 payload of a [rows, groups * 32] matrix laid out as an MXFP4 checkpoint's blocks
    and exponents, and its values as formats/mxfp4.dequantize (the reference) decodes them."""
    from moestream.formats import mxfp4
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8)
    exps = rng.integers(100, 140, (rows, groups), dtype=np.uint8)
    want = torch.from_numpy(mxfp4.dequantize(blocks, exps)).t()          # [rows, groups * 32]
    return blocks.tobytes() + exps.tobytes(), want


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 6), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_cpu_kernel_decodes_mxfp4_as_the_checkpoint_reference_does(rows, groups, out_dtype, seed):
    buf, want = mxfp4_payload(rows, groups, seed)
    numel = rows * groups * 32
    codes, scales, mins = split_quantized(torch.frombuffer(bytearray(buf), dtype=torch.uint8), numel, "mxfp4", 32)
    got = dequantize(codes, scales, mins, quant="mxfp4", group_size=32, numel=numel, out_dtype=out_dtype)
    assert torch.equal(got.view(rows, -1), want.to(out_dtype))     # every MXFP4 value is exact in bf16
    ref = dequantize_torch(codes, scales, mins, quant="mxfp4", group_size=32, numel=numel, out_dtype=out_dtype)
    assert torch.equal(ref.view(rows, -1), want.to(out_dtype))


CUDASIM_SCRIPT = textwrap.dedent("""
    import numpy as np
    from numba import cuda
    from moestream.compute.dequant import dequantize_cuda_arrays
    from moestream.formats.codecs import quantize, split_quantized
    from tests.compute.test_dequant import numpy_reference
    rng = np.random.default_rng(0)
    for quant, numel, g, with_base in [("int4", 37, 4, False), ("int8", 50, 8, True), ("int4", 64, 16, True),
                                       ("int8", 33, 2, False), ("int4", 1, 2, True)]:
        x = rng.standard_normal(numel).astype(np.float32)
        buf = quantize(x, quant, g)
        codes, scales, mins = split_quantized(np.frombuffer(buf, np.uint8), numel, quant, g)
        base = rng.standard_normal(numel).astype(np.float32) if with_base else None
        out = np.full(numel, np.nan, np.float32)
        f32 = lambda plane: None if plane is None else plane.view(np.float16).astype(np.float32)
        dequantize_cuda_arrays(codes.copy(), f32(scales), f32(mins), base, out, numel, g, quant, threads=32,
                               stream=cuda.stream() if with_base else 0)   # queued on a given stream too
        ref = numpy_reference(buf, numel, quant, g, None if base is None else base.astype(np.float64))
        assert np.isfinite(out).all(), "unwritten output"
        assert np.abs(out - ref).max() <= 1e-6 * (np.abs(ref).max() + 1), (quant, np.abs(out - ref).max())
    from tests.compute.test_dequant import float8_payload
    for kind, numel, g in [("fp8e4m3", 45, 16), ("fp8e5m2", 8, 2)]:
        buf, want = float8_payload(kind, numel, g, 1)
        codes, scales, _ = split_quantized(np.frombuffer(buf, np.uint8), numel, kind, g)
        out = np.full(numel, np.nan, np.float32)
        dequantize_cuda_arrays(codes.copy(), scales.view(np.float32).copy(), None, None, out, numel, g, kind, threads=32)
        assert np.array_equal(out, want.numpy()), kind
    from tests.compute.test_dequant import mxfp4_payload
    buf, want = mxfp4_payload(3, 2, 5)
    codes, scales, _ = split_quantized(np.frombuffer(buf, np.uint8), 192, "mxfp4", 32)
    out = np.full(192, np.nan, np.float32)
    dequantize_cuda_arrays(codes.copy(), np.ldexp(np.float32(1), scales.astype(np.int32) - 127).astype(np.float32),
                           None, None, out, 192, 32, "mxfp4", threads=32)
    assert np.array_equal(out.reshape(3, -1), want.numpy()), "mxfp4"
    print("cudasim ok")
""")


def test_cuda_kernel_in_simulator():
    """The @cuda.jit kernel, run by Numba's CUDA simulator on tiny inputs (no GPU needed)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", CUDASIM_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                       timeout=600)
    assert p.returncode == 0 and "cudasim ok" in p.stdout, p.stderr[-2000:]
