"""The fused decode-step kernels (compute/decode_ops.py) against transformers' own Qwen3-MoE
RMSNorm and rotary formulas in bf16 (bit for bit, but where torch's float32 sum of squares is off
by its last bit: a value one or two bf16 steps away), and the cases they must hand back to torch."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, apply_rotary_pos_emb

from moestream.compute import decode_ops
from moestream.compute.models.common import RMSNorm, apply_rotary


def _hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = Qwen3MoeRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _hf_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers rotates q and k together; cos/sin [B, T, D] unsqueezed over the heads
    out, _ = apply_rotary_pos_emb(x, x, cos[None], sin[None], unsqueeze_dim=1)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in bf16 steps (both finite, same signs)."""
    assert a.shape == b.shape and torch.equal(a.signbit(), b.signbit())
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


def _rope(t: int, dim: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(start, start + t, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().bfloat16(), emb.sin().bfloat16()


@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 3, 2048), (1, 1, 32, 128), (2, 1, 4, 128), (5, 96)])
def test_rms_norm_is_bit_identical_to_transformers(shape):
    """Hidden-state rows and the per-head q/k norm of Qwen3 ([B, T, heads, D]), values over a
    wide range so the float32 sum and the bf16 rounding both matter."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)).bfloat16()
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).bfloat16()
    fused = decode_ops.rms_norm(x, w, 1e-6)
    assert fused is not None
    assert _same_bits(fused, _hf_norm(x, w, 1e-6))


@given(rows=st.integers(1, decode_ops.MAX_FUSED_ROWS), width=st.integers(1, 300),
       scale=st.floats(-30, 30), eps=st.sampled_from([1e-6, 1e-5, 1e-3]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_rms_norm_matches_transformers_on_any_rows(rows, width, scale, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * math.exp(scale * 0.5)).bfloat16()
    w = torch.randn(width, generator=g).bfloat16()
    fused = decode_ops.rms_norm(x, w, eps)
    assert fused is not None
    # torch sums the float32 squares lane by lane and we sum them in float64: in the rare row where
    # torch's sum is one float32 step off, a value x * rsqrt can round to the neighbouring bf16,
    # and its product with the weight, rounded again, then lies one or two bf16 steps away
    # (hypothesis found 1 value of 27030 two steps off: 106 rows of 255 at scale e^11)
    ref = _hf_norm(x, w, eps)
    assert _bf16_steps(fused, ref) <= 2
    assert (fused != ref).float().mean().item() <= 0.01


def test_rms_norm_carries_nan_and_inf_as_torch_does():
    x = torch.randn(4, 64).bfloat16()
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, :] = 0                                              # an all-zero row: rsqrt(eps), no NaN
    w = torch.randn(64).bfloat16()
    fused, ref = decode_ops.rms_norm(x, w, 1e-6), _hf_norm(x, w, 1e-6)
    assert torch.equal(fused.isnan(), ref.isnan())
    assert torch.equal(fused.isinf(), ref.isinf())
    keep = ~ref.isnan()
    assert torch.equal(fused[keep], ref[keep])
    assert fused[2].eq(0).all()


@pytest.mark.parametrize("b,heads,t,dim", [(1, 32, 1, 128), (1, 4, 1, 128), (2, 4, 3, 64), (1, 2, 5, 16)])
def test_rotary_is_bit_identical_to_transformers(b, heads, t, dim):
    g = torch.Generator().manual_seed(heads * t + dim)
    x = (torch.randn(b, heads, t, dim, generator=g) * 4).bfloat16()
    cos, sin = _rope(t, dim, start=1000)
    fused = decode_ops.rotary(x, cos, sin)
    assert fused is not None
    assert _same_bits(fused, _hf_rotary(x, cos, sin))


@given(heads=st.integers(1, 16), t=st.integers(1, 8), half=st.integers(1, 64), start=st.integers(0, 40000),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_rotary_matches_transformers_at_any_position(heads, t, half, start, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, heads, t, 2 * half, generator=g).bfloat16()
    cos, sin = _rope(t, 2 * half, start)
    fused = decode_ops.rotary(x, cos, sin)
    if heads * t > decode_ops.MAX_FUSED_ROWS:
        assert fused is None
        return
    assert _same_bits(fused, _hf_rotary(x, cos, sin))


def test_the_decode_layout_of_attention_takes_the_fused_rotary():
    """Attention rotates q.view(B, T, heads, D).transpose(1, 2): at T = 1 that view is contiguous
    (the fused kernel takes it), at T > 1 it is not (torch's ops take it) — both as transformers."""
    for t, fused_expected in ((1, True), (3, False)):
        q = torch.randn(1, t, 8 * 64).bfloat16().view(1, t, 8, 64).transpose(1, 2)
        cos, sin = _rope(t, 64, start=7)
        assert (decode_ops.rotary(q, cos, sin) is not None) == fused_expected
        assert _same_bits(apply_rotary(q, cos, sin), _hf_rotary(q, cos, sin))


def test_what_the_kernels_leave_to_torch():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(64).bfloat16()
    assert decode_ops.rms_norm(x.float(), w.float(), 1e-6) is None                 # not bf16
    assert decode_ops.rms_norm(x, w.float(), 1e-6) is None                         # mixed dtypes
    assert decode_ops.rms_norm(torch.randn(64, 2).bfloat16().t(), w, 1e-6) is None     # not contiguous
    assert decode_ops.rms_norm(torch.randn(decode_ops.MAX_FUSED_ROWS + 1, 64).bfloat16(), w, 1e-6) is None
    assert decode_ops.rms_norm(x, torch.randn(32).bfloat16(), 1e-6) is None        # weight of another width
    assert decode_ops.rms_norm(x[:, :0], w[:0], 1e-6) is None                      # nothing to do
    grad_w = w.clone().requires_grad_(True)
    assert decode_ops.rms_norm(x, grad_w, 1e-6) is None                            # autograd records it
    with torch.no_grad():
        assert decode_ops.rms_norm(x, grad_w, 1e-6) is not None
    cos, sin = _rope(1, 64)
    q = torch.randn(1, 4, 1, 64).bfloat16()
    assert decode_ops.rotary(q.float(), cos.float(), sin.float()) is None
    assert decode_ops.rotary(q[0], cos, sin) is None                               # not [B, heads, T, D]
    assert decode_ops.rotary(q, *_rope(2, 64)) is None                             # cos/sin of other positions
    assert decode_ops.rotary(torch.randn(1, 4, 1, 63).bfloat16(), *_rope(1, 62)) is None


def test_the_model_norm_keeps_its_gradient():
    """With autograd on, RMSNorm runs torch's ops, so training through it still works."""
    norm = RMSNorm(16, 1e-6).bfloat16()
    x = torch.randn(2, 16).bfloat16().requires_grad_(True)
    norm(x).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        assert _same_bits(norm(x.detach()), _hf_norm(x.detach(), norm.weight.detach(), 1e-6))


def _torch_chain(q, k, v, norms, cos, sin, cache_k, cache_v, pos):
    """Attention.forward's torch ops for one decode token (what attend_one replaces), writing the
    cache as KVCache.update does; returns the output [1, 1, heads*D] and the query heads it attended."""
    kv, dim = cache_k.shape[1], cache_k.shape[3]
    qh, kh = q.view(1, 1, -1, dim), k.view(1, 1, kv, dim)
    if norms[0] is not None:
        qh, kh = _hf_norm(qh, norms[0], 1e-6), _hf_norm(kh, norms[1], 1e-6)
    qh, kh, vh = qh.transpose(1, 2), kh.transpose(1, 2), v.view(1, 1, kv, dim).transpose(1, 2)
    qh, kh = _hf_rotary(qh, cos, sin), _hf_rotary(kh, cos, sin)
    cache_k[:, :, pos:pos + 1], cache_v[:, :, pos:pos + 1] = kh, vh
    out = torch.nn.functional.scaled_dot_product_attention(qh.reshape(1, kv, -1, dim), cache_k[:, :, :pos + 1],
                                                           cache_v[:, :, :pos + 1])
    return out.reshape(1, 1, -1), qh


def _attention_f64(qh, cache_k, cache_v, pos):
    kv, dim = cache_k.shape[1], cache_k.shape[3]
    q = qh.double().reshape(kv, -1, dim)
    k, v = cache_k[0, :, :pos + 1].double(), cache_v[0, :, :pos + 1].double()
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1)
    return (p @ v).reshape(1, 1, -1)


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 4, 128), (4, 4, 64), (6, 2, 32)])
@pytest.mark.parametrize("pos", [0, 1, 13, decode_ops.MAX_ATTENDED_POSITIONS - 1, decode_ops.MAX_ATTENDED_POSITIONS, 150])
@pytest.mark.parametrize("head_norm", [True, False])
def test_attend_one_writes_the_cache_and_attends_as_the_torch_chain(heads, kv_heads, dim, pos, head_norm):
    """The cache rows attend_one writes are transformers' normed, rotated key and the value, bit
    for bit where our RMSNorm is (the norm of the key may sit a bf16 step or two from torch's: see
    the module docstring); the output is within a bf16 step of float64 attention over the same
    query and cache wherever torch's SDPA is, nearly every value equal to torch's SDPA (computed
    as its flash kernel computes bf16), and is torch's own SDPA beyond MAX_ATTENDED_POSITIONS."""
    g = torch.Generator().manual_seed(pos * 7 + heads + dim + head_norm)
    max_len = 160
    cache_k = torch.randn(1, kv_heads, max_len, dim, generator=g).bfloat16()
    cache_v = torch.randn(1, kv_heads, max_len, dim, generator=g).bfloat16()
    qkv = (torch.randn(1, 1, (heads + 2 * kv_heads) * dim, generator=g) * 3).bfloat16()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    norms = ((torch.randn(dim, generator=g) * 0.3 + 1).bfloat16(),
             (torch.randn(dim, generator=g) * 0.3 + 1).bfloat16()) if head_norm else (None, None)
    cos, sin = _rope(1, dim, start=pos)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    want, qh = _torch_chain(q, k, v, norms, cos, sin, ref_k, ref_v, pos)
    got = decode_ops.attend_one(q, k, v, *norms, 1e-6, cos, sin, cache_k, cache_v, pos)
    assert got is not None and got.shape == (1, 1, heads * dim) and got.dtype == torch.bfloat16
    assert torch.equal(cache_v, ref_v)
    if head_norm:
        # the key row through our own norm, then transformers' rotary, is what the cache holds
        kh = _hf_rotary(decode_ops.rms_norm(k.view(1, 1, kv_heads, dim), norms[1], 1e-6).transpose(1, 2), cos, sin)
        assert torch.equal(cache_k[:, :, pos:pos + 1], kh)
        assert _bf16_steps(cache_k, ref_k) <= 2
    else:
        assert torch.equal(cache_k, ref_k)
    if pos >= decode_ops.MAX_ATTENDED_POSITIONS and not head_norm:
        assert torch.equal(got, want)      # torch's SDPA over the very same inputs
    elif not head_norm:
        # the same inputs, computed as torch's flash kernel computes them: nearly every value equal
        # (0.97-1.0 on AVX-512 hosts; 0.94 on an AVX2 one, where torch's vectorized exp works on 8
        # lanes and rounds a few values the other way: the float64 bound below is the real check)
        assert (got == want).float().mean().item() >= 0.9
    exact = _attention_f64(qh, cache_k, cache_v, pos)
    step = 2.0 ** -7 * exact.abs().max().item()    # one bf16 step at the output's largest value
    err, torch_err = (got.double() - exact).abs().max().item(), (want.double() - exact).abs().max().item()
    assert err <= max(torch_err, step) + step / 2, (err, torch_err, step)


@pytest.mark.parametrize("case", ["float32", "batch", "past the cache", "grouping", "autograd"])
def test_attend_one_hands_back_what_it_does_not_take_and_writes_nothing(case):
    heads, kv_heads, dim, max_len = 8, 2, 16, 8
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    cache_k = torch.zeros(2 if case == "batch" else 1, kv_heads, max_len, dim, dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    q = torch.ones(1, 1, (heads - 1 if case == "grouping" else heads) * dim, dtype=dtype)
    k = v = torch.ones(1, 1, kv_heads * dim, dtype=dtype)
    cos, sin = torch.ones(1, dim, dtype=dtype), torch.zeros(1, dim, dtype=dtype)
    norm = torch.ones(dim, dtype=dtype, requires_grad=case == "autograd")
    pos = max_len if case == "past the cache" else 3
    with torch.enable_grad():
        assert decode_ops.attend_one(q, k, v, norm, norm, 1e-6, cos, sin, cache_k, cache_v, pos) is None
    assert not cache_k.any() and not cache_v.any()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_bf16_decode_through_attend_one_matches_the_torch_ops(tmp_path, monkeypatch, family):
    """A bf16 model decoding 24 positions (both of attend_one's branches: its own attention, then
    torch's) gives the logits of the same decode through the torch ops, and attend_one did take
    every decode step."""
    import moestream
    from moestream.compute import load_model
    from moestream.demo import build_checkpoint
    ckpt = build_checkpoint(family, tmp_path / "ckpt", seed=3, dtype="bfloat16", with_tokenizer=False)
    model = load_model(moestream.convert(ckpt, tmp_path / "store", progress=False), host_budget=0)
    monkeypatch.setattr(decode_ops, "MAX_ATTENDED_POSITIONS", 12)
    # the layers' fused decode call (compute/decode_layer.py, tested on its own) would take every step
    from moestream.compute.models.common import DecoderLayer
    monkeypatch.setattr(DecoderLayer, "attention_half", lambda *a: None)
    calls = []
    fused = decode_ops.attend_one
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))

    def decode(use_fused: bool) -> torch.Tensor:
        monkeypatch.setattr(decode_ops, "attend_one", (lambda *a: calls.append(a[-1]) or fused(*a)) if use_fused
                            else (lambda *a: None))
        cache = model.new_cache(32)
        with torch.no_grad():
            out = [model(ids[:, :4], cache, 0)[:, -1]]
            out += [model(ids[:, p:p + 1], cache, p)[:, -1] for p in range(4, 24)]
        return torch.stack(out)

    try:
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        want, got = decode(False), decode(True)
    finally:
        model.store.close()
    assert sorted(set(calls)) == list(range(4, 24)) and len(calls) == 20 * model.cfg.num_layers
    scale = want.abs().max().item()
    # bit-identical on the AVX-512 development machines (the kernel computes as torch's flash kernel
    # does); allowed: a rounding of an exp that torch's vectorized exp and the kernel's take
    # differently, carried to the logits as one bf16 step at the largest (seen on an AVX2 host)
    assert (got - want).abs().max().item() <= 2.0 ** -7 * scale
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
