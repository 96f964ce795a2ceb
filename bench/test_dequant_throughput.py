"""CPU dequant throughput (GB/s of bf16 output) against a plain copy of the same output size.

    .venv/bin/python -m pytest bench/test_dequant_throughput.py --benchmark-only

Read the `ratio` printed at the end: kernel time over copy time, measured in the same run."""
import numpy as np
import pytest
import torch

from moestream.compute.dequant import dequantize
from moestream.formats.codecs import dequantize_torch, quantize, split_quantized

NUMEL = 16 << 20   # 32 MiB of bf16 output


@pytest.fixture(scope="module", params=["int8", "int4"])
def planes(request):
    x = np.random.default_rng(0).standard_normal(NUMEL).astype(np.float32)
    buf = torch.frombuffer(bytearray(quantize(x, request.param, 64)), dtype=torch.uint8)
    return request.param, split_quantized(buf, NUMEL, request.param, 64)


def _gbps(benchmark):
    return NUMEL * 2 / benchmark.stats.stats.median / 1e9


def test_numba_cpu_kernel(benchmark, planes):
    quant, (c, s, m) = planes
    dequantize(c, s, m, quant=quant, group_size=64, numel=NUMEL)  # compile outside the timing
    benchmark(lambda: dequantize(c, s, m, quant=quant, group_size=64, numel=NUMEL))
    benchmark.extra_info["out_gbps"] = _gbps(benchmark)


def test_torch_reference(benchmark, planes):
    quant, (c, s, m) = planes
    benchmark(lambda: dequantize_torch(c, s, m, quant=quant, group_size=64, numel=NUMEL))
    benchmark.extra_info["out_gbps"] = _gbps(benchmark)


def test_memcpy_same_size(benchmark):
    """The baseline: a copy into a new tensor, as dequantize returns a new tensor."""
    src = torch.empty(NUMEL, dtype=torch.bfloat16).normal_()
    benchmark(src.clone)
    benchmark.extra_info["out_gbps"] = _gbps(benchmark)


def test_memcpy_into_existing(benchmark):
    """A copy into a buffer that is already mapped (no page faults): the upper bound."""
    src = torch.empty(NUMEL, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    benchmark(lambda: dst.copy_(src))
    benchmark.extra_info["out_gbps"] = _gbps(benchmark)
