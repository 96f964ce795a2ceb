"""Quantized experts multiplied where they lie (compute/quant_kernels.py): the kernels against
the dequantize-then-matmul reference, the tiers holding the stored form, and every family's
logits on the quantized-compute path against today's dequantize-to-bf16 path."""
import pytest
import torch
import torch.nn.functional as F

import moestream
from moestream.compute import load_model
from moestream.compute.dequant import dequantize
from moestream.compute.quant_kernels import QUANT_KERNELS, RoutedExpert, moe_layer, moe_layer_fits, quant_linear
from moestream.compute.row_dots import S8_ACTIVATIONS
from moestream.formats.constants import QUANT_TYPES, align_up
from moestream.formats.quantized import QuantizedTensor, holds_quantized, quantize_matrix

from ..conftest import FAMILIES

#: relative error (Frobenius) of the kernels against fp32 dequantize-then-matmul: for int4 the
#: activations' own int8 rounding, ~0.5 % per dot product (int8 weights take float activations)
KERNEL_TOLERANCE = 0.02
#: the same for int8 weights: float rounding only where they meet the float activations; on AVX2
#: hosts (row_dots.S8_ACTIVATIONS) groups of 32 and 64 meet int16 activations, each within
#: 2^-16 of its group's largest (measured ~2e-5 here)
INT8_TOLERANCE = 1e-4 if S8_ACTIVATIONS == "int16" else 1e-5
#: max |logit difference| between the quantized-compute path and the dequantize-to-bf16 path,
#: relative to the largest |logit| (both compute the rest of the model in bf16)
LOGIT_TOLERANCE = 0.05


def quantized(w: torch.Tensor, kind: str, group: int = 64) -> QuantizedTensor:
    return quantize_matrix(w, kind, group)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_quant_type_has_a_kernel():
    # ... and the one plain weight type the layer kernel also reads (a lossless bf16 store)
    assert set(QUANT_KERNELS) == set(QUANT_TYPES) | {"bf16"}
    assert QUANT_KERNELS["bf16"].dequantize is None
    assert len({k.code for k in QUANT_KERNELS.values()}) == len(QUANT_KERNELS)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8e4m3", "fp8e5m2", "mxfp4"])
@pytest.mark.parametrize("group", [16, 32, 64, 128])    # the scalar loops; one and two vector chunks a group
def test_quant_linear_matches_dequantized_matmul(kind, group):
    torch.manual_seed(0)
    w = quantized(torch.randn(80, 256) * 0.02, kind, group)
    x = torch.randn(3, 256)
    want = x @ w.dequantize(dequantize, torch.float32).T
    got = quant_linear(x, w)
    assert got.shape == (3, 80) and got.dtype == torch.float32
    # float8 and mxfp4 codes meet the float activations: only float rounding; int4's activations are int8
    assert rel(got, want) < {"int4": KERNEL_TOLERANCE, "int8": INT8_TOLERANCE}.get(kind, 1e-5)


def test_every_mxfp4_code_and_exponent_is_multiplied_at_its_value():
    """Row r of a [16, 64] matrix holds e2m1 code r everywhere; its two groups' exponents run over
    every E8M0 value but NaN's 255 (0: the subnormal 2^-127), times one-hot activations: each
    product is code value * 2^(e - 127) exactly, as formats/mxfp4.py decodes it."""
    from moestream.formats.mxfp4 import FP4_VALUES
    values = torch.from_numpy(FP4_VALUES).double()
    for first in range(0, 255, 2):
        w = quantize_matrix(torch.zeros(16, 64), "mxfp4", 32)
        w.codes.copy_(torch.arange(16, dtype=torch.uint8)[:, None].expand(16, 32) * 17)    # both nibbles r
        exps = torch.tensor([first, min(first + 1, 254)], dtype=torch.uint8)
        w.scales.copy_(exps.expand(16, 2))
        x = torch.zeros(2, 64)
        x[0, 5], x[1, 40] = 1.0, 1.0                    # one weight of each group
        # one token row a call: below mxfp4's gemm_rows, the kernel's path (the GEMM's bf16
        # weights would overflow at the largest exponents)
        assert QUANT_KERNELS["mxfp4"].gemm_rows > 1
        got = torch.cat([quant_linear(x[i:i + 1], w) for i in range(2)]).double()
        want = values[None, :] * torch.exp2(exps.double() - 127)[:, None]
        assert torch.equal(got, want.float().double()), first


@pytest.mark.parametrize("kind,dtype", [("fp8e4m3", torch.float8_e4m3fn), ("fp8e5m2", torch.float8_e5m2)])
@pytest.mark.parametrize("group", [64, 16])     # the vector decode (64 codes at a time); the scalar one
def test_every_float8_code_is_multiplied_at_its_value(kind, dtype, group):
    """The kernels' bit-move decode of float8 (subnormals, zeros and signs included) against
    torch's: a [256, 256] matrix whose row r holds code r at every column (codes that are NaN or
    inf, which the converter refuses, as 0), times one-hot activations."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[~torch.isfinite(codes.view(dtype).float())] = 0
    w = quantize_matrix(torch.zeros(256, 256), kind, group)
    w.codes.copy_(codes[:, None].expand(256, 256))
    w.scales.fill_(1.0)
    rows = 4                                     # token rows a call: below gemm_rows, the kernel's path
    assert rows < QUANT_KERNELS[kind].gemm_rows
    for start in range(0, 256, rows):
        x = torch.zeros(rows, 256)
        x[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
        got = quant_linear(x, w)
        assert torch.equal(got, codes.view(dtype).float()[None, :].expand(rows, 256))


def test_fp16_scales_are_read_exactly_subnormals_zero_and_sign_included():
    """The kernel's branch-free fp16 conversion: a group whose scale is subnormal, zero or whose
    minimum is negative gives the reference's result."""
    w = torch.zeros(4, 64)
    w[0] = 1e-6 * torch.linspace(-1, 1, 64)      # subnormal fp16 scale (int8: absmax/127 < 6.1e-5)
    w[1] = 0                                     # zero scale
    w[2] = -3.0                                  # a negative minimum (int4), constant group
    w[3] = torch.linspace(-2, 5, 64)
    x = torch.ones(1, 64)
    for kind in ("int8", "int4"):
        q = quantized(w, kind)
        want = x @ q.dequantize(dequantize, torch.float32).T
        got = quant_linear(x, q)
        assert torch.allclose(got, want, rtol=0.02, atol=1e-9), (kind, got, want)


def _weights(w: torch.Tensor, kind: str):
    return w.bfloat16() if kind == "bf16" else quantized(w, kind)


def _as_float(m) -> torch.Tensor:
    return m.float() if isinstance(m, torch.Tensor) else m.dequantize(dequantize, torch.float32)


@pytest.mark.parametrize("kinds,hidden,inter", [
    *((k, 256, 128) for k in [("int8",) * 3, ("int4",) * 3, ("int8", "int4", "int8"), ("bf16",) * 3,
                              ("bf16", "int4", "int8"), ("fp8e4m3",) * 3, ("fp8e5m2", "int8", "fp8e4m3")]),
    (("bf16",) * 3, 192, 96),       # no multiple of the 64-weight vector chunk: bf16's scalar loop
    # 21 groups of 64 (a whole block of 16 and a partial one), 3 in the down projection
    *((k, 1344, 192) for k in [("int8",) * 3, ("int4",) * 3, ("bf16",) * 3])])
def test_moe_layer_matches_the_reference_swiglu(kinds, hidden, inter):
    torch.manual_seed(1)
    tokens = 5
    x = torch.randn(tokens, hidden)
    want = torch.zeros(tokens, hidden)
    routed = []
    for e, kind in enumerate(kinds):
        mats = [_weights(torch.randn(*s) * 0.05, kind) for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
        rows = [r for r in range(tokens) if (r + e) % 2 == 0] + ([4] if e == 1 else [])
        weights = [0.1 + 0.2 * i for i in range(len(rows))]
        routed.append(RoutedExpert(*mats, rows, weights))
        g, u, d = (_as_float(m) for m in mats)
        for r, wt in zip(rows, weights):
            want[r] += wt * ((F.silu(x[r] @ g.T) * (x[r] @ u.T)) @ d.T)
    assert moe_layer_fits(routed)
    got = torch.zeros(tokens, hidden)
    moe_layer(x, routed, got)
    # bf16 and float8 weights times float32 activations: float rounding only
    assert rel(got, want) < (KERNEL_TOLERANCE if set(kinds) & {"int8", "int4"} else 1e-5)


def test_moe_layer_refuses_what_it_cannot_take():
    a = quantized(torch.randn(64, 128), "int8", 64)
    b = quantized(torch.randn(128, 64), "int8", 32)          # another group size
    assert not moe_layer_fits([RoutedExpert(a, a, b, [0], [1.0])])
    assert not moe_layer_fits([RoutedExpert(a, a, a, [0], [1.0])])   # down is not [H, I]
    assert not moe_layer_fits([])
    w, d = torch.randn(64, 128), torch.randn(128, 64)
    assert moe_layer_fits([RoutedExpert(w.bfloat16(), w.bfloat16(), d.bfloat16(), [0], [1.0])])
    assert not moe_layer_fits([RoutedExpert(w, w, d, [0], [1.0])])                        # float32
    assert not moe_layer_fits([RoutedExpert(w.half(), w.half(), d.half(), [0], [1.0])])   # fp16
    assert not moe_layer_fits([RoutedExpert(w.bfloat16(), w.bfloat16(), d.bfloat16().t().contiguous().t(), [0],
                                            [1.0])])                                      # not contiguous
    assert not moe_layer_fits([RoutedExpert(w.bfloat16(), a, d.bfloat16(), [0], [1.0])])   # one type an expert


@pytest.fixture(scope="module")
def int_stores(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("int-stores")
    # group 16: the tiny configs' expert widths (48) are no multiple of the default 64, and only
    # groups that lie inside a row are held quantized
    return {(f, q): moestream.convert(checkpoints[f], root / f"{f}-{q}", quant=q, group_size=16, progress=False)
            for f in FAMILIES for q in ("int8", "int4")}


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_compute_logits_match_the_dequantized_path(int_stores, family, quant):
    store = int_stores[(family, quant)]
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 12))
    logits = {}
    for mode in ("dequantized", "quantized"):
        # the dense layers stay in bf16 here: this compares the experts' kernels alone
        model = load_model(store, device_budget="64MiB", host_budget=0, expert_compute=mode, dense_quant=None)
        try:
            with torch.no_grad():
                logits[mode] = model(ids)
            if mode == "quantized":
                assert all(model.store.holds_quantized(r) for r in model.store.index.extents.values())
                st = model.store.stats()
        finally:
            model.store.close()
    ref, got = logits["dequantized"], logits["quantized"]
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    print(f"{family} {quant}: max |logit diff| / max |logit| = {err:.4f}")
    assert err < LOGIT_TOLERANCE
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    assert st["bytes_decoded"] > 0


@pytest.mark.parametrize("quant,ratio", [("int8", 1.4), ("int4", 2.0)])
def test_tiers_hold_the_stored_form_and_count_its_bytes(int_stores, quant, ratio):
    """At one budget the quantized L1 holds a slot per stored extent (4096-padded: it is read
    straight into the slot), ratio-times the experts of the decoded one at these tiny shapes
    (10 KiB experts: the padding weighs; bench decode counts the real shapes); the results are
    QuantizedTensor views of the slot, and the budget is never exceeded."""
    store = int_stores[("qwen3_moe", quant)]
    counts = {}
    budget = 2 << 20
    for keep in (False, True):
        with moestream.open(store, device_budget=budget, host_budget=0, keep_quantized=keep) as s:
            counts[keep] = s.expert_slots
            if keep:
                assert s.expert_slots == budget // align_up(max(r.padded_length for r in s.index.extents.values()))
            for layer in s.layers:
                for f in s.fetch(layer, range(s.experts_per_layer)):
                    w = f.result()
                    assert all(isinstance(t, QuantizedTensor) == keep for t in w.values())
                    del w
            st = s.stats()
            assert st["l1_peak"] <= s.l1.budget
    assert counts[True] >= ratio * counts[False], counts


def test_cuda_style_device_falls_back_to_dequantize_per_use():
    """Off the CPU kernels' reach (here: a non-contiguous view), quant_linear dequantizes and
    multiplies, with the reference's exact result."""
    w = quantized(torch.randn(32, 128) * 0.1, "int4")
    odd = QuantizedTensor(w.spec, w.shape, w.codes.t().contiguous().t(), w.scales, w.mins)
    x = torch.randn(2, 128)
    want = F.linear(x, w.dequantize(dequantize, torch.float32))
    assert torch.allclose(quant_linear(x, odd), want)


def test_load_model_refuses_an_unknown_expert_compute(int_stores):
    with pytest.raises(moestream.UsageError, match="expert_compute='fast'"):
        load_model(int_stores[("mixtral", "int8")], expert_compute="fast")


def test_delta_int_extents_are_held_decoded():
    from moestream.formats.index import Region, TensorSlice
    t = (TensorSlice("w1", "bf16", (64, 64), 0, 64 * 64 + 128),)
    plain = Region(0, 0, 10, 10, "0" * 16, ("int8:64",), t)
    delta = Region(0, 0, 10, 10, "0" * 16, ("int8:64", "delta"), t)
    ragged = Region(0, 0, 10, 10, "0" * 16, ("int8:64",), (TensorSlice("w1", "bf16", (64, 96), 0, 1),))
    assert holds_quantized(plain) and not holds_quantized(delta) and not holds_quantized(ragged)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_dense_layers_of_an_int_store_are_held_quantized_except_the_routers(checkpoints, tmp_path, quant):
    """load_model's dense_quant="auto": attention projections and lm_head become QuantLinear of the
    experts' type, the routers stay float (routing must not move), and the logits stay near those
    of the bf16 dense layers."""
    from moestream.compute.quant_kernels import QuantLinear
    store = moestream.convert(checkpoints["qwen3_moe"], tmp_path / quant, quant=quant, progress=False)
    torch.manual_seed(4)
    ids = torch.randint(0, 256, (2, 12))
    logits = {}
    for dense in (None, "auto"):
        model = load_model(store, device_budget="64MiB", dense_quant=dense)
        try:
            linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))}
            with torch.no_grad():
                logits[dense] = model(ids)
        finally:
            model.store.close()
        quantized_names = {n for n, t in linears.items() if t is QuantLinear}
        if dense is None:
            assert not quantized_names
        else:
            assert "lm_head" in quantized_names and "layers.0.self_attn.q_proj" in quantized_names
            assert all(n.endswith(".gate") for n in set(linears) - quantized_names), set(linears) - quantized_names
            assert model.lm_head.weight.spec.kind == "int8"    # the default for int8 and int4 stores
    err = ((logits["auto"] - logits[None]).abs().max() / logits[None].abs().max()).item()
    assert 0 < err < 0.05, err


def test_dense_quant_is_checked_and_off_for_lossless_stores(int_stores, checkpoints, tmp_path):
    from moestream.compute.quant_kernels import QuantLinear
    with pytest.raises(moestream.UsageError, match="dense_quant='int3'"):
        load_model(int_stores[("mixtral", "int8")], dense_quant="int3")
    lossless = moestream.convert(checkpoints["mixtral"], tmp_path / "s", progress=False)
    model = load_model(lossless)
    try:
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
    finally:
        model.store.close()


def test_the_kernels_take_inputs_that_require_grad():
    """A model called outside torch.no_grad(): its activations require grad (the norms' weights are
    parameters); the kernels compute on the values (inference only)."""
    x = torch.randn(2, 128, requires_grad=True) * 1.0
    w = quantized(torch.randn(64, 128) * 0.02, "int8")
    assert quant_linear(x, w).shape == (2, 64)
    out = torch.zeros(2, 128)
    mats = [quantized(torch.randn(*s) * 0.05, "int4") for s in ((64, 128), (64, 128), (128, 64))]
    moe_layer(x, [RoutedExpert(*mats, [0, 1], [0.5, 0.5])], out)
    assert out.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_stores_take_the_layer_kernel_and_match_transformers(checkpoints, tmp_path, family, monkeypatch):
    """A lossless bf16 store's experts go through the same one-call layer kernel (bf16 weights,
    float32 activations); logits against transformers computing the same bf16 weights in fp32."""
    from transformers import AutoModelForCausalLM
    from moestream.compute.models import common
    store = moestream.convert(checkpoints[family], tmp_path / "bf16", quant="bf16", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.bfloat16).float().eval()
    calls = []
    real, real_at = common.moe_layer, common.moe_layer_at
    monkeypatch.setattr(common, "moe_layer", lambda x, routed, out: (calls.append(len(routed)), real(x, routed, out)))
    # experts the store's slots hold at decode are read there (no tensors made): the same kernel
    monkeypatch.setattr(common, "moe_layer_at", lambda x, held, *a: (calls.append(len(held)), real_at(x, held, *a)))
    from moestream.compute import quant_kernels
    dense_calls = []
    real_linear = quant_kernels._kernel_linear      # the dense layers' kernel call
    monkeypatch.setattr(quant_kernels, "_kernel_linear", lambda x, *w: (dense_calls.append(tuple(x.shape)),
                                                                        real_linear(x, *w))[1])
    model = load_model(store, device_budget="64MiB", host_budget=0)
    try:
        kernel_linears = {n for n, m in model.named_modules() if isinstance(m, quant_kernels.Bf16DecodeLinear)}
        torch.manual_seed(4)
        ids = torch.randint(0, ref.config.vocab_size, (2, 12))
        with torch.no_grad():
            want, got = ref(ids).logits, model(ids)
            assert not dense_calls                      # 24 token rows: torch's GEMM
            # one and two token rows (decode): the dense layers through the bf16 kernel too
            steps = [(ref(ids[:1, :t]).logits, model(ids[:1, :t])) for t in (1, 2)]
    finally:
        model.store.close()
    assert calls and sum(calls) >= len(calls)           # every layer's experts through the kernel
    routers = {n for n, m in model.named_modules() if n.endswith(".gate") and isinstance(m, torch.nn.Linear)}
    # the routers too, their weights bf16 as the checkpoint's (float32 accumulation either way)
    assert kernel_linears and "lm_head" in kernel_linears and routers and routers <= kernel_linears
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in routers)
    # q, k and v of every attention go through its fused qkv_proj: one call for the three
    fused = {n for n in kernel_linears if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
             and model.get_submodule(n.rsplit(".", 1)[0]).qkv_proj is not None}
    assert fused and {n.rsplit(".", 1)[0] + ".qkv_proj" for n in fused} <= kernel_linears
    assert len(dense_calls) >= 2 * len(kernel_linears - fused)
    for want_t, got_t in [(want, got), *steps]:
        err = (got_t - want_t).abs().max().item() / want_t.abs().max().item()
        print(f"{family} bf16, {want_t.shape[1]} tokens: max |logit diff| / max |logit| = {err:.4f}")
        assert err < LOGIT_TOLERANCE
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


def test_kernels_take_few_token_rows_and_leave_batches_to_torchs_gemm(monkeypatch):
    """Below its type's gemm_rows the kernel multiplies (a dot per row and token); from there on
    torch's GEMM on the dequantized weights does, with the same result."""
    from moestream.compute import quant_kernels
    from moestream.compute.quant_kernels import kernel_takes
    torch.manual_seed(5)
    calls = []
    real = quant_kernels._linear
    monkeypatch.setattr(quant_kernels, "_linear", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    for kind in ("int8", "int4", "bf16"):
        w = _weights(torch.randn(64, 128) * 0.05, kind)
        limit = QUANT_KERNELS[kind].gemm_rows
        assert kernel_takes(w, 1) and kernel_takes(w, limit - 1) and not kernel_takes(w, limit)
        for rows in (limit - 1, limit):
            calls.clear()
            x = torch.randn(rows, 128)
            got = quant_linear(x, w)
            assert calls == ([rows] if rows < limit else [])
            assert rel(got, x @ _as_float(w).T) < (1e-5 if rows >= limit or kind == "bf16" else
                                                   INT8_TOLERANCE if kind == "int8" else KERNEL_TOLERANCE)


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16", "float32-bias"])
def test_fused_rows_compute_what_the_parts_do_and_share_their_weights(kind):
    """fuse_rows stacks q, k and v: its output is the three outputs side by side (the same
    kernel per row, so equal to the last bit at decode), the parts become views of its weight
    (no second copy) and still compute what they did."""
    from moestream.compute.quant_kernels import Bf16DecodeLinear, QuantLinear, fuse_rows
    torch.manual_seed(6)
    sizes = (128, 64, 64)
    parts = []
    for rows in sizes:
        lin = torch.nn.Linear(128, rows, bias=kind == "float32-bias")
        if kind in ("int8", "int4"):
            parts.append(QuantLinear(quantize_matrix(lin.weight.detach() * 0.05, kind, 64), None))
        elif kind == "bf16":
            lin = lin.to(torch.bfloat16)
            lin.__class__ = Bf16DecodeLinear
            parts.append(lin)
        else:
            parts.append(lin)
    dtype = torch.float32 if kind == "float32-bias" else torch.bfloat16
    xs = [torch.randn(rows, 128, dtype=dtype) for rows in (1, 2, 40)]
    with torch.no_grad():
        before = [[m(x) for m in parts] for x in xs]
        fused = fuse_rows(parts)
        assert fused is not None and fused.out_features == sum(sizes)
        for x, want in zip(xs, before):
            got = fused(x).split(list(sizes), dim=-1)
            for g, w in zip(got, want):
                assert torch.equal(g, w) if x.shape[0] <= 2 else rel(g.float(), w.float()) < 1e-5
            for m, w in zip(parts, want):
                assert torch.equal(m(x), w)
    plane = (lambda m: m.codes) if kind in ("int8", "int4") else (lambda m: m.weight)
    base, end = plane(fused).data_ptr(), plane(fused).data_ptr() + plane(fused).nbytes
    assert all(base <= plane(m).data_ptr() < end for m in parts)


def test_fuse_rows_refuses_parts_that_differ():
    from moestream.compute.quant_kernels import QuantLinear, fuse_rows
    w = torch.randn(64, 128) * 0.05
    assert fuse_rows([QuantLinear(quantize_matrix(w, "int8"), None), QuantLinear(quantize_matrix(w, "int4"), None)]) is None
    assert fuse_rows([torch.nn.Linear(128, 64), torch.nn.Linear(128, 64, bias=False)]) is None
    assert fuse_rows([torch.nn.Linear(128, 64), torch.nn.Linear(64, 64)]) is None
    assert fuse_rows([torch.nn.Linear(128, 64), torch.nn.Linear(128, 64).to(torch.bfloat16)]) is None
    assert fuse_rows([torch.nn.Linear(128, 64), QuantLinear(quantize_matrix(w, "int8"), None)]) is None


def test_kernels_cached_before_their_sources_changed_are_dropped(monkeypatch):
    """Numba's disk cache keys a kernel by its own file: a changed row_dots.py (the intrinsics the
    kernels inline), or another file one calls into, must drop their cached code, and unchanged
    ones must not. Every module of cached kernels that call across files is covered."""
    from pathlib import Path
    from moestream.compute import decode_layer, decode_ops
    from moestream.compute import quant_kernels as qk
    for kernels in ((qk._moe_layer, qk._linear), (decode_ops._rms_norm_bf16, decode_ops._rotary_bf16,
                                                   decode_ops._attend_one_bf16),
                    (decode_layer._attention_in, decode_layer._attention_out, decode_layer._attention_block)):
        module = kernels[0].py_func.__module__.rsplit(".", 1)[-1]
        marker = Path(kernels[0]._cache._cache_path) / f"{module}.sources.sha256"
        flushed = []
        for k in kernels:
            monkeypatch.setattr(k._cache, "flush", lambda k=k: flushed.append(k))
        qk.flush_cached_kernels_on_source_change(kernels)
        assert flushed == [] and marker.exists()             # the hash recorded at import matches
        current = marker.read_text()
        marker.write_text("0" * 64)                          # as if cached under other sources
        qk.flush_cached_kernels_on_source_change(kernels)
        assert flushed == list(kernels) and marker.read_text() == current


def test_a_held_kernel_plan_follows_its_weight():
    """Bf16DecodeLinear and QuantLinear work out their kernel call once; a weight whose memory
    changes (new data, rebind_rows, to()) is planned again, never multiplied from the old address."""
    from moestream.compute.quant_kernels import QuantLinear, bf16_decode_linears
    from moestream.formats.quantized import quantize_matrix
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 128, generator=g).bfloat16()
    lin = torch.nn.Linear(128, 64, bias=False).bfloat16()
    assert bf16_decode_linears(torch.nn.ModuleList([lin]), lambda name: False) == 1
    with torch.no_grad():
        first = lin(x)
        lin.weight.data = torch.randn(64, 128, generator=g).bfloat16()
        assert torch.allclose(lin(x).float(), F.linear(x.float(), lin.weight.float()), rtol=1e-2, atol=1e-2)
        assert not torch.equal(lin(x), first)
        w1, w2 = (quantize_matrix(torch.randn(64, 128, generator=g), "int8", 32) for _ in range(2))
        q = QuantLinear(w1, None)
        assert torch.equal(q(x), quant_linear(x, w1))
        q.rebind_rows(w2.codes, w2.scales, w2.mins)
        assert torch.equal(q(x), quant_linear(x, w2))
        q.codes = w1.codes.clone()            # new memory for the codes (as to() or a load gives)
        q.scales = w1.scales.clone()
        assert torch.equal(q(x), quant_linear(x, w1))

        lin2 = torch.nn.Linear(64, 64, bias=False).bfloat16()
        bf16_decode_linears(torch.nn.ModuleList([lin2]), lambda name: False)
        y = torch.randn(1, 64, generator=g).bfloat16()
        lin2(y)
        lin2.weight.data = lin2.weight.data.t()     # the same memory read the other way round
        assert torch.allclose(lin2(y).float(), F.linear(y.float(), lin2.weight.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_a_batched_decode_step_projects_every_sequence_in_one_kernel_call(checkpoints, tmp_path, monkeypatch, quant):
    """decode_batch over sequences of different lengths (the server's step): the attention
    projections of an int store take all B rows in one kernel call per layer (one read of their
    weights), and each sequence's logits are those of the same step decoded alone, bit for bit
    (B = 2: every matmul of the step in the kernels, which take each row as they take one)."""
    from moestream.compute import quant_kernels
    store = moestream.convert(checkpoints["qwen3_moe"], tmp_path / quant, quant=quant, progress=False)
    model = load_model(store, host_budget=0)
    try:
        g = torch.Generator().manual_seed(6)
        prompts = [torch.randint(0, model.cfg.vocab_size, (1, n), generator=g) for n in (5, 9)]

        def prefilled():
            caches = [model.new_cache(24) for _ in prompts]
            with torch.no_grad():
                for ids, cache in zip(prompts, caches):
                    model(ids, cache, 0)
            return caches
        tokens, positions = [7, 11], [p.shape[1] for p in prompts]
        alone = [model.decode_batch([t], [c], [p]) for t, c, p in zip(tokens, prefilled(), positions)]
        caches, rows = prefilled(), []
        real = quant_kernels._kernel_linear
        monkeypatch.setattr(quant_kernels, "_kernel_linear", lambda x, *a: (rows.append(x.numel() // x.shape[-1]),
                                                                            real(x, *a))[1])
        together = model.decode_batch(tokens, caches, positions)
    finally:
        model.store.close()
    assert torch.equal(together, torch.cat(alone))
    # per layer q/k/v (fused), o and the router each once over both rows; lm_head once
    assert rows == [2] * (3 * model.cfg.num_layers + 1)


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_resident_experts_are_read_in_their_slots_with_the_hand_outs_values(checkpoints, tmp_path, monkeypatch,
                                                                             quant):
    """At decode the L1 hits are read where the store's slots hold them (Store.hold_hits, no
    tensors made): the layer's output is bit for bit the one through the hand-outs' tensors, and
    no slot stays pinned afterwards, also when the kernel fails."""
    from moestream.compute import quant_kernels
    from moestream.compute.models.common import StreamingMoE, routed_experts_output
    from moestream.storage.store import Store
    store = moestream.convert(checkpoints["qwen3_moe"], tmp_path / quant, quant=quant, group_size=16, progress=False)
    model = load_model(store, host_budget=0)
    s = model.store
    try:
        mlp = next(m for m in model.modules() if isinstance(m, StreamingMoE))
        x = torch.randn(2, model.cfg.hidden_size, generator=torch.Generator().manual_seed(8)).to(   # < bf16 gemm_rows
            model.embed_tokens.weight.dtype)
        weights, experts = mlp.route(x)
        layer, names = mlp.layer, model.cfg.expert_names
        routed_experts_output(s, layer, names, x, weights, experts)          # the experts land in L1
        calls = []
        real_at = quant_kernels.moe_layer_at
        monkeypatch.setattr("moestream.compute.models.common.moe_layer_at",
                            lambda *a: calls.append(len(a[1])) or real_at(*a))
        at_slots, _ = routed_experts_output(s, layer, names, x, weights, experts)
        assert calls and sum(calls) == len(set(experts.flatten().tolist()))
        with monkeypatch.context() as m:
            m.setattr(Store, "holds_by_address", property(lambda self: False))
            through_views, _ = routed_experts_output(s, layer, names, x, weights, experts)
        assert torch.equal(at_slots, through_views)
        assert not any(s.arena.pinned(i) for i in range(s.arena.count))

        def fails(*a):
            raise RuntimeError("kernel failed")
        monkeypatch.setattr(quant_kernels, "_moe_layer", fails)
        with pytest.raises(RuntimeError, match="kernel failed"):
            routed_experts_output(s, layer, names, x, weights, experts)
        assert not any(s.arena.pinned(i) for i in range(s.arena.count))
    finally:
        s.close()
