"""The store index: frozen dataclasses, their JSON form, and strict validation.

The index is UTF-8 JSON stored at the tail of file 0 (see docs/FORMAT.md). `StoreIndex.from_json`
trusts nothing: every number is range-checked against the files' real sizes before anything
is read or allocated from it."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import FormatError
from .families import FAMILIES, Family
from .constants import (ALIGNMENT, DTYPE_ITEMSIZE, DTYPES, FORMAT_VERSION, MAX_BLOB_LENGTH, PREAMBLE_SIZE, QuantSpec,
                        STAGE_DELTA, STAGE_SHUFFLE, STAGE_XOR_DELTA, STAGE_ZSTD, ZSTD_MAX_RATIO, align_up)


@dataclass(frozen=True)
class TensorSlice:
    """One tensor inside a region's decoded payload."""
    name: str
    dtype: str                 # dtype the reader returns ("bf16" for int-quantized tensors)
    shape: tuple[int, ...]
    offset: int                # bytes from the start of the decoded payload
    length: int                # bytes in the decoded payload (quantized planes + scales)
    #: in a quantized region: stored as its dtype's bytes, not quantized (a GPT-OSS expert's biases
    #: beside its MXFP4 matrices)
    raw: bool = False
    #: quantized, 2-D: the payload holds the [shape[1], shape[0]] transpose, whose rows the groups
    #: run along (a GPT-OSS expert's [in, out] matrices kept as the checkpoint's [out, in] blocks)
    transposed: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the matrix the payload holds (the transpose of `shape` when transposed)."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Region:
    """A contiguous run of stored bytes: an expert extent, a dense tensor, a base expert or a
    blob (tokenizer file). Starts at an ALIGNMENT boundary; padded with zeros to ALIGNMENT."""
    file: int                  # file number within the store
    offset: int                # byte offset in that file (multiple of ALIGNMENT)
    length: int                # stored bytes, before padding
    raw_length: int            # decoded payload bytes (after undoing zstd)
    checksum: str              # xxh3-64 of the stored bytes, 16 lowercase hex digits
    chain: tuple[str, ...]     # codec stages in encode order (constants.py)
    tensors: tuple[TensorSlice, ...] = ()
    source_length: int = 0     # bytes these tensors took in the source checkpoint (0: not tensors)

    @property
    def padded_length(self) -> int:
        return align_up(self.length)

    @property
    def decoded_length(self) -> int:
        """Bytes of this region's tensors once decoded (the dtype the reader returns)."""
        return sum(t.numel * DTYPE_ITEMSIZE[t.dtype] for t in self.tensors)

    def __hash__(self) -> int:
        # regions key the layout caches of every expert hand-out (formats/quantized.py): hashed
        # once, not at every lookup of every token (the fields' hash walks every tensor slice)
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.file, self.offset, self.length, self.raw_length, self.checksum, self.chain, self.tensors,
                      self.source_length))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        # not the cached hash: str hashes differ between processes
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "quant")}

    @functools.cached_property
    def quant(self) -> QuantSpec | None:
        """The quantization of the region's tensors, None for raw ones."""
        for stage in self.chain:
            spec = QuantSpec.parse(stage)
            if spec is not None:
                return spec
        return None

    def has(self, stage: str) -> bool:
        return stage in self.chain

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "offset": self.offset, "length": self.length,
                             "raw_length": self.raw_length, "checksum": self.checksum, "chain": list(self.chain)}
        if self.source_length:
            d["source_length"] = self.source_length
        if self.tensors:
            d["tensors"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                             "length": t.length, **({"raw": True} if t.raw else {}),
                             **({"transposed": True} if t.transposed else {})} for t in self.tensors]
        return d


@dataclass(frozen=True)
class StoreIndex:
    """Everything the index of a store says."""
    store_id: str
    architecture: str                      # family name: mixtral | qwen2_moe | qwen3_moe | olmoe
    config: dict[str, Any]                 # the Hugging Face config.json, verbatim
    moe_layers: tuple[int, ...]            # decoder layers that hold routed experts
    experts_per_layer: int
    expert_tensors: tuple[str, ...]        # names of an expert's tensors, e.g. ("w1", "w2", "w3")
    quant: str                             # quantization of expert tensors (constants.QUANT_CHOICES)
    group_size: int
    files: tuple[int, ...]                 # size in bytes of each file
    dense: dict[str, Region]
    extents: dict[tuple[int, int], Region]
    bases: dict[int, Region] = field(default_factory=dict)
    blobs: dict[str, Region] = field(default_factory=dict)
    source_bytes: int = 0                  # bytes of the converted tensors in the source checkpoint
    #: the family record of a store whose family has none in formats/families.py, derived from
    #: transformers at conversion (integrations/transformers.derive_family); None otherwise
    family: Optional[Family] = None

    @property
    def family_record(self) -> Family:
        """The store's family: the one it carries, else the record of its architecture."""
        if self.family is not None:
            return self.family
        if self.architecture not in FAMILIES:
            raise FormatError(f"index: architecture {self.architecture!r} has no family record in this moestream "
                              f"and the store carries none")
        return FAMILIES[self.architecture]

    def to_json(self) -> bytes:
        doc = {
            "format_version": FORMAT_VERSION,
            "store_id": self.store_id,
            "architecture": self.architecture,
            "config": self.config,
            "moe_layers": list(self.moe_layers),
            "experts_per_layer": self.experts_per_layer,
            "expert_tensors": list(self.expert_tensors),
            "quant": self.quant,
            "group_size": self.group_size,
            "source_bytes": self.source_bytes,
            **({"family": self.family.to_json()} if self.family is not None else {}),
            "files": [{"size": s} for s in self.files],
            "dense": {k: r.to_json() for k, r in self.dense.items()},
            "bases": {str(k): r.to_json() for k, r in self.bases.items()},
            "blobs": {k: r.to_json() for k, r in self.blobs.items()},
            "extents": [dict(layer=l, expert=e, **r.to_json()) for (l, e), r in sorted(self.extents.items())],
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()

    @staticmethod
    def from_json(data: bytes, *, path: str, offset: int, file_sizes: list[int]) -> "StoreIndex":
        """Parse and validate. `file_sizes` are the real sizes of the store's files on disk;
        every region must lie inside its file. Raises FormatError naming `path`/`offset`."""
        return _IndexParser(path, offset, file_sizes).parse(data)


class _IndexParser:
    def __init__(self, path: str, offset: int, file_sizes: list[int]):
        self.path, self.offset, self.file_sizes = path, offset, file_sizes

    def fail(self, msg: str, extent: tuple[int, int] | None = None) -> FormatError:
        return FormatError(f"index: {msg}", path=self.path, offset=self.offset, extent=extent)

    def get(self, d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(d, dict) or key not in d:
            raise self.fail(f"{where}: missing field {key!r}")
        v = d[key]
        if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise self.fail(f"{where}: field {key!r} must be an integer, got {type(v).__name__}")
        if not isinstance(v, typ):
            raise self.fail(f"{where}: field {key!r} has type {type(v).__name__}")
        return v

    def nonneg(self, d: Any, key: str, where: str) -> int:
        v = self.get(d, key, int, where)
        if v < 0 or v >= 1 << 62:
            raise self.fail(f"{where}: field {key!r} out of range: {v}")
        return v

    def parse(self, data: bytes) -> StoreIndex:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise self.fail(f"not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise self.fail("top level is not an object")
        version = self.get(doc, "format_version", int, "index")
        if version != FORMAT_VERSION:
            raise self.fail(f"format version {version} in the index, this moestream reads version {FORMAT_VERSION}")
        files = self.get(doc, "files", list, "index")
        if len(files) != len(self.file_sizes):
            raise self.fail(f"index lists {len(files)} files, the store has {len(self.file_sizes)}")
        for i, f in enumerate(files):
            size = self.nonneg(f, "size", f"files[{i}]")
            # file 0 grows by the index after the recorded size; others must match exactly
            if (i > 0 and size != self.file_sizes[i]) or (i == 0 and size > self.file_sizes[0]):
                raise self.fail(f"file {i} should be {size} bytes, it is {self.file_sizes[i]}")
        experts_per_layer = self.nonneg(doc, "experts_per_layer", "index")
        moe_layers = self.get(doc, "moe_layers", list, "index")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 20 for x in moe_layers):
            raise self.fail("moe_layers must be small non-negative integers")
        expert_tensors = self.get(doc, "expert_tensors", list, "index")
        if not expert_tensors or not all(isinstance(x, str) for x in expert_tensors):
            raise self.fail("expert_tensors must be a non-empty list of names")
        quant = self.get(doc, "quant", str, "index")
        group_size = self.nonneg(doc, "group_size", "index")
        regions: list[tuple[Region, str, tuple[int, int] | None]] = []

        def region(d: Any, where: str, extent: tuple[int, int] | None = None) -> Region:
            r = self.region(d, where, extent)
            regions.append((r, where, extent))
            return r

        def named(r: Region, names: tuple[str, ...], where: str, extent=None) -> Region:
            if tuple(t.name for t in r.tensors) != names:
                raise self.fail(f"{where}: holds tensors {[t.name for t in r.tensors]}, expected {list(names)}", extent)
            return r

        dense = {str(k): named(region(v, f"dense[{k!r}]"), (k,), f"dense[{k!r}]")
                 for k, v in self.get(doc, "dense", dict, "index").items()}
        bases = {}
        for k, v in self.get(doc, "bases", dict, "index").items():
            if not k.isdigit() or int(k) not in moe_layers:
                raise self.fail(f"bases: {k!r} is not a MoE layer")
            bases[int(k)] = named(region(v, f"bases[{k}]"), tuple(expert_tensors), f"bases[{k}]")
        blobs = {str(k): named(region(v, f"blobs[{k!r}]"), (), f"blobs[{k!r}]")
                 for k, v in self.get(doc, "blobs", dict, "index").items()}
        extents: dict[tuple[int, int], Region] = {}
        for i, d in enumerate(self.get(doc, "extents", list, "index")):
            layer = self.nonneg(d, "layer", f"extents[{i}]")
            expert = self.nonneg(d, "expert", f"extents[{i}]")
            key = (layer, expert)
            if layer not in moe_layers or expert >= experts_per_layer:
                raise self.fail(f"extents[{i}] names a layer/expert outside the model", key)
            if key in extents:
                raise self.fail(f"extents[{i}] is listed twice", key)
            r = named(region(d, f"extents[{i}]", key), tuple(expert_tensors), f"extents[{i}]", key)
            if r.has(STAGE_DELTA) or r.has(STAGE_XOR_DELTA):
                if layer not in bases:
                    raise self.fail("delta-coded extent but the layer has no base expert", key)
            extents[key] = r
        if len(extents) != len(moe_layers) * experts_per_layer:
            raise self.fail(f"{len(extents)} extents listed, expected {len(moe_layers)} layers x {experts_per_layer} experts")
        self.check_no_overlap(regions)
        architecture = self.get(doc, "architecture", str, "index")
        family = None
        if "family" in doc:
            try:
                family = Family.from_json(doc["family"], "family")
            except ValueError as e:
                raise self.fail(str(e)) from None
            if family.name != architecture or family.expert_tensors != tuple(expert_tensors) or not family.derived:
                raise self.fail(f"family: the record describes {family.name!r} with tensors {list(family.expert_tensors)}, "
                                f"the index {architecture!r} with {list(expert_tensors)}")
        return StoreIndex(
            store_id=self.get(doc, "store_id", str, "index"),
            architecture=architecture, family=family,
            config=self.get(doc, "config", dict, "index"),
            moe_layers=tuple(moe_layers), experts_per_layer=experts_per_layer,
            expert_tensors=tuple(expert_tensors), quant=quant, group_size=group_size,
            files=tuple(f["size"] for f in files), dense=dense, extents=extents, bases=bases, blobs=blobs,
            source_bytes=self.nonneg(doc, "source_bytes", "index"),
        )

    def region(self, d: Any, where: str, extent: tuple[int, int] | None) -> Region:
        file = self.nonneg(d, "file", where)
        off = self.nonneg(d, "offset", where)
        length = self.nonneg(d, "length", where)
        raw_length = self.nonneg(d, "raw_length", where)
        checksum = self.get(d, "checksum", str, where)
        chain = tuple(self.get(d, "chain", list, where))
        if file >= len(self.file_sizes):
            raise self.fail(f"{where}: file {file} does not exist", extent)
        if off % ALIGNMENT or off < PREAMBLE_SIZE:
            raise self.fail(f"{where}: offset {off} is not a {ALIGNMENT}-byte aligned data offset", extent)
        if off + align_up(length) > self.file_sizes[file]:
            raise self.fail(f"{where}: bytes [{off}, {off + align_up(length)}) run past the end of file {file} "
                            f"({self.file_sizes[file]} bytes)", extent)
        if len(checksum) != 16 or any(c not in "0123456789abcdef" for c in checksum):
            raise self.fail(f"{where}: bad checksum field {checksum!r}", extent)
        self.check_chain(chain, where, extent)
        if STAGE_ZSTD not in chain and raw_length != length:
            raise self.fail(f"{where}: raw_length {raw_length} != length {length} without zstd", extent)
        if STAGE_ZSTD in chain and raw_length > length * ZSTD_MAX_RATIO:
            raise self.fail(f"{where}: raw_length {raw_length} is more than a {length}-byte zstd frame can hold "
                            f"({ZSTD_MAX_RATIO}x)", extent)
        tensors = []
        pos = 0
        quant = next((QuantSpec.parse(stage) for stage in chain if ":" in stage), None)
        for j, t in enumerate(d.get("tensors", [])):
            tw = f"{where}.tensors[{j}]"
            name = self.get(t, "name", str, tw)
            dtype = self.get(t, "dtype", str, tw)
            if dtype not in DTYPES:
                raise self.fail(f"{tw}: unknown dtype {dtype!r}", extent)
            shape = self.get(t, "shape", list, tw)
            if len(shape) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape):
                raise self.fail(f"{tw}: bad shape {shape!r}", extent)
            t_off = self.nonneg(t, "offset", tw)
            t_len = self.nonneg(t, "length", tw)
            if t_off != pos:
                raise self.fail(f"{tw}: offset {t_off}, expected {pos} (tensors are packed in order)", extent)
            raw, transposed = (self.get(t, k, bool, tw) if k in t else False for k in ("raw", "transposed"))
            if (raw or transposed) and quant is None:
                raise self.fail(f"{tw}: '{'raw' if raw else 'transposed'}' is for a tensor of a quantized region", extent)
            if transposed and (raw or len(shape) != 2 or shape[0] % quant.group):
                raise self.fail(f"{tw}: a transposed tensor is a quantized matrix whose first dimension is a "
                                f"multiple of the group ({quant.group}); got shape {shape}", extent)
            want = payload_length(math.prod(shape), dtype, None if raw else quant)
            if t_len != want:
                raise self.fail(f"{tw}: length {t_len} does not match shape {shape} ({want} bytes)", extent)
            pos += t_len
            tensors.append(TensorSlice(name, dtype, tuple(shape), t_off, t_len, raw, transposed))
        if not tensors and raw_length > MAX_BLOB_LENGTH:
            raise self.fail(f"{where}: raw_length {raw_length} exceeds the {MAX_BLOB_LENGTH}-byte limit of a "
                            "carried file", extent)
        if tensors and pos != raw_length:
            raise self.fail(f"{where}: tensors cover {pos} bytes, raw_length is {raw_length}", extent)
        source_length = self.nonneg(d, "source_length", where) if "source_length" in d else 0
        return Region(file, off, length, raw_length, checksum, chain, tuple(tensors), source_length)

    def check_chain(self, chain: tuple[str, ...], where: str, extent: tuple[int, int] | None) -> None:
        order = []
        for stage in chain:
            if not isinstance(stage, str):
                raise self.fail(f"{where}: codec stage {stage!r} is not a string", extent)
            if ":" in stage:
                try:
                    QuantSpec.parse(stage)
                except ValueError:
                    raise self.fail(f"{where}: unknown codec stage {stage!r}", extent) from None
                order.append(0)
            elif stage in (STAGE_DELTA, STAGE_XOR_DELTA):
                order.append(1)
            elif stage == STAGE_SHUFFLE:
                order.append(2)
            elif stage == STAGE_ZSTD:
                order.append(3)
            else:
                raise self.fail(f"{where}: unknown codec stage {stage!r}", extent)
        if order != sorted(set(order)):
            raise self.fail(f"{where}: codec chain {list(chain)} is out of order or repeats a stage", extent)
        quantized = 0 in order
        if quantized and (STAGE_XOR_DELTA in chain or STAGE_SHUFFLE in chain):
            raise self.fail(f"{where}: xor-delta and shuffle apply to raw planes only: {list(chain)}", extent)
        if not quantized and STAGE_DELTA in chain:
            raise self.fail(f"{where}: arithmetic delta needs quantization: {list(chain)}", extent)

    def check_no_overlap(self, regions: list[tuple[Region, str, tuple[int, int] | None]]) -> None:
        spans = sorted((r.file, r.offset, r.offset + r.padded_length, where, ext) for r, where, ext in regions)
        for a, b in zip(spans, spans[1:]):
            if a[0] == b[0] and b[1] < a[2]:
                raise self.fail(f"{b[3]} overlaps {a[3]}", b[4])


def payload_length(numel: int, dtype: str, quant: QuantSpec | None) -> int:
    """Decoded bytes of one tensor: raw dtype bytes, or its quantized payload (QuantSpec)."""
    return numel * DTYPE_ITEMSIZE[dtype] if quant is None else quant.payload_length(numel)
