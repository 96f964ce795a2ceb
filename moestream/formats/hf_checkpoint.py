"""Streaming reader of Hugging Face safetensors checkpoints (one file or sharded).

Reads one tensor at a time with pread, not mmap: an mmap of a multi-GB shard grows the
converter's resident set with every page touched, while pread keeps it at one tensor."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConvertError
from .codecs import bits_to_float32, float32_to_bits
from .constants import DTYPE_BITS_NUMPY, DTYPE_ITEMSIZE, SAFETENSORS_DTYPES, TOKENIZER_FILES
from . import mxfp4
from .fp8 import (FP8_DTYPES, FP8_FORMATS, SCALE_SUFFIX, block_size, dequantize as fp8_dequantize,
                  row_planes as fp8_row_planes, scale_shape)

#: Files copied into the store so that `generate` needs nothing else.


def _check_exponents(exps: np.ndarray, t: "TensorInfo") -> None:
    """ConvertError naming the tensor and file for an E8M0 exponent 255 (NaN in the MX formats)."""
    bad = np.flatnonzero(exps == 255)
    if bad.size:
        raise ConvertError(f"{t.path}: {t.name}{mxfp4.SCALES_SUFFIX} holds the NaN exponent 255 (block {int(bad[0])})")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 48


@dataclass(frozen=True)
class Fp8Weight:
    """Where an FP8 weight's block multipliers are (formats/fp8.py)."""
    fmt: str                     # fp8e4m3 | fp8e5m2
    scales: "TensorInfo"
    block: tuple[int, int]


@dataclass(frozen=True)
class Mxfp4Tensor:
    """Where an MXFP4 tensor's blocks and exponents are (formats/mxfp4.py)."""
    blocks: "TensorInfo"
    scales: "TensorInfo"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    dtype: str                   # bf16 | fp16 | fp32: what read_info returns (fp32 for an FP8 weight)
    shape: tuple[int, ...]
    offset: int                  # absolute byte offset in `path`
    length: int                  # bytes in the file (an FP8 weight's codes)
    fp8: Optional[Fp8Weight] = None
    mxfp4: Optional[Mxfp4Tensor] = None
    ggml_type: Optional[str] = None   # a GGUF tensor's quantized type (Q8_0, Q4_K, ...), read as float32

    @property
    def keep_dtype(self) -> str:
        """The dtype `--quant keep` stores the tensor in: its own, bf16 for an FP8 weight or a
        quantized GGUF tensor (their dequantized values; formats/fp8.py, formats/gguf_checkpoint.py)."""
        return "bf16" if self.fp8 is not None or self.ggml_type is not None else self.dtype


class TensorTable:
    """A checkpoint's tensors by name (`tensors`, name -> TensorInfo), as both readers present them."""
    root: Path
    tensors: dict[str, TensorInfo]
    #: what a missing tensor is missing from, in messages
    holder = "the checkpoint"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def planes_transposed(self, t: TensorInfo) -> bool:
        """Whether read_planes(t) holds t's transpose (TensorSlice.transposed): an MXFP4 tensor's
        blocks run along the rows of the [out, in] matrix the model holds as [in, out]."""
        return t.mxfp4 is not None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConvertError(f"{self.root}: tensor {name} is missing from {self.holder}") from None


class HFCheckpoint(TensorTable):
    """Index of the tensors of a checkpoint directory; `read(name)` returns bit patterns."""

    def __init__(self, src: str | os.PathLike):
        self.root = Path(src)
        if not self.root.is_dir():
            raise ConvertError(f"{self.root}: not a directory (expected a Hugging Face checkpoint folder)")
        cfg = self.root / "config.json"
        if not cfg.is_file():
            raise ConvertError(f"{cfg}: missing (a Hugging Face checkpoint has a config.json)")
        try:
            self.config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"{cfg}: cannot read it as JSON ({e})") from None
        #: whether the checkpoint's experts are MXFP4 (GPT-OSS as published): its uint8 tensors are
        #: their blocks and exponents
        self.mxfp4 = mxfp4.is_mxfp4(self.config)
        index = self.root / "model.safetensors.index.json"
        # name -> shard file name, where an index decides which shard's copy is the tensor
        self._weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map is not an object of tensor name -> shard file name")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: malformed ({e})") from None
            for shard in set(weight_map.values()):
                self._check_shard_path(index, shard)
            self._weight_map = weight_map
            shards = sorted(set(weight_map.values()))
        elif (self.root / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            shards = sorted(p.name for p in self.root.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"{self.root}: no model.safetensors or model.safetensors.index.json")
        self.tensors: dict[str, TensorInfo] = {}
        # a name found in a shard the index does not assign it to: kept aside, an error only
        # if the index does not resolve it (below)
        self._elsewhere: dict[str, Path] = {}
        for shard in shards:
            self._scan(self.root / shard)
        if self._weight_map is not None:
            for name, shard in self._weight_map.items():
                if name not in self.tensors:
                    raise ConvertError(f"{index}: names {name} in {shard}, which does not hold it")
        #: (rows, cols) of an FP8 checkpoint's weight blocks, None for a float checkpoint
        self.fp8_block = None
        if self.mxfp4:
            self._pair_mxfp4()
        else:
            self.fp8_block = self._pair_fp8_scales()

    def _pair_mxfp4(self) -> None:
        """Present every `X_blocks` / `X_scales` pair as the tensor X the model holds (bf16
        values, formats/mxfp4.py); ConvertError naming the tensor for half a pair."""
        for name, t in list(self.tensors.items()):
            if not name.endswith(mxfp4.BLOCKS_SUFFIX):
                continue
            base = name.removesuffix(mxfp4.BLOCKS_SUFFIX)
            sc = self.tensors.get(base + mxfp4.SCALES_SUFFIX)
            if sc is None:
                raise ConvertError(f"{t.path}: {name} has no {base}{mxfp4.SCALES_SUFFIX}")
            if t.dtype != "u8" or sc.dtype != "u8" or len(t.shape) != 4 or t.shape[:-1] != sc.shape \
                    or t.shape[-1] != mxfp4.BLOCK // 2:
                raise ConvertError(f"{t.path}: {name} {list(t.shape)} ({t.dtype}) and {sc.name} {list(sc.shape)} "
                                   f"({sc.dtype}) are not MXFP4 blocks [E, R, G, 16] and exponents [E, R, G] of bytes")
            e, r, g, _ = t.shape
            self.tensors[base] = TensorInfo(base, t.path, "bf16", (e, g * mxfp4.BLOCK, r), t.offset,
                                            t.length + sc.length, mxfp4=Mxfp4Tensor(t, sc))
            del self.tensors[name], self.tensors[sc.name]
        for name, t in self.tensors.items():
            if t.dtype in FP8_FORMATS.values():
                raise ConvertError(f"{t.path}: {name} is float8, but {self.root / 'config.json'} declares "
                                   "quant_method mxfp4")
            if t.dtype == "u8":
                raise ConvertError(f"{t.path}: {name} is a uint8 tensor without its MXFP4 "
                                   f"{'blocks' if name.endswith(mxfp4.SCALES_SUFFIX) else 'exponents'}")

    def _pair_fp8_scales(self) -> Optional[tuple[int, int]]:
        """Join every FP8 weight to its `_scale_inv` tensor (which then is no tensor of its own);
        ConvertError naming the tensor for a weight without its multipliers, multipliers of the
        wrong shape or without an FP8 weight, or FP8 weights in a checkpoint whose config does not
        declare fp8 block quantization."""
        where = str(self.root / "config.json")
        fp8 = [t for t in self.tensors.values() if t.dtype in FP8_FORMATS.values()]
        block = block_size(self.config, where)
        if fp8 and block is None:
            raise ConvertError(f"{fp8[0].path}: {fp8[0].name} is float8, but {where} declares no "
                               "quantization_config with its weight_block_size")
        want = FP8_FORMATS[self.config["quantization_config"].get("fmt", "e4m3")] if block else None
        for t in fp8:
            if t.dtype != want:
                raise ConvertError(f"{t.path}: {t.name} is {t.dtype}; {where} declares {want} weights")
            if len(t.shape) != 2:
                raise ConvertError(f"{t.path}: {t.name} is float8 with shape {list(t.shape)}; block-scaled FP8 "
                                   "weights are matrices")
            scale = self.tensors.get(t.name + SCALE_SUFFIX)
            if scale is None:
                raise ConvertError(f"{t.path}: {t.name} is float8 but the checkpoint has no {t.name}{SCALE_SUFFIX}")
            if scale.dtype not in ("fp32", "bf16", "fp16") or scale.shape != scale_shape(t.shape, block):
                raise ConvertError(f"{scale.path}: {scale.name} has shape {list(scale.shape)} ({scale.dtype}); "
                                   f"{t.name} {list(t.shape)} in {block[0]}x{block[1]} blocks needs "
                                   f"{list(scale_shape(t.shape, block))} of floats")
            self.tensors[t.name] = replace(t, dtype="fp32", fp8=Fp8Weight(t.dtype, scale, block))
            del self.tensors[scale.name]
        for name, t in list(self.tensors.items()):
            if name.endswith(SCALE_SUFFIX):
                raise ConvertError(f"{t.path}: {name} has no float8 weight {name.removesuffix(SCALE_SUFFIX)} to scale")
        return block if fp8 else None

    def _check_shard_path(self, index: Path, shard: str) -> None:
        """A shard named by the index must be a file inside the checkpoint directory: an index is
        input, and `../x/b.safetensors` or an absolute path would read weights from elsewhere."""
        rel = Path(shard)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ConvertError(f"{index}: shard {shard!r} lies outside the checkpoint directory {self.root}")
        path = self.root / rel
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except OSError as e:
            raise ConvertError(f"{index}: shard {shard!r}: {e.strerror}") from None
        if not inside:
            raise ConvertError(f"{index}: shard {shard!r} resolves outside the checkpoint directory {self.root}")
        if not path.is_file():
            raise ConvertError(f"{index}: shard {shard!r} is missing ({path})")

    def _scan(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) != 8:
                    raise ConvertError(f"{path}: too short to be a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise ConvertError(f"{path}: header length {n} is larger than the file")
                header = json.loads(f.read(n))
        except OSError as e:
            raise ConvertError(f"{path}: {e.strerror}") from None
        except ValueError as e:
            raise ConvertError(f"{path}: header is not JSON ({e})") from None
        base = 8 + n
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: header is a JSON {type(header).__name__}, not an object")
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict):
                raise ConvertError(f"{path}: tensor {name}: header entry is not an object")
            st = meta.get("dtype")
            if st in SAFETENSORS_DTYPES:
                dtype = SAFETENSORS_DTYPES[st]
            elif st in FP8_DTYPES:
                dtype = FP8_DTYPES[st]
            elif st == "U8" and self.mxfp4:
                dtype = "u8"        # MXFP4 blocks and exponents, paired in _pair_mxfp4
            else:
                raise ConvertError(f"{path}: tensor {name} has dtype {st}; supported: "
                                   f"{', '.join([*SAFETENSORS_DTYPES, *FP8_DTYPES])} (FP8 with block scales)")
            itemsize = DTYPE_ITEMSIZE.get(dtype, 1)
            offsets, shape = meta.get("data_offsets"), meta.get("shape")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
                raise ConvertError(f"{path}: tensor {name}: data_offsets missing or not two non-negative integers")
            if not (isinstance(shape, list) and all(_is_count(x) for x in shape)):
                raise ConvertError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
            begin, end = offsets
            shape = tuple(shape)
            if end < begin or end - begin != math.prod(shape) * itemsize or base + end > size:
                raise ConvertError(f"{path}: tensor {name} has inconsistent offsets")
            info = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
            wm = self._weight_map
            if wm is not None and name in wm:
                if self.root / wm[name] == path:
                    self.tensors[name] = info
                else:
                    self._elsewhere[name] = path      # the index names another shard's copy
                continue
            prev = self.tensors.get(name) or self._elsewhere.get(name)
            if prev is not None:
                where = prev.path if isinstance(prev, TensorInfo) else prev
                raise ConvertError(
                    f"tensor {name} is in both {where} and {path}, and "
                    + ("the index does not name it" if wm is not None else "there is no model.safetensors.index.json")
                    + " to say which copy is the model's")
            self.tensors[name] = info

    def row(self, name: str, index: int) -> TensorInfo:
        """Row `index` of tensor `name` along its first dimension (one expert of a fused [E, ...]
        tensor), as a TensorInfo of its own that `read_info` reads."""
        return self._row(self.info(name), index)

    def _row(self, t: TensorInfo, index: int) -> TensorInfo:
        name = t.name
        if t.fp8 is not None:
            raise ConvertError(f"{t.path}: {name} is a fused float8 tensor; FP8 is read for per-expert tensors only")
        if t.mxfp4 is not None:
            if not 0 <= index < t.shape[0]:
                raise ConvertError(f"{t.path}: {name} has shape {list(t.shape)}, no row {index}")
            parts = [self._row(p, index) for p in (t.mxfp4.blocks, t.mxfp4.scales)]
            return TensorInfo(f"{name}[{index}]", t.path, t.dtype, t.shape[1:], parts[0].offset,
                              parts[0].length + parts[1].length, mxfp4=Mxfp4Tensor(*parts))
        if not t.shape or not 0 <= index < t.shape[0]:
            raise ConvertError(f"{t.path}: {name} has shape {list(t.shape)}, no row {index}")
        row_bytes = t.length // t.shape[0]
        return TensorInfo(f"{name}[{index}]", t.path, t.dtype, t.shape[1:], t.offset + index * row_bytes, row_bytes)

    def read(self, name: str) -> np.ndarray:
        """The tensor's bit patterns (uint16 for bf16/fp16, uint32 for fp32), a new array."""
        return self.read_info(self.info(name))

    def read_info(self, t: TensorInfo) -> np.ndarray:
        """The bit patterns of the bytes `t` names (a tensor, or a row of one); for an FP8 weight
        the float32 bits of its dequantized values."""
        if t.mxfp4 is not None:
            b, sc = t.mxfp4.blocks, t.mxfp4.scales
            exps = self._read_bytes(sc)
            _check_exponents(exps, t)
            vals = mxfp4.dequantize(self._read_bytes(b).reshape(b.shape), exps.reshape(sc.shape))
            return float32_to_bits(vals.reshape(-1), "bf16")     # exact: every MXFP4 value is a bf16
        if t.fp8 is not None:
            s = t.fp8.scales
            vals = fp8_dequantize(self._read_bytes(t).reshape(t.shape), bits_to_float32(self.read_info(s), s.dtype)
                                  .reshape(s.shape), t.fp8.fmt, t.fp8.block, t.name, t.path)
            return vals.reshape(-1).view(np.uint32)
        return self._read_bytes(t).view(DTYPE_BITS_NUMPY[t.dtype])

    def read_planes(self, t: TensorInfo, group: int) -> bytes:
        """An FP8 weight as the payload of its float8 store type in groups of `group` along its
        rows (fp8.row_planes: its codes as they are, its block multipliers per group); an MXFP4
        tensor (one expert's row) as the mxfp4 payload of its transpose, the matrix whose rows its
        blocks run along: the blocks' bytes, then the exponents' bytes, as the checkpoint has them."""
        if t.mxfp4 is not None:
            if group != mxfp4.BLOCK or len(t.shape) != 2:
                raise ConvertError(f"{t.path}: {t.name} is MXFP4: its planes are one expert's matrix in groups of "
                                   f"{mxfp4.BLOCK}")
            blocks, exps = (self._read_bytes(p) for p in (t.mxfp4.blocks, t.mxfp4.scales))
            _check_exponents(exps, t)
            return blocks.tobytes() + exps.tobytes()
        if t.fp8 is None:
            raise ConvertError(f"{t.path}: {t.name} is {t.dtype}, not float8: it has no planes of its own")
        s = t.fp8.scales
        return fp8_row_planes(self._read_bytes(t).reshape(t.shape), bits_to_float32(self.read_info(s), s.dtype)
                              .reshape(s.shape), t.fp8.fmt, t.fp8.block, group, t.name, t.path)

    def _read_bytes(self, t: TensorInfo) -> np.ndarray:
        name = t.name
        buf = bytearray(t.length)
        with open(t.path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(buf)) if f.seek(t.offset) == t.offset else 0
        if got != t.length:
            raise ConvertError(f"{t.path}: short read of {name} at offset {t.offset}")
        return np.frombuffer(buf, dtype=np.uint8)

    def tokenizer_files(self) -> list[Path]:
        return [self.root / n for n in TOKENIZER_FILES if (self.root / n).is_file()]

    def config_label(self) -> str:
        """Where the config came from, for messages."""
        return str(self.root / "config.json")

    def copies(self) -> dict[str, bytes]:
        """The files a store carries beside its tensors (file name -> bytes): config.json and
        the tokenizer's files."""
        return {p.name: p.read_bytes() for p in [self.root / "config.json", *self.tokenizer_files()]}
