"""Property tests of the codecs."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moestream.formats.codecs import (EncodeOptions, bits_to_float32, encode_region, float32_to_bits, materialize,
                                      quantize, dequantize_np, shuffle, unpack_payload, unshuffle)
from moestream.formats.index import Region

shapes = st.tuples(st.integers(1, 17), st.integers(1, 33))


@given(st.binary(min_size=0, max_size=512), st.sampled_from([2, 4]))
def test_shuffle_inverse(data, itemsize):
    data = data[: len(data) // itemsize * itemsize]
    a = np.frombuffer(data, np.uint8)
    assert unshuffle(shuffle(a, itemsize), itemsize).tobytes() == data


@given(st.binary(min_size=0, max_size=512), st.sampled_from([2, 4, 8]))
def test_shuffle_is_the_byte_plane_transpose(data, itemsize):
    data = data[: len(data) // itemsize * itemsize]
    a = np.frombuffer(data, np.uint8)
    want = a.reshape(-1, itemsize).T.reshape(-1)   # plane i = byte i of every element
    assert np.array_equal(shuffle(a, itemsize), want)
    out = np.full(a.size, 7, np.uint8)
    assert unshuffle(want, itemsize, out=out) is out and out.tobytes() == data


def test_materialize_alias_returns_views_of_the_payload():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    enc = encode_region([("w", "fp32", (3, 4), float32_to_bits(x.reshape(-1), "fp32"))],
                        EncodeOptions(zstd_level=None, delta=False))
    region = Region(0, 4096, len(enc.stored), enc.raw_length, "0" * 16, enc.chain, enc.tensors)
    payload = torch.frombuffer(bytearray(enc.stored), dtype=torch.uint8)
    viewed = materialize(region, payload, alias=True)["w"]
    copied = materialize(region, payload)["w"]
    assert torch.equal(viewed, torch.from_numpy(x)) and torch.equal(copied, viewed)
    assert viewed.data_ptr() == payload.data_ptr() and copied.data_ptr() != payload.data_ptr()


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32)))
def test_bf16_bits_match_torch(x):
    ours = float32_to_bits(x, "bf16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.array_equal(bits_to_float32(ours, "bf16"), torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy())


@settings(max_examples=200)
@given(hnp.arrays(np.float32, st.integers(1, 700), elements=st.floats(-100, 100, width=32)),
       st.sampled_from(["int8", "int4"]), st.sampled_from([2, 8, 32, 64, 128]))
def test_quantization_error_is_bounded_by_half_a_step(x, quant, g):
    buf = quantize(x, quant, g)
    y = dequantize_np(buf, x.size, quant, g)
    pad = (-x.size) % g
    xp = np.concatenate([x, np.repeat(x[-1:], pad)]).reshape(-1, g)
    if quant == "int8":
        step = np.abs(xp).max(1) / 127
    else:
        step = (xp.max(1) - xp.min(1)) / 15
    # half a step, plus fp16 rounding of the scale (2^-11 relative, or half the 2^-24 subnormal
    # spacing for tiny groups) times the code range (<= 127), plus fp16 rounding of the int4 minimum
    tol = step * 0.5 + np.abs(xp).max(1) * 2.0 ** -10 + 127 * 2.0 ** -25 + 1e-7
    err = np.abs(xp.reshape(-1)[: x.size] - y).reshape(-1)
    err = np.concatenate([err, np.zeros(pad)]).reshape(-1, g).max(1)
    assert (err <= tol).all()


def _roundtrip(tensors, opts, base=None, base_dtype=None):
    enc = encode_region(tensors, opts, base, base_dtype)
    region = Region(0, 4096, len(enc.stored), enc.raw_length, "0" * 16, enc.chain, enc.tensors)
    payload = unpack_payload(region, enc.stored)
    base_t = None
    if base is not None:
        from moestream.formats.codecs import TORCH_DTYPES
        base_t = {k: torch.from_numpy(v.astype(np.int32 if base_dtype == "fp32" else np.int16, copy=False)
                                      .view(np.int32 if base_dtype == "fp32" else np.int16))
                  .view(TORCH_DTYPES[base_dtype]) for k, v in base.items()}
    return enc, materialize(region, payload, base_t)


@settings(max_examples=100)
@given(st.data(), st.sampled_from(["bf16", "fp16", "fp32"]), st.booleans(), st.booleans())
def test_lossless_region_roundtrip_any_bits(data, dtype, zstd, delta):
    """Any bit patterns (NaNs, infs, denormals) survive shuffle/xor-delta/zstd exactly."""
    nbits = np.uint32 if dtype == "fp32" else np.uint16
    tensors, base = [], {}
    for name in ["a", "b"]:
        shape = data.draw(shapes)
        bits = data.draw(hnp.arrays(nbits, shape))
        tensors.append((name, dtype, shape, bits))
        base[name] = data.draw(hnp.arrays(nbits, shape))
    opts = EncodeOptions(quant=None, zstd_level=3 if zstd else None, delta=delta)
    enc, out = _roundtrip(tensors, opts, base if delta else None, dtype if delta else None)
    for name, _, shape, bits in tensors:
        got = out[name]
        assert tuple(got.shape) == shape
        width = torch.int32 if dtype == "fp32" else torch.int16
        assert np.array_equal(got.view(width).numpy().view(nbits), bits)


def _bf16_weights(rng, shape):
    return float32_to_bits(rng.normal(0, 0.02, shape).astype(np.float32), "bf16")


def test_zstd_and_shuffle_kept_only_where_they_pay():
    rng = np.random.default_rng(0)
    noise = [("n", "fp32", (64, 64), rng.integers(0, 2**32, (64, 64), dtype=np.uint32))]
    enc = encode_region(noise, EncodeOptions(quant=None, zstd_level=3, delta=False, zstd_min_saving=0))
    assert enc.chain == () and len(enc.stored) == 64 * 64 * 4
    weights = [("w", "bf16", (1024, 256), _bf16_weights(rng, (1024, 256)))]
    enc = encode_region(weights, EncodeOptions(quant=None, zstd_level=3, delta=False, zstd_min_saving=0))
    assert enc.chain == ("shuffle", "zstd") and len(enc.stored) < 1024 * 256 * 2


def test_zstd_kept_only_when_it_saves_the_minimum_of_padded_bytes():
    rng = np.random.default_rng(0)
    weights = [("w", "bf16", (1024, 256), _bf16_weights(rng, (1024, 256)))]
    smallest = encode_region(weights, EncodeOptions(quant=None, zstd_level=3, delta=False, zstd_min_saving=0))
    saving = 1 - (-(-len(smallest.stored) // 4096) * 4096) / (1024 * 256 * 2)   # the file pads to 4 KiB
    assert 0.1 < saving < 0.5, saving           # what shuffle+zstd saves on bf16 weights
    for min_saving, chain in ((saving, ("shuffle", "zstd")), (saving + 0.01, ()), (0.5, ())):
        enc = encode_region(weights, EncodeOptions(quant=None, zstd_level=3, delta=False, zstd_min_saving=min_saving))
        assert enc.chain == chain, min_saving
    assert EncodeOptions().zstd_min_saving == 0.5
    # zstd that saves bytes but not a 4 KiB page is not kept even at 0: the page is read and
    # the frame decoded all the same
    fp32 = [("w", "fp32", (64, 64), float32_to_bits(rng.normal(0, 0.02, (64, 64)).astype(np.float32), "fp32"))]
    enc = encode_region(fp32, EncodeOptions(quant=None, zstd_level=3, delta=False, zstd_min_saving=0))
    assert enc.chain == () and len(enc.stored) == 64 * 64 * 4
    # a sparse expert (a delta, a pruned tensor) more than halves and keeps zstd at the default
    sparse = np.where(rng.random((128, 128)) < 0.05, rng.normal(0, 0.02, (128, 128)), 0).astype(np.float32)
    enc = encode_region([("s", "fp32", (128, 128), float32_to_bits(sparse, "fp32"))], EncodeOptions(delta=False))
    assert enc.chain[-1] == "zstd" and len(enc.stored) <= 128 * 128 * 4 / 2


def test_delta_kept_only_when_smaller_and_not_worse():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
    close = base + rng.normal(0, 1e-4, base.shape).astype(np.float32)
    far = rng.normal(0, 0.02, base.shape).astype(np.float32)
    opts = EncodeOptions(quant="int8", group_size=64, zstd_level=3, delta=True)
    b = {"w": float32_to_bits(base, "fp32")}
    enc_close = encode_region([("w", "fp32", (64, 64), float32_to_bits(close, "fp32"))], opts, b, "fp32")
    assert "delta" in enc_close.chain
    enc_far = encode_region([("w", "fp32", (64, 64), float32_to_bits(far, "fp32"))], opts, b, "fp32")
    assert "delta" not in enc_far.chain
    # an independent expert against the mean of four such experts: a 1/4 narrower delta, ~13 %
    # less error, not enough to give up holding it quantized (DELTA_MAX_ERROR_RATIO)
    experts = rng.normal(0, 0.02, (4, 64, 64)).astype(np.float32)
    mean = {"w": float32_to_bits(experts.mean(0), "fp32")}
    enc_mean = encode_region([("w", "fp32", (64, 64), float32_to_bits(experts[0], "fp32"))], opts, mean, "fp32")
    assert "delta" not in enc_mean.chain
    _, out = _roundtrip([("w", "fp32", (64, 64), float32_to_bits(close, "fp32"))], opts, b, "fp32")
    assert float((out["w"].float() - torch.from_numpy(close)).norm() / np.linalg.norm(close)) < 0.01


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(1, 3000), kind=st.sampled_from(["int8", "int4"]), group=st.sampled_from([2, 8, 64, 130]))
def test_quant_spec_describes_the_bytes_the_quantizer_writes(numel, kind, group):
    from moestream.formats.codecs import quantize, split_quantized
    from moestream.formats.constants import QuantSpec
    spec = QuantSpec(kind, group)
    assert QuantSpec.parse(spec.stage) == spec
    buf = quantize(np.linspace(-1, 1, numel, dtype=np.float32), kind, group)
    assert len(buf) == spec.payload_length(numel)
    codes, scales, mins = split_quantized(np.frombuffer(buf, np.uint8), numel, kind, group)
    assert len(scales) == 2 * spec.groups(numel) and (mins is None) == (kind == "int8")
    assert len(codes) + len(scales) + (len(mins) if mins is not None else 0) == len(buf)


@pytest.mark.parametrize("stage", ["int3:64", "int4:7", "int8:0", "int8:x", "int4:131072"])
def test_quant_spec_refuses_malformed_stages(stage):
    from moestream.formats.constants import QuantSpec
    with pytest.raises(ValueError, match="unknown codec stage"):
        QuantSpec.parse(stage)


# ---- small and zero experts keep their relative precision (issue 23 item 3) ----------------------

def _rel(ref: np.ndarray, got: torch.Tensor) -> float:
    ref = ref.astype(np.float64)
    diff = np.linalg.norm(ref - got.double().numpy())
    den = np.linalg.norm(ref)
    return diff / den if den else (0.0 if diff == 0 else np.inf)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31), exponent=st.integers(-140, 0), quant=st.sampled_from(["int8", "int4"]),
       delta=st.booleans())
def test_an_expert_scaled_by_a_power_of_two_keeps_its_relative_error(seed, exponent, quant, delta):
    """Quantization is scale-invariant but fp16 scales are not: an expert of tiny weights must
    decode no worse (relative to itself) than the same expert at a normal scale, with or
    without a base expert to delta against."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (32, 64)).astype(np.float32)
    opts = EncodeOptions(quant=quant, group_size=64, zstd_level=3, delta=delta)
    base = {"w": float32_to_bits(rng.normal(0, 0.02, (32, 64)).astype(np.float32), "fp32")} if delta else None
    _, normal = _roundtrip([("w", "fp32", (32, 64), float32_to_bits(w, "fp32"))], opts, base, "fp32" if delta else None)
    small = np.ldexp(w, exponent).astype(np.float32)
    enc, got = _roundtrip([("w", "fp32", (32, 64), float32_to_bits(small, "fp32"))], opts, base,
                          "fp32" if delta else None)
    assert _rel(small, got["w"]) <= 1.25 * _rel(w, normal["w"]) + 1e-6, enc.chain


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("scale", [0.0, 1e-40])
def test_zero_and_denormal_experts_decode_to_themselves_with_a_base(quant, scale):
    rng = np.random.default_rng(3)
    w = (rng.normal(0, 0.02, (16, 64)) * scale).astype(np.float32)
    base = {"w": float32_to_bits(rng.normal(0, 0.02, (16, 64)).astype(np.float32), "fp32")}
    enc, got = _roundtrip([("w", "fp32", (16, 64), float32_to_bits(w, "fp32"))],
                          EncodeOptions(quant=quant, group_size=64, zstd_level=3, delta=True), base, "fp32")
    assert "delta" not in enc.chain
    assert torch.equal(got["w"].float(), torch.from_numpy(w)), (enc.chain, float(got["w"].float().abs().max()))
