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
