"""Synthetic bf16 checkpoints for the benchmarks: safetensors files written tensor by tensor
(never all in memory), with N(0, 0.02) weights. Tests build real models from transformers
configs instead; these exist for sizes that transformers would take minutes to initialise."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np


def write_random_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], *, seed: int = 0) -> int:
    """Write `tensors` [(name, shape)] as BF16 N(0, 0.02) into one safetensors file; returns bytes."""
    header, pos = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape in tensors:
            x = rng.standard_normal(math.prod(shape), dtype=np.float32) * 0.02
            if name.endswith("norm.weight"):
                x = np.ones_like(x)
            f.write(((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16).tobytes())
    return pos
