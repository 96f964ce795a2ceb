"""Codecs of the expert-shard format: dtype bit casts, group-wise int8/int4 quantization, delta
against a base expert, byte-shuffle, zstd, and the xxh3-64 checksum.

Tensors travel through the format as numpy arrays of *bit patterns* (uint16 for bf16/fp16,
uint32 for fp32) because numpy has no bfloat16; torch tensors appear only at the decode end."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
import xxhash
import zstandard

from ..errors import ConvertError, FormatError
from .constants import (DEFAULT_ZSTD_LEVEL, DEFAULT_ZSTD_MIN_SAVING, DELTA_MAX_ERROR_RATIO, DELTA_TRY_AMPLITUDE,
                        DTYPE_ITEMSIZE, FP16_SCALE_MAX_ERROR_RATIO, FP16_SMALLEST_NORMAL, STAGE_DELTA,
                        ZSTD_PROBE_BYTES, ZSTD_PROBE_MARGIN, ZSTD_PROBES,
                        STAGE_SHUFFLE, STAGE_XOR_DELTA, STAGE_ZSTD, QUANT_TYPES, QuantSpec, align_up)
from .fp8 import fp8_values
from .mxfp4 import FP4_VALUES
from .index import Region, TensorSlice, payload_length

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TORCH_BITS = {"bf16": torch.int16, "fp16": torch.int16, "fp32": torch.int32}


def checksum(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """xxh3-64 of `data` as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


# ---- dtype bit casts -------------------------------------------------------------------------

def bits_to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Bit patterns of `dtype` -> float32 values (exact for all three dtypes)."""
    if dtype == "fp32":
        return bits.view(np.float32)
    if dtype == "fp16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> bit patterns of `dtype`, rounding to nearest even (as torch does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "fp32":
        return x.view(np.uint32).copy()
    if dtype == "fp16":
        return x.astype(np.float16).view(np.uint16)
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def cast_bits(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert bit patterns between dtypes (identity when src == dst)."""
    if src == dst:
        return bits
    return float32_to_bits(bits_to_float32(bits, src), dst)


# ---- quantization ----------------------------------------------------------------------------
# int8 is symmetric (scale = absmax/127, codes in [-127, 127]): weights are centred on zero and
# the zero point would cost a plane for little gain. int4 is asymmetric (scale = (max-min)/15,
# min stored, codes in [0, 15]): with only 16 levels, spending one on a range that the group does
# not use costs ~7 % more error in our measurements, so the fp16 min plane pays for itself.

def quantize(x: np.ndarray, quant: str, group_size: int) -> bytes:
    """Quantize float32 `x` (flattened) group-wise. Layout: codes, then fp16 scales, then (int4)
    fp16 minimums. The last group is padded by repeating the last element."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    groups = QuantSpec(quant, group_size).groups(n)
    pad = groups * group_size - n
    if pad:
        flat = np.concatenate([flat, np.full(pad, flat[-1] if n else 0.0, np.float32)])
    g = flat.reshape(groups, group_size)
    if not np.isfinite(g).all():
        raise ValueError("cannot quantize a tensor holding inf or NaN")
    if quant == "int8":
        with np.errstate(over="ignore"):
            scale = (np.abs(g).max(axis=1) / 127.0).astype(np.float16)
        if not np.isfinite(scale).all():
            raise ValueError(f"a weight of magnitude {float(np.abs(g).max()):.3g} needs an int8 scale beyond fp16's range")
        s = scale.astype(np.float32)[:, None]
        codes = np.clip(np.rint(np.divide(g, s, out=np.zeros_like(g), where=s > 0)), -127, 127).astype(np.int8)
        return codes.tobytes() + scale.tobytes()
    if quant == "int4":
        with np.errstate(over="ignore"):
            mn = g.min(axis=1).astype(np.float16)
            mx = g.max(axis=1)
            scale = ((mx - mn.astype(np.float32)) / 15.0).astype(np.float16)
        if not (np.isfinite(scale).all() and np.isfinite(mn).all()):
            raise ValueError(f"a weight range of {float(g.max() - g.min()):.3g} needs int4 scales beyond fp16's range")
        s = scale.astype(np.float32)[:, None]
        q = np.divide(g - mn.astype(np.float32)[:, None], s, out=np.zeros_like(g), where=s > 0)
        codes = np.clip(np.rint(q), 0, 15).astype(np.uint8).reshape(-1)
        packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
        return packed.tobytes() + scale.tobytes() + mn.tobytes()
    raise ValueError(f"unknown quantization {quant!r}")


def split_quantized(buf: torch.Tensor | np.ndarray, numel: int, quant: str, group_size: int):
    """Views (codes, scales, mins) into one tensor's quantized payload (uint8, 1-D); mins is
    None for int8. The layout is QuantSpec's."""
    codes, scales, mins = QuantSpec(quant, group_size).planes(numel)
    return buf[slice(*codes)], buf[slice(*scales)], buf[slice(*mins)] if mins else None


def dequantize_torch(codes: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor], *, quant: str,
                     group_size: int, numel: int, base: Optional[torch.Tensor] = None,
                     out_dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference dequantizer in plain torch (any device). `codes`, `scales`, `mins` are uint8
    views of one tensor's payload; returns a 1-D tensor of `numel` elements in `out_dtype`,
    with `base` (same numel, any float dtype) added first when given: a new one owned by the
    caller, or `out` (numel elements of out_dtype) filled in place."""
    qtype = QUANT_TYPES[quant]
    s = scale_values(scales, quant)[:, None]
    if qtype.float_codes and qtype.bits == 4:       # two table codes a byte, low nibble first
        table = code_table(quant, codes.device)
        vals = torch.stack([table[(codes & 0x0F).long()], table[(codes >> 4).long()]], dim=1).view(-1, group_size) * s
    elif qtype.float_codes:
        vals = code_table(quant, codes.device)[codes.long()].view(-1, group_size) * s
    elif quant == "int8":
        vals = codes.view(torch.int8).float().view(-1, group_size) * s
    else:
        lo = (codes & 0x0F).float()
        hi = (codes >> 4).float()
        q = torch.stack([lo, hi], dim=1).view(-1, group_size)
        vals = q * s + view_plane(mins, qtype.plane_dtype).float()[:, None]
    vals = vals.reshape(-1)[:numel]
    if base is not None:
        vals = vals + base.reshape(-1).float()
    if out is not None:
        return out.view(-1).copy_(vals)
    return vals.to(out_dtype)


#: a plane's numpy dtype (QuantType.plane_dtype) as torch's
TORCH_PLANE_DTYPES = {np.float16: torch.float16, np.float32: torch.float32, np.uint8: torch.uint8}


def scale_values(scales: torch.Tensor, quant: str) -> torch.Tensor:
    """float32 [groups]: the scale of each group from a tensor's scale plane (uint8 bytes): the
    plane's floats, or 2^(e - 127) for E8M0 exponents (e = 255, NaN in the format, gives NaN)."""
    qtype = QUANT_TYPES[quant]
    if qtype.e8m0_scales:
        e = scales.float()
        return torch.where(e == 255, torch.nan, torch.exp2(e - 127))
    return view_plane(scales, qtype.plane_dtype).float()


def view_plane(b: torch.Tensor, dtype=np.float16) -> torch.Tensor:
    """uint8 bytes -> a view as the plane's float dtype; planes of tensors packed after an
    odd-length plane sit at unaligned offsets, and a view needs its item size's alignment, so
    those (small) planes are copied."""
    t = TORCH_PLANE_DTYPES[dtype]
    return (b if b.storage_offset() % t.itemsize == 0 else b.clone()).view(t)


def code_values(kind: str) -> np.ndarray:
    """float32 [2^bits]: the value of each code of a table type (QuantType.float_codes): a float8
    byte (formats/fp8.py) or an e2m1 nibble (formats/mxfp4.py)."""
    return FP4_VALUES if kind == "mxfp4" else fp8_values(kind)


_CODE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(kind: str, device: torch.device) -> torch.Tensor:
    """code_values(kind) as a float32 tensor on `device` (made once per device)."""
    key = (kind, torch.device(device))
    lut = _CODE_TABLES.get(key)
    if lut is None:
        lut = _CODE_TABLES[key] = torch.from_numpy(code_values(kind)).to(device)
    return lut


#: Signature of a pluggable dequantizer (compute/ supplies Numba kernels with it).
Dequantizer = Callable[..., torch.Tensor]


def dequantize_np(buf: bytes, numel: int, quant: str, group_size: int) -> np.ndarray:
    """float32 values of one quantized tensor payload (used by the encoder to measure error)."""
    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    codes, scales, mins = split_quantized(t, numel, quant, group_size)
    return dequantize_torch(codes, scales, mins, quant=quant, group_size=group_size, numel=numel,
                            out_dtype=torch.float32).numpy()


# ---- byte shuffle ----------------------------------------------------------------------------

# One strided assignment per byte plane: numpy's general transpose copy of a [N, itemsize] uint8
# array runs 6-8x slower (measured 158 -> 28 us for 64 KiB of bf16), and unshuffle is on the
# decode path of every shuffled extent.
def shuffle(buf: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte-shuffle: all first bytes of each element, then all second bytes, ... (uint8 in/out)."""
    elems = buf.reshape(-1, itemsize)
    out = np.empty(buf.size, np.uint8)
    planes = out.reshape(itemsize, -1)
    for i in range(itemsize):
        planes[i] = elems[:, i]
    return out


def unshuffle(buf: np.ndarray, itemsize: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Undo `shuffle`: uint8 in, uint8 out (written into `out`, same size, when given)."""
    if out is None:
        out = np.empty(buf.size, np.uint8)
    planes = buf.reshape(itemsize, -1)
    elems = out.reshape(-1, itemsize)
    for i in range(itemsize):
        elems[:, i] = planes[i]
    return out


# ---- encoding of a region --------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedPlanes:
    """A tensor that arrives already in a group-wise payload (QuantSpec's layout: codes, fp16
    scales, fp16 minimums), as a GGUF's Q8_0/Q4_0/Q4_K blocks are re-laid out: stored as it is,
    not quantized again (its error is the source's own, 0 here)."""
    stage: str          # QuantSpec.stage, e.g. "int4:32"
    payload: bytes
    #: the payload holds the tensor's [cols, rows] transpose (TensorSlice.transposed)
    transposed: bool = False


@dataclass(frozen=True)
class EncodeOptions:
    """How the writer encodes expert extents. quant: None (raw, lossless) or "int8"/"int4";
    zstd_level: None disables zstd; delta: try a delta against the layer's base expert;
    zstd_min_saving: the share of the (4096-padded) stored bytes that zstd must save to be kept
    (constants.DEFAULT_ZSTD_MIN_SAVING says why)."""
    quant: Optional[str] = None
    group_size: int = 64
    zstd_level: Optional[int] = DEFAULT_ZSTD_LEVEL
    delta: bool = True
    zstd_min_saving: float = DEFAULT_ZSTD_MIN_SAVING


@dataclass(frozen=True)
class EncodedRegion:
    stored: bytes                     # the bytes to write (before padding)
    raw_length: int
    chain: tuple[str, ...]
    tensors: tuple[TensorSlice, ...]
    rel_error: float                  # max over tensors of ||w - decode(w)|| / ||w|| (0 for lossless)
    #: the xxh3 of `stored` where the encoder took it (encode_region, on the converter's encoder
    #: threads; the writer takes it where it is empty)
    xxh3: str = ""


def _rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||ref - got|| / ||ref|| in float64 (float32 squares of 1e-40 weights underflow to a zero norm);
    a tensor of zeros is exact or infinitely wrong, never "small in absolute terms". float32 first
    (a third of the time), float64 where a float32 norm could have under- or overflowed."""
    den32 = float(np.linalg.norm(ref))
    num32 = float(np.linalg.norm(ref - got))
    if 1e-30 < den32 < 1e30 and (num32 == 0 or 1e-30 < num32 < 1e30):
        return num32 / den32
    ref = ref.astype(np.float64)
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(ref - got.astype(np.float64)))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _exact_scale_error(x: np.ndarray, quant: str, group_size: int) -> float:
    """The relative error that group-wise quantization of float32 `x` has when its scales are not
    limited by fp16's range: the same codes computed on x rescaled by a power of two that brings its
    largest magnitude near 1 (exact in float32, and the error is scale-invariant)."""
    peak = float(np.abs(x).max())
    if peak == 0:
        return 0.0
    k = -math.frexp(peak)[1]
    y = np.ldexp(x.astype(np.float64), k).astype(np.float32)
    return _rel_error(y, dequantize_np(quantize(y, quant, group_size), y.size, quant, group_size))


def encode_region(tensors: list[tuple[str, str, tuple[int, ...], np.ndarray]], opts: EncodeOptions,
                  base: Optional[dict[str, np.ndarray]] = None, base_dtype: Optional[str] = None) -> EncodedRegion:
    """Encode tensors [(name, dtype, shape, bits)] into one region (bits: the bit patterns of
    dtype, or EncodedPlanes stored as they are). `base` maps tensor names
    to the layer's base expert (bit patterns of `base_dtype`); delta, shuffle and zstd are kept
    only where they make the stored bytes, padded to ALIGNMENT as the file lays them out,
    smaller (zstd: by opts.zstd_min_saving at least; delta: with the error no larger); among
    candidates of one padded size, the smaller error, then the fewer stages (less to decode), win."""
    candidates = [_encode_planes(tensors, opts, None, None)]
    if any(isinstance(t[3], EncodedPlanes) for t in tensors):
        opts = replace(opts, delta=False)       # planes given as they are: nothing to re-encode
    elif candidates[0][4]:
        # an expert of tiny weights: quantized, it would decode to (nearly) zeros or lose relative
        # precision that a normal expert keeps, so it is stored in its source dtype instead
        opts = replace(opts, quant=None)
        candidates = [_encode_planes(tensors, opts, None, None)]
    if opts.delta and base is not None and (opts.quant is None or _quantized_delta_can_win(tensors, base, base_dtype)):
        candidates.append(_encode_planes(tensors, opts, base, base_dtype))
    best: Optional[EncodedRegion] = None
    plain_error = candidates[0][3]
    for planes, chain, slices, err, _ in candidates:
        is_delta = bool(chain) and chain[-1] in (STAGE_DELTA, STAGE_XOR_DELTA)
        if is_delta and err > plain_error:
            continue
        if is_delta and opts.quant is not None and err > DELTA_MAX_ERROR_RATIO * plain_error:
            # a quantized delta decodes to bf16 on load while a plain int extent is held as stored
            # and multiplied in place (formats/quantized.py): worth it only for experts close to
            # their layer's mean (upcycled ones), not for the 1/E narrower range that independent
            # experts' deltas have (which had nearly every extent of a random store take delta)
            continue
        for cand in _region_options(planes, chain, slices, err, opts):
            if best is None or _rank(cand) < _rank(best):
                best = cand
    assert best is not None
    return replace(best, xxh3=checksum(best.stored))


def _fp16_scales_lose_precision(x: np.ndarray, err: float, quant: str, group: int) -> bool:
    """Whether the quantized float32 tensor `x`, decoded with relative error `err`, lost more than
    FP16_SCALE_MAX_ERROR_RATIO times what exact scales would give. Only a tensor whose scales reach
    below fp16's normal range is checked: for the rest fp16 scales cost nothing, and the check
    costs a second quantization."""
    if err == 0 or not x.size:
        return False
    span = float(np.abs(x).max()) / 127.0 if quant == "int8" else float(x.max() - x.min()) / 15.0
    return span < FP16_SMALLEST_NORMAL and err > FP16_SCALE_MAX_ERROR_RATIO * _exact_scale_error(x, quant, group)


def _quantized_delta_can_win(tensors, base, base_dtype) -> bool:
    """Whether a quantized delta against the layer's base could keep DELTA_MAX_ERROR_RATIO of the
    plain encoding's error: group-wise quantization error scales with the amplitude it codes, so
    when every tensor's ||w - base|| is above DELTA_TRY_AMPLITUDE x ||w|| (independent experts:
    about sqrt(1 - 1/E)), the delta cannot win and is not encoded (it would double the cost of
    converting each expert)."""
    return any(delta_amplitude_may_win(bits_to_float32(bits, dtype).reshape(-1),
                                       bits_to_float32(base[name], base_dtype).reshape(-1))
               for name, dtype, _, bits in tensors)


def delta_amplitude_may_win(x: np.ndarray, base: np.ndarray) -> bool:
    """Whether float32 `x` lies within DELTA_TRY_AMPLITUDE of `base` (||x - base|| against ||x||,
    in float32: a threshold, not an error figure); True where ||x|| is too small or large to tell."""
    nx = float(np.linalg.norm(x))
    return not 1e-30 < nx < 1e30 or float(np.linalg.norm(x - base)) <= DELTA_TRY_AMPLITUDE * nx


def zstd_worth_trying(payload: bytes, opts: EncodeOptions) -> bool:
    """Whether zstd could save opts.zstd_min_saving of `payload`: ZSTD_PROBES slices of
    ZSTD_PROBE_BYTES spread over it are compressed first, and a payload whose sample saves less
    than the threshold minus ZSTD_PROBE_MARGIN is not compressed whole (random-looking weights
    save ~10-30 %: compressing every candidate of every expert was most of a conversion's time)."""
    n = len(payload)
    if n <= 2 * ZSTD_PROBES * ZSTD_PROBE_BYTES or opts.zstd_min_saving <= ZSTD_PROBE_MARGIN:
        return True
    step = (n - ZSTD_PROBE_BYTES) // (ZSTD_PROBES - 1)
    return zstd_sample_may_pay(b"".join(payload[i * step:i * step + ZSTD_PROBE_BYTES] for i in range(ZSTD_PROBES)),
                               opts)


def zstd_sample_may_pay(sample: bytes, opts: EncodeOptions) -> bool:
    """Whether zstd saves `sample` at least opts.zstd_min_saving less ZSTD_PROBE_MARGIN."""
    saving = 1 - len(zstandard.ZstdCompressor(level=opts.zstd_level).compress(sample)) / len(sample)
    return saving >= opts.zstd_min_saving - ZSTD_PROBE_MARGIN


def _region_options(planes, chain, slices, err, opts: EncodeOptions):
    """The stored forms of one set of encoded planes: as they are, byte-shuffled (lossless), and
    each with zstd where that saves opts.zstd_min_saving of the padded bytes."""
    options = [(planes, chain)]
    if opts.quant is None and opts.zstd_level is not None:
        options.append((b"".join(shuffle(np.frombuffer(p, np.uint8), DTYPE_ITEMSIZE[t.dtype]).tobytes()
                                 for p, t in zip(planes, slices)), chain + (STAGE_SHUFFLE,)))
    for payload, ch in options:
        payload = payload if isinstance(payload, bytes) else b"".join(payload)
        stored, ch2 = payload, ch
        if opts.zstd_level is not None and zstd_worth_trying(payload, opts):
            z = zstandard.ZstdCompressor(level=opts.zstd_level).compress(payload)
            saving = 1 - align_up(len(z)) / align_up(len(payload))
            if saving > 0 and saving >= opts.zstd_min_saving:
                stored, ch2 = z, ch + (STAGE_ZSTD,)
        if STAGE_SHUFFLE in ch2 and STAGE_ZSTD not in ch2:
            continue  # shuffle without zstd saves nothing
        yield EncodedRegion(stored, len(payload), ch2, slices, err)


def _rank(c: EncodedRegion) -> tuple[int, float, int]:
    """Fewer bytes on disk first; at one size the smaller error (a quantized delta), then the
    fewer stages to decode."""
    return align_up(len(c.stored)), c.rel_error, len(c.chain)


def _encode_planes(tensors, opts: EncodeOptions, base, base_dtype):
    """(planes, chain, slices, max relative error, whether fp16 scales lost a plain quantized
    tensor's precision) of one candidate encoding."""
    planes, slices, err, pos, scale_loss = [], [], 0.0, 0, False
    chain: tuple[str, ...] = ()
    spec = QuantSpec(opts.quant, opts.group_size) if opts.quant is not None else None
    if spec is not None:
        chain = (spec.stage,)
    if base is not None:
        chain += (STAGE_DELTA,) if opts.quant else (STAGE_XOR_DELTA,)
    # planes given as they are: the region's other tensors (a GPT-OSS expert's biases) are stored
    # as their own bytes beside them (TensorSlice.raw), not quantized
    given = any(isinstance(t[3], EncodedPlanes) for t in tensors)
    for name, dtype, shape, bits in tensors:
        numel = math.prod(shape)
        raw = transposed = False
        if isinstance(bits, EncodedPlanes):
            if spec is None or bits.stage != spec.stage or base is not None:
                raise ConvertError(f"tensor {name}: its {bits.stage} planes cannot be stored as "
                                   f"{spec.stage if spec else 'raw'}{' with a delta' if base is not None else ''}")
            plane, out_dtype, transposed = bits.payload, "bf16", bits.transposed
        elif given and spec is not None:
            plane, out_dtype, raw = np.ascontiguousarray(bits).tobytes(), dtype, True
        elif opts.quant is None:
            b = bits
            if base is not None:
                b = bits ^ cast_bits(base[name], base_dtype, dtype)
            plane = np.ascontiguousarray(b).tobytes()
            out_dtype = dtype
        else:
            x = bits_to_float32(bits, dtype).reshape(-1)
            target = x
            if base is not None:
                target = x - bits_to_float32(base[name], base_dtype).reshape(-1)
            try:
                plane = quantize(target, opts.quant, opts.group_size)
            except ValueError as e:
                raise ConvertError(f"tensor {name}: cannot quantize to {opts.quant}: {e}") from None
            recon = dequantize_np(plane, numel, opts.quant, opts.group_size)
            if base is not None:
                recon = recon + bits_to_float32(base[name], base_dtype).reshape(-1)
            tensor_err = _rel_error(x, recon)
            err = max(err, tensor_err)
            scale_loss = scale_loss or (base is None and _fp16_scales_lose_precision(x, tensor_err, opts.quant,
                                                                                      opts.group_size))
            out_dtype = "bf16"
        assert len(plane) == payload_length(numel, out_dtype, None if raw else spec)
        planes.append(plane)
        slices.append(TensorSlice(name, out_dtype, tuple(shape), pos, len(plane), raw, transposed))
        pos += len(plane)
    return planes, chain, tuple(slices), err, scale_loss


# ---- decoding of a region --------------------------------------------------------------------

def nonfinite_scales(region: Region, payload: np.ndarray) -> list[str]:
    """Names of the quantized tensors of `region` whose scale or minimum planes (or float8 codes)
    hold NaN or inf (a decoder would turn them into NaN weights); empty for raw regions."""
    q = region.quant
    if q is None:
        return []
    bad = []
    finite_code = np.isfinite(code_values(q.kind)) if q.type.float_codes else None
    if finite_code is not None and finite_code.all():
        finite_code = None                                 # e2m1: every code is a number
    for t in region.tensors:
        if t.raw:
            continue
        buf = payload[t.offset:t.offset + t.length]
        codes, scales, mins = split_quantized(buf, t.numel, q.kind, q.group)
        if q.type.e8m0_scales:
            ok = bool((np.asarray(scales) != 255).all())
        else:
            ok = all(np.isfinite(np.frombuffer(p.tobytes(), q.type.plane_dtype)).all()
                     for p in [scales] + ([mins] if mins is not None else []))
        if not ok or (finite_code is not None and not finite_code[np.asarray(codes)].all()):
            bad.append(t.name)
    return bad


def zstd_frame_size(data) -> Optional[int]:
    """Bytes taken by the zstd frame at the start of `data` (header, blocks, checksum), walking
    the block headers without decoding; None when the frame is cut short or malformed. Lets a
    reader refuse trailing frames, which the decompressor would silently ignore."""
    n = len(data)
    try:
        pos = zstandard.frame_header_size(bytes(data[:18]))
    except zstandard.ZstdError:
        return None
    has_checksum = bool(data[4] & 0x04) if n > 4 else False
    while True:
        if pos + 3 > n:
            return None
        header = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:  # reserved block type
            return None
        pos += 3 + (1 if kind == 1 else size)    # an RLE block stores one byte
        if last:
            break
    pos += 4 if has_checksum else 0
    return pos if pos <= n else None


def unpack_payload(region: Region, stored: bytes | memoryview | np.ndarray, *, path: str = "?",
                   extent: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Undo zstd and shuffle: returns the decoded payload (uint8, raw_length bytes, a new buffer
    owned by the caller unless the region has neither stage, in which case it may alias `stored`)."""
    data = stored
    if region.has(STAGE_ZSTD):
        try:
            size = zstandard.frame_content_size(bytes(data[:18]) if not isinstance(data, bytes) else data[:18])
        except zstandard.ZstdError as e:
            raise FormatError(f"bad zstd frame ({e})", path=path, offset=region.offset, extent=extent) from None
        if size != region.raw_length:
            raise FormatError(f"zstd frame claims {size} bytes, index says {region.raw_length}",
                              path=path, offset=region.offset, extent=extent)
        frame = zstd_frame_size(data)
        if frame != len(data):
            what = "is not one whole zstd frame" if frame is None else f"holds {len(data) - frame} bytes after its zstd frame"
            raise FormatError(f"stored region {what}", path=path, offset=region.offset, extent=extent)
        try:  # the frame header's size was checked against the index's bounded raw_length above
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=region.raw_length)
        except zstandard.ZstdError as e:
            raise FormatError(f"zstd decompression failed ({e})", path=path, offset=region.offset, extent=extent) from None
        if len(data) != region.raw_length:
            raise FormatError(f"zstd gave {len(data)} bytes, expected {region.raw_length}",
                              path=path, offset=region.offset, extent=extent)
    arr = np.frombuffer(data, dtype=np.uint8)
    if region.has(STAGE_SHUFFLE):
        if region.tensors:   # the tensors tile the payload, each shuffled on its own
            whole = np.empty(sum(t.length for t in region.tensors), np.uint8)
            pos = 0
            for t in region.tensors:
                unshuffle(arr[t.offset:t.offset + t.length], DTYPE_ITEMSIZE[t.dtype], out=whole[pos:pos + t.length])
                pos += t.length
            arr = whole
    return arr


def materialize(region: Region, payload: np.ndarray | torch.Tensor, base: Optional[dict[str, torch.Tensor]] = None,
                *, dequantize: Dequantizer = dequantize_torch, device: torch.device | str = "cpu",
                out: Optional[torch.Tensor] = None, alias: bool = False) -> dict[str, torch.Tensor]:
    """Turn a decoded payload into named tensors on `device`: raw planes are reinterpreted
    (XOR-ed with the base where the chain says so); quantized planes go to `device` as codes and
    are dequantized there to bf16 (plus the base for delta extents). `payload` is only read.

    Without `out`, returned tensors are new allocations owned by the caller. With `out` (uint8,
    on `device`, at least `region.decoded_length` bytes), the tensors are written into it, packed
    in index order, and returned as views of it: one copy (raw) or one dequant pass (int) from
    the payload, no allocation.

    With `alias`, raw planes already on `device` (and not delta-coded) are returned as views of
    `payload`, which the caller hands over (a buffer read straight into device memory).

    On CUDA the work is queued on the current stream and not waited for: copies from a pinned
    `payload` may still be reading it when this returns, so a caller that reuses that memory
    waits for the stream first (Store._decode does, on its own stream)."""
    if isinstance(payload, np.ndarray):
        payload = payload_tensor(payload)
    q = region.quant
    need_base = region.has(STAGE_DELTA) or region.has(STAGE_XOR_DELTA)
    if need_base and base is None:
        raise ValueError("this extent is delta-coded: its layer's base expert is needed")
    if q is not None and payload.device != torch.device(device):
        payload = payload.to(device, non_blocking=True)
    tensors: dict[str, torch.Tensor] = {}
    pos = 0
    for t in region.tensors:
        buf = payload[t.offset:t.offset + t.length]
        dtype = TORCH_DTYPES[t.dtype]
        dst = None
        if out is not None:
            n = t.numel * dtype.itemsize
            dst = out[pos:pos + n].view(dtype)
            pos += n
        if q is None or t.raw:
            bits = buf.view(TORCH_BITS[t.dtype])
            on_device = bits.device.type == torch.device(device).type
            if dst is None and alias and on_device and not need_base:
                pass
            elif dst is None:   # a new tensor: on CUDA the host-to-device copy is the only copy
                bits = bits.clone() if on_device else bits.to(device, non_blocking=True)
            else:
                dst.view(TORCH_BITS[t.dtype]).copy_(bits, non_blocking=True)
                bits = dst.view(TORCH_BITS[t.dtype])
            if need_base:
                bits ^= base[t.name].reshape(-1).to(dtype).view(TORCH_BITS[t.dtype]).to(bits.device)
            tensors[t.name] = bits.view(dtype).view(t.shape).to(device)
        else:
            codes, scales, mins = split_quantized(buf, t.numel, q.kind, q.group)
            b = base[t.name].to(device) if need_base else None
            if t.transposed:     # decoded as stored, then turned into the tensor's own layout
                w = dequantize(codes, scales, mins, quant=q.kind, group_size=q.group, numel=t.numel,
                               out_dtype=dtype).view(t.stored_shape).t()
                tensors[t.name] = dst.view(t.shape).copy_(w) if dst is not None else w.contiguous()
                continue
            kw = {"out": dst} if dst is not None else {}
            tensors[t.name] = dequantize(codes, scales, mins, quant=q.kind, group_size=q.group, numel=t.numel,
                                         base=b, out_dtype=dtype, **kw).view(t.shape)
    return tensors


def payload_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over a (possibly read-only) payload array without copying it (torch warns about,
    but allows, non-writable buffers; nothing here writes to a payload)."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)
