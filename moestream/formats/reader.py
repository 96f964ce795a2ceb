"""Reading a store: preamble and index validation, region reads, decoding to torch tensors.

Nothing here trusts the file: sizes are checked against the real file sizes before any read
or allocation, and each region's stored bytes are checked against its xxh3-64 (unless
verify=False)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ChecksumError, FormatError
from .codecs import Dequantizer, checksum, dequantize_torch, materialize, nonfinite_scales, unpack_payload
from .constants import (ALIGNMENT, FILE_NAME_PATTERN, FORMAT_VERSION, MAGIC, MAX_INDEX_LENGTH,
                        PREAMBLE_CHECKED_LENGTH, PREAMBLE_CHECKSUM_STRUCT, PREAMBLE_SIZE, PREAMBLE_STRUCT)
from .index import Region, StoreIndex

MAX_FILES = 100_000


def _pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    chunks, got = [], 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            raise FormatError(f"file ends before {length} bytes could be read", path=path, offset=offset + got)
        chunks.append(b)
        got += len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _read_preamble(fd: int, path: str, size: int) -> tuple:
    if size < PREAMBLE_SIZE:
        raise FormatError(f"file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble", path=path, offset=0)
    head = _pread_exact(fd, PREAMBLE_CHECKED_LENGTH + PREAMBLE_CHECKSUM_STRUCT.size, 0, path)
    magic, version, pre_size, store_id, number, count, ioff, ilen, isum = PREAMBLE_STRUCT.unpack_from(head)
    if magic != MAGIC:
        raise FormatError(f"not a moestream store file (magic {magic!r}, expected {MAGIC!r})", path=path, offset=0)
    if version != FORMAT_VERSION:
        raise FormatError(f"format version {version}; this moestream reads version {FORMAT_VERSION} "
                          "(upgrade moestream or convert the model again)", path=path, offset=8)
    (want,) = PREAMBLE_CHECKSUM_STRUCT.unpack_from(head, PREAMBLE_CHECKED_LENGTH)
    if int(checksum(head[:PREAMBLE_CHECKED_LENGTH]), 16) != want:
        raise ChecksumError("preamble checksum mismatch", path=path, offset=0)
    if pre_size != PREAMBLE_SIZE:
        raise FormatError(f"preamble size {pre_size}, expected {PREAMBLE_SIZE}", path=path, offset=12)
    return store_id, number, count, ioff, ilen, isum


class StoreReader:
    """A store opened for reading. Use as a context manager; thread-safe (reads use pread).

    verify: check each region's xxh3-64 before decoding it (default on)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        if not self.path.exists():
            raise FormatError("no such store", path=str(self.path))
        if not self.path.is_dir():
            raise FormatError("a store is a directory holding experts-NNNNN.moe files", path=str(self.path))
        self._fds: list[int] = []
        self._bases: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        first = self.path / FILE_NAME_PATTERN.format(0)
        if not first.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" (an unfinished conversion is in {partial})" if partial.exists() else ""
            raise FormatError(f"no {first.name} in the store{hint}", path=str(self.path))
        fd = self._open_fd(first)
        size = os.fstat(fd).st_size
        store_id, number, count, ioff, ilen, isum = _read_preamble(fd, str(first), size)
        if number != 0:
            raise FormatError(f"file number {number}, expected 0", path=str(first), offset=32)
        if not 1 <= count <= MAX_FILES:
            raise FormatError(f"file count {count} is not plausible (an unfinished write leaves 0)",
                              path=str(first), offset=36)
        if ilen > MAX_INDEX_LENGTH:
            raise FormatError(f"index of {ilen} bytes exceeds the {MAX_INDEX_LENGTH}-byte limit of the format",
                              path=str(first), offset=48)
        if ioff < PREAMBLE_SIZE or ioff % ALIGNMENT or ilen == 0 or ioff + ilen != size:
            raise FormatError(f"index at [{ioff}, {ioff + ilen}) does not end the {size}-byte file",
                              path=str(first), offset=40)
        sizes = [size]
        self.files = [first]
        for n in range(1, count):
            p = self.path / FILE_NAME_PATTERN.format(n)
            if not p.is_file():
                raise FormatError(f"store has {count} files but {p.name} is missing", path=str(self.path))
            fdn = self._open_fd(p)
            sz = os.fstat(fdn).st_size
            sid, num, cnt, *_ = _read_preamble(fdn, str(p), sz)
            if sid != store_id or num != n or cnt != count:
                raise FormatError(f"file belongs to another store or is out of place (number {num} of {cnt})",
                                  path=str(p), offset=16)
            sizes.append(sz)
            self.files.append(p)
        data = _pread_exact(fd, ilen, ioff, str(first))
        if int(checksum(data), 16) != isum:
            raise ChecksumError("index checksum mismatch", path=str(first), offset=ioff)
        self.index = StoreIndex.from_json(data, path=str(first), offset=ioff, file_sizes=sizes)
        if self.index.store_id != store_id.hex():
            raise FormatError("index store id differs from the preamble's", path=str(first), offset=ioff)
        self.file_sizes = sizes

    def _open_fd(self, p: Path) -> int:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", path=str(p)) from None
        self._fds.append(fd)
        return fd

    # ---- context -----------------------------------------------------------------------------
    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The model's Hugging Face config (dict)."""
        return self.index.config

    @property
    def architecture(self) -> str:
        return self.index.architecture

    @property
    def layers(self) -> list[int]:
        """Decoder layers that hold routed experts."""
        return list(self.index.moe_layers)

    @property
    def experts_per_layer(self) -> int:
        return self.index.experts_per_layer

    def extent(self, layer: int, expert: int) -> Region:
        """Where (layer, expert) is stored. KeyError-free: raises IndexError with the valid ranges."""
        try:
            return self.index.extents[(layer, expert)]
        except KeyError:
            raise IndexError(f"no expert ({layer}, {expert}): MoE layers {self.layers}, "
                             f"experts 0..{self.experts_per_layer - 1}") from None

    def file_path(self, region: Region) -> Path:
        return self.files[region.file]

    # ---- reads -------------------------------------------------------------------------------
    def _pread_region(self, region: Region) -> bytes:
        return _pread_exact(self._fds[region.file], region.length, region.offset, str(self.files[region.file]))

    def read_region(self, region: Region, extent: Optional[tuple[int, int]] = None) -> bytes:
        """The stored bytes of `region` (checksum-verified when verify=True)."""
        data = self._pread_region(region)
        if self.verify:
            self.check(region, data, extent)
        return data

    def check(self, region: Region, data, extent: Optional[tuple[int, int]] = None) -> None:
        """Raise ChecksumError naming file, offset and extent when `data` is not what was stored."""
        got = checksum(data)
        if got != region.checksum:
            raise ChecksumError(f"checksum mismatch (stored {region.checksum}, read {got})",
                                path=str(self.files[region.file]), offset=region.offset, extent=extent)

    def decode(self, region: Region, stored, extent: Optional[tuple[int, int]] = None, *,
               device: torch.device | str = "cpu", dequantize: Dequantizer = dequantize_torch,
               out: Optional[torch.Tensor] = None, alias: bool = False) -> dict[str, torch.Tensor]:
        """Decode stored bytes of `region` to named tensors on `device`: new tensors owned by
        the caller, or views of `out` (uint8, at least region.decoded_length bytes) written in
        place (codecs.materialize). `stored` may be a uint8 tensor in device memory when the
        region has no codec stage; with `alias` the tensors are then views of it."""
        if isinstance(stored, torch.Tensor) and stored.device.type != "cpu":
            if region.chain:
                raise ValueError(f"extent {extent}: codec stages {region.chain} are undone on the host; "
                                 "only plain extents can be decoded from device memory")
            payload = stored
        else:
            payload = unpack_payload(region, stored, path=str(self.files[region.file]), extent=extent)
        base = self.base(extent[0]) if extent is not None and extent[0] in self.index.bases else None
        return materialize(region, payload, base, dequantize=dequantize, device=device, out=out, alias=alias)

    def base(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's base expert (decoded once, cached on CPU)."""
        with self._lock:
            if layer not in self._bases:
                r = self.index.bases[layer]
                self._bases[layer] = self.decode(r, self.read_region(r))
            return self._bases[layer]

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors on CPU, named as in the source checkpoint (e.g. w1/w2/w3):
        the stored dtype for lossless stores, bf16 for int8/int4 stores."""
        r = self.extent(layer, expert)
        return self.decode(r, self.read_region(r, (layer, expert)), (layer, expert))

    def dense(self) -> dict[str, torch.Tensor]:
        """Every non-expert tensor (embeddings, attention, norms, routers, shared experts)."""
        out = {}
        for name, r in self.index.dense.items():
            out.update(self.decode(r, self.read_region(r)))
        return out

    def blob(self, name: str) -> bytes:
        """A file carried in the store (tokenizer files, generation_config.json)."""
        r = self.index.blobs[name]
        return bytes(unpack_payload(r, self.read_region(r), path=str(self.files[r.file])))

    def regions(self) -> Iterator[tuple[str, Region, Optional[tuple[int, int]]]]:
        """Every region with a label: ("dense NAME" | "base L" | "blob NAME" | "expert", region, extent)."""
        for name, r in self.index.dense.items():
            yield f"dense {name}", r, None
        for layer, r in self.index.bases.items():
            yield f"base {layer}", r, None
        for name, r in self.index.blobs.items():
            yield f"blob {name}", r, None
        for key, r in sorted(self.index.extents.items()):
            yield "expert", r, key

    def shape_problems(self) -> list[str]:
        """Tensors whose shapes disagree with the carried config (one line each), or the
        config's own problem; empty for a consistent store of a known family."""
        from .families import check_config
        where = f"{self.files[0]}: config"
        try:
            fam = self.index.family_record
            check_config(self.config, where, FormatError, family=self.index.family)
        except FormatError as e:
            return [str(e)]
        if self.config.get("model_type") != self.architecture:     # (fam.name is the architecture's)
            return [f"{where}: model_type {self.config.get('model_type')!r} but the index says {self.architecture!r}"]
        bad = []
        want = fam.expert_shapes(self.config)
        for (layer, expert), r in sorted(self.index.extents.items()):
            for t in r.tensors:
                if t.name in want and t.shape != want[t.name]:
                    bad.append(f"{self.files[r.file]}: offset {r.offset}: layer {layer} expert {expert}: tensor "
                               f"{t.name} has shape {list(t.shape)}, the config implies {list(want[t.name])}")
        dense = fam.dense_shapes(self.config, range(self.config["num_hidden_layers"]), self.layers)
        for name, r in self.index.dense.items():
            if name in dense and r.tensors and r.tensors[0].shape != dense[name]:
                bad.append(f"{self.files[r.file]}: offset {r.offset}: dense {name} has shape "
                           f"{list(r.tensors[0].shape)}, the config implies {list(dense[name])}")
        return bad

    def verify_all(self, dense_check=None) -> list[str]:
        """Check every region's checksum and decode its payload (zstd, shuffle) as a load would,
        parse carried JSON files, and check tensor shapes against the config; returns one line
        per problem (empty when all good). dense_check (convert.DenseCheck, given by the engine at
        the edge: `moestream verify` passes it) also checks that the dense tensors are the set the
        forward loads."""
        bad = self.shape_problems()
        if dense_check is not None and not bad:
            idx = self.index
            dense = {name: r.tensors[0].shape for name, r in idx.dense.items() if r.tensors}
            bad += [f"{self.files[0]}: dense tensors: {p}" for p in
                    dense_check(idx.architecture, self.config, tuple(idx.moe_layers), idx.experts_per_layer, dense)]
        for label, r, ext in self.regions():
            what = f"layer {ext[0]} expert {ext[1]}" if ext else label
            where = f"{self.files[r.file]}: offset {r.offset}: {what}"
            data = self._pread_region(r)
            if checksum(data) != r.checksum:
                bad.append(f"{where}: checksum mismatch")
                continue
            try:
                payload = unpack_payload(r, data, path=str(self.files[r.file]), extent=ext)
                if label.startswith("blob ") and label.endswith(".json"):
                    json.loads(payload.tobytes().decode("utf-8"))
                for name in nonfinite_scales(r, payload):
                    bad.append(f"{where}: tensor {name} has NaN or inf quantization scales or float8 codes")
            except FormatError as e:
                bad.append(f"{e} ({what})")
            except (UnicodeDecodeError, ValueError) as e:
                bad.append(f"{where}: carried file is not valid JSON ({e})")
        return bad
