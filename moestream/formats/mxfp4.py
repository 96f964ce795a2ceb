"""MXFP4 checkpoints, as GPT-OSS publishes them (`quantization_config.quant_method: "mxfp4"`): a
fused expert tensor `X` [E, ...] is stored as `X_blocks` uint8 [E, R, G, 16], two e2m1 codes a
byte (the even element in the low nibble), and `X_scales` uint8 [E, R, G], one e8m0 exponent
(bias 127) per block of 32 elements; the weights are lut(code) * 2^(scale - 127), rows R of
G * 32, and the tensor the model uses is that [E, R, G*32] transposed to [E, G*32, R] (as
transformers' `convert_moe_packed_tensors` decodes it).

Every such value (a 2-bit-significand code times a power of two from 2^-127 to 2^127) is exact in
bf16, so the converter reads an MXFP4 tensor as bf16 and `--quant keep` is lossless: the store
holds 4x the bytes of the checkpoint's, and `--quant int4` gets back to 0.56 bytes a weight. Keeping
the blocks themselves as a store codec is not done yet."""
from __future__ import annotations

from typing import Any

import numpy as np

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
#: e2m1: the value of each 4-bit code (sign in bit 3)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
BLOCK = 32


def is_mxfp4(config: dict[str, Any]) -> bool:
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., G*32, R] from blocks uint8 [..., R, G, 16] and scales uint8 [..., R, G]
    (the last two dimensions transposed, as the model holds the tensor; HFCheckpoint checked
    the shapes when it paired them)."""
    out = np.empty((*blocks.shape[:-1], BLOCK), np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 15]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, scales.astype(np.int32)[..., None] - 127)
    out = out.reshape(*blocks.shape[:-3], blocks.shape[-3], blocks.shape[-2] * BLOCK)   # [..., R, G*32]
    return np.ascontiguousarray(np.swapaxes(out, -1, -2))
