"""FP8 block-scaled checkpoints, as DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8 and
MiniMax-M2 publish them: a linear weight `X.weight` is float8 (`F8_E4M3`, or `F8_E5M2`) and
`X.weight_scale_inv` holds one float32 multiplier per block of the weight
(`[ceil(out / B0), ceil(in / B1)]`, `B = quantization_config.weight_block_size`, 128 x 128 in all
of them): w[i, j] = fp8(code[i, j]) * scale_inv[i // B0, j // B1] (the name says "inverse", the
checkpoints and transformers' FineGrainedFP8 multiply by it).

`--quant keep` keeps the experts as they are: their float8 codes, byte for byte, as a store type of
their own (constants.QUANT_TYPES "fp8e4m3"/"fp8e5m2": one code a byte, then one float32 scale per
group of `row_group` elements along a row, the multiplier of the block the group lies in; 1 byte a
weight and 4 / group of scales), which the tiers hold as stored and the CPU kernels multiply in
place (compute/quant_kernels.py). Otherwise, and for the dense weights, the converter reads such a
weight as its dequantized values: float32 products, which are exact (a 4-bit significand times a
24-bit one rounds once, to float32), stored as bf16 (relative error at most 2^-9 per weight, from
the scale's low bits), float32 with `--quant fp32`, or quantized from them with `--quant int8|int4`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from ..errors import ConvertError

#: safetensors dtype -> our name for the float8 formats a checkpoint may hold
FP8_DTYPES = {"F8_E4M3": "fp8e4m3", "F8_E5M2": "fp8e5m2"}
#: "X.weight" -> "X.weight" + SCALE_SUFFIX holds its block multipliers
SCALE_SUFFIX = "_scale_inv"
#: quantization_config.fmt -> the float8 format its weights must have
FP8_FORMATS = {"e4m3": "fp8e4m3", "e5m2": "fp8e5m2"}


def fp8_values(fmt: str) -> np.ndarray:
    """float32 [256]: the value of every code of `fmt` ("fp8e4m3": OCP E4M3FN, bias 7, no
    infinities, NaN at 0x7F/0xFF; "fp8e5m2": IEEE-like, bias 15)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b >> 7, -1.0, 1.0)
    if fmt == "fp8e4m3":
        e, m, bias, mbits = (b >> 3) & 15, b & 7, 7, 3
    elif fmt == "fp8e5m2":
        e, m, bias, mbits = (b >> 2) & 31, b & 3, 15, 2
    else:
        raise ValueError(f"unknown float8 format {fmt!r}")
    frac = m / float(1 << mbits)
    val = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e.astype(np.float64) - bias))
    if fmt == "fp8e4m3":
        val = np.where((e == 15) & (m == 7), np.nan, val)
    else:
        val = np.where(e == 31, np.where(m == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)


_VALUES = {f: fp8_values(f) for f in FP8_FORMATS.values()}


def block_size(config: dict[str, Any], where: str) -> tuple[int, int] | None:
    """The checkpoint's FP8 block (rows, cols) from config.json's quantization_config, None when
    it declares none; ConvertError naming the field for one moestream cannot read."""
    q = config.get("quantization_config") if isinstance(config, dict) else None   # a non-object: check_config's
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConvertError(f"{where}: quantization_config is not an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConvertError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                           "(moestream reads fp8 block-scaled checkpoints; others: dequantize first)")
    fmt = q.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise ConvertError(f"{where}: quantization_config.fmt {fmt!r}: supported {', '.join(FP8_FORMATS)}")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in block)):
        raise ConvertError(f"{where}: quantization_config.weight_block_size {block!r} is not two positive integers "
                           "(per-tensor and per-channel FP8 are not supported)")
    return block[0], block[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The block-multiplier tensor's shape for a 2-D weight of `shape`."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _check(codes: np.ndarray, scales: np.ndarray, fmt: str, name: str, path: Path) -> np.ndarray:
    """The values of `codes`; ConvertError naming the tensor and file for a NaN code or a
    non-finite or negative scale."""
    vals = _VALUES[fmt][codes]
    if np.isnan(vals).any():
        i = int(np.flatnonzero(np.isnan(vals.reshape(-1)))[0])
        raise ConvertError(f"{path}: {name} holds a NaN float8 code at element {i}")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ConvertError(f"{path}: {name}{SCALE_SUFFIX} holds a negative or non-finite multiplier")
    return vals


def dequantize(codes: np.ndarray, scales: np.ndarray, fmt: str, block: tuple[int, int], name: str,
               path: Path) -> np.ndarray:
    """float32 [out, in] = value(codes uint8 [out, in]) * scales float32 [out/B0, in/B1] by block;
    ConvertError naming the tensor and file for a NaN code or a non-finite or negative scale."""
    vals = _check(codes, scales, fmt, name, path)
    rows, cols = codes.shape
    full = np.repeat(np.repeat(scales, block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
    return vals * full


def row_group(widths: Iterable[int], block: tuple[int, int]) -> Optional[int]:
    """The group an FP8 checkpoint's experts are kept in: groups along rows that lie inside one
    block and one row of every expert matrix (the gcd of the matrices' widths and the block's
    columns: 128 for the published models), None where that is odd (a store's groups are even)."""
    g = math.gcd(block[1], *widths)
    return g if g % 2 == 0 else None


def row_planes(codes: np.ndarray, scales: np.ndarray, fmt: str, block: tuple[int, int], group: int, name: str,
               path: Path) -> bytes:
    """codes uint8 [rows, cols] and block multipliers float32 [ceil(rows/B0), ceil(cols/B1)] as the
    payload of float8 type `fmt` in groups of `group` (row_group): the codes byte for byte, then
    one float32 scale per group of each row, the multiplier of its block (no value changes);
    ConvertError as dequantize gives it."""
    _check(codes, scales, fmt, name, path)
    rows, cols = codes.shape
    per_row = scales[np.arange(rows) // block[0]]                       # [rows, ceil(cols/B1)]
    return codes.tobytes() + np.ascontiguousarray(per_row[:, np.arange(0, cols, group) // block[1]],
                                                  np.float32).tobytes()
