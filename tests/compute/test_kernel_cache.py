"""Numba's disk cache across processes. The decode kernels (decode_moe._moe_decode, decode_layer's
fused calls) call the parallel kernels _moe_layer and _linear; compiled as plain njit functions,
their cached code crashed a later process (SIGSEGV in load_model's warm-up) when the parallel
kernels had been compiled and cached by a process that ran only them (the vLLM plug, prefill,
bench/quant_kernels.py). Three fresh processes sharing one cache directory replay that order."""
import os
import subprocess
import sys

#: runs the parallel kernels alone, with the argument types the decode kernels call them with
PARALLEL_ONLY = """
import torch
from moestream.compute.quant_kernels import RoutedExpert, _kernel_linear, moe_layer, plan_linear
w = torch.zeros(64, 64, dtype=torch.bfloat16)
out = torch.zeros(1, 64)
moe_layer(torch.zeros(1, 64), [RoutedExpert(w, w, w, [0], [1.0])], out)
_kernel_linear(torch.zeros(1, 64, dtype=torch.bfloat16), w, plan_linear(w))
print("parallel kernels ran")
"""

#: what load_model runs on the CPU before the first decode token: every decode kernel once
DECODE_KERNELS = """
from types import SimpleNamespace
from moestream.compute import decode_layer, decode_moe
decode_moe.warm_up(SimpleNamespace(holds_by_address=True), [], ("gate", "up", "down"))
decode_layer.warm_up()
print("decode kernels ran")
"""


def test_decode_kernels_cached_over_parallel_kernels_cached_elsewhere_load_in_a_new_process(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    steps = [("the parallel kernels alone (compiled, cached)", PARALLEL_ONLY),
             ("the decode kernels (compiled over the cached parallel kernels, cached)", DECODE_KERNELS),
             ("the decode kernels again (loaded from the cache)", DECODE_KERNELS)]
    for what, code in steps:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, f"{what}: exit status {p.returncode}\n{p.stderr[-3000:]}"
        assert p.stdout.strip().endswith("ran"), p.stdout
