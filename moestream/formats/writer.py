"""Atomic, resumable writing of a store directory.

A store is written under `OUT.partial/` and renamed to `OUT` only after every file and the
index are fsynced, so a crash never leaves something at `OUT` that looks valid. Progress is
journaled (`journal.json`, replaced atomically) after each unit of work (the dense section, each
layer); a conversion started again with the same source and options resumes after the last
journaled unit, truncating whatever was written after it."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from ..errors import ConvertError, FormatError

from .codecs import EncodedRegion, checksum
from .constants import (ALIGNMENT, FILE_NAME_PATTERN, FORMAT_VERSION, MAGIC, PREAMBLE_CHECKSUM_STRUCT, PREAMBLE_SIZE,
                        PREAMBLE_STRUCT, TOKENIZER_FILES, align_up)
from .index import Region, StoreIndex, _IndexParser

JOURNAL = "journal.json"
#: What a staging directory may hold: anything else means it is not ours to delete.
#: Plain copies of the source's config and tokenizer files that a finished store also holds, so
#: that transformers' AutoTokenizer / AutoConfig.from_pretrained(store) work. The store's own
#: (checksummed) copies are its carried blobs; readers never use these.
PLAIN_COPIES = ("config.json",) + TOKENIZER_FILES
_STAGING_NAMES = (JOURNAL, JOURNAL + ".tmp") + PLAIN_COPIES


class ConversionLock:
    """An exclusive flock on `OUT.lock` held for a whole conversion (staging, resume, the final
    rename), so two conversions into one OUT cannot interleave their writes. A second writer
    gets a ConvertError naming the pid that holds the lock; it never waits. The lock file is
    removed on release; a writer that opened it just before checks, after locking, that the
    path still names the file it locked, and starts over otherwise."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out).with_name(Path(out).name + ".lock")
        self._fd: Optional[int] = None

    def acquire(self) -> "ConversionLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConvertError(f"{self.path.with_suffix('')}: another conversion (pid {holder}) is writing "
                                       f"this store; wait for it to finish or stop it") from None
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the holder removed it between our open and our lock: try again

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ConversionLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory whose first file starts with the store magic (any
    version): the only thing --overwrite may replace."""
    first = Path(path) / FILE_NAME_PATTERN.format(0)
    try:
        with open(first, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def pack_preamble(store_id: bytes, file_number: int, file_count: int, index_offset: int = 0,
                  index_length: int = 0, index_checksum: int = 0) -> bytes:
    """The PREAMBLE_SIZE bytes at offset 0 of every file (constants.PREAMBLE_STRUCT)."""
    head = PREAMBLE_STRUCT.pack(MAGIC, FORMAT_VERSION, PREAMBLE_SIZE, store_id, file_number, file_count,
                                index_offset, index_length, index_checksum)
    head += PREAMBLE_CHECKSUM_STRUCT.pack(int(checksum(head), 16))
    return head + bytes(PREAMBLE_SIZE - len(head))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Appends aligned regions to the files of a store being written."""

    def __init__(self, out: Path, *, fingerprint: str, max_file_size: Optional[int] = None):
        self.out = Path(out)
        self.staging = self.out.with_name(self.out.name + ".partial")
        self.max_file_size = max_file_size
        self.fingerprint = fingerprint
        self._reset_regions()
        self.resumed = False
        journal = self.staging / JOURNAL
        state = None
        #: why an interrupted conversion could not be resumed (it starts over), or None
        self.restart_reason: Optional[str] = None
        if journal.is_file():
            try:
                state = json.loads(journal.read_text())
            except (OSError, ValueError):
                state = None
                self.restart_reason = f"{journal} is not readable JSON"
        if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
            problem = self._missing_data(state)
            if problem is None:
                try:
                    self._restore(state)
                except (KeyError, TypeError, ValueError, IndexError, FormatError) as e:
                    problem = f"{journal} is malformed ({type(e).__name__}: {e})"
            self.restart_reason = problem
        elif state is not None and not isinstance(state, dict):  # other options: a deliberate restart
            self.restart_reason = f"{journal} is not a journal"
        if not self.resumed:
            if self.staging.exists():
                _check_staging_is_ours(self.staging)
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True)
            self.store_id = uuid.uuid4().bytes
            self._reset_regions()   # a restore that failed half-way may have filled some
        self._fh = None
        self._open_current()

    # ---- journal -----------------------------------------------------------------------------
    def _reset_regions(self) -> None:
        self.dense: dict[str, Region] = {}
        self.bases: dict[int, Region] = {}
        self.blobs: dict[str, Region] = {}
        self.extents: dict[tuple[int, int], Region] = {}
        self.units: list[str] = []
        self.file_sizes: list[int] = []

    def _missing_data(self, state: dict[str, Any]) -> Optional[str]:
        """Why the journaled files cannot be resumed from (a file deleted or cut short), or None."""
        sizes = state.get("files")
        if not isinstance(sizes, list):
            return "the journal lists no files"
        for i, size in enumerate(sizes):
            p = self.staging / FILE_NAME_PATTERN.format(i)
            if not p.is_file():
                return f"{p} is missing"
            if not isinstance(size, int) or p.stat().st_size < size:
                return f"{p} is shorter than the journal records"
        return None

    def _restore(self, state: dict[str, Any]) -> None:
        self.store_id = bytes.fromhex(state["store_id"])
        self.units = list(state["units"])
        self.file_sizes = list(state["files"])
        names = {FILE_NAME_PATTERN.format(i) for i in range(len(self.file_sizes))}
        for p in self.staging.iterdir():
            if p.name.endswith(".moe") and p.name not in names:
                p.unlink()
        for i, size in enumerate(self.file_sizes):
            with open(self.staging / FILE_NAME_PATTERN.format(i), "r+b") as f:
                f.truncate(size)
        parser = _IndexParser(str(self.staging / JOURNAL), 0, self.file_sizes)
        r = state["regions"]
        self.dense = {k: parser.region(v, k, None) for k, v in r["dense"].items()}
        self.bases = {int(k): parser.region(v, k, None) for k, v in r["bases"].items()}
        self.blobs = {k: parser.region(v, k, None) for k, v in r["blobs"].items()}
        self.extents = {(d["layer"], d["expert"]): parser.region(d, "extent", None) for d in r["extents"]}
        self.resumed = True   # only once everything was restored

    def done(self, unit: str) -> bool:
        """True when `unit` was completed by an earlier (interrupted) run."""
        return unit in self.units

    def checkpoint(self, unit: str) -> None:
        """Make everything written so far durable and record `unit` as complete."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.file_sizes[-1] = self._fh.tell()
        self.units.append(unit)
        state = {
            "fingerprint": self.fingerprint, "store_id": self.store_id.hex(), "units": self.units,
            "files": self.file_sizes,
            "regions": {
                "dense": {k: v.to_json() for k, v in self.dense.items()},
                "bases": {str(k): v.to_json() for k, v in self.bases.items()},
                "blobs": {k: v.to_json() for k, v in self.blobs.items()},
                "extents": [dict(layer=l, expert=e, **v.to_json()) for (l, e), v in self.extents.items()],
            },
        }
        tmp = self.staging / (JOURNAL + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(state))     # one string: json.dump's many small writes cost ~10x more
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.staging / JOURNAL)
        _fsync_dir(self.staging)

    # ---- data --------------------------------------------------------------------------------
    def _open_current(self) -> None:
        if not self.file_sizes:
            self._new_file()
            return
        n = len(self.file_sizes) - 1
        self._fh = open(self.staging / FILE_NAME_PATTERN.format(n), "r+b")
        self._fh.seek(self.file_sizes[-1])

    def _new_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.file_sizes[-1] = self._fh.tell()
            self._fh.close()
        n = len(self.file_sizes)
        self._fh = open(self.staging / FILE_NAME_PATTERN.format(n), "w+b")
        self._fh.write(pack_preamble(self.store_id, n, 0))  # file_count is patched by finish()
        self.file_sizes.append(PREAMBLE_SIZE)

    def _append(self, enc: EncodedRegion, source_length: int = 0) -> Region:
        padded = align_up(len(enc.stored))
        pos = self._fh.tell()
        if self.max_file_size and pos > PREAMBLE_SIZE and pos + padded > self.max_file_size:
            self._new_file()
            pos = self._fh.tell()
        self._fh.write(enc.stored)
        self._fh.write(bytes(padded - len(enc.stored)))
        self.file_sizes[-1] = pos + padded
        return Region(len(self.file_sizes) - 1, pos, len(enc.stored), enc.raw_length, enc.xxh3 or checksum(enc.stored),
                      enc.chain, enc.tensors, source_length)

    def add_dense(self, name: str, enc: EncodedRegion, source_length: int) -> None:
        self.dense[name] = self._append(enc, source_length)

    def add_base(self, layer: int, enc: EncodedRegion) -> None:
        self.bases[layer] = self._append(enc)

    def add_blob(self, name: str, enc: EncodedRegion) -> None:
        self.blobs[name] = self._append(enc)

    def add_extent(self, layer: int, expert: int, enc: EncodedRegion, source_length: int) -> Region:
        r = self.extents[(layer, expert)] = self._append(enc, source_length)
        return r

    # ---- finish ------------------------------------------------------------------------------
    def finish(self, plain_copies: Optional[dict[str, bytes]] = None, **index_fields: Any) -> Path:
        """Write the index into file 0, patch every preamble, write `plain_copies` (name ->
        bytes; names from PLAIN_COPIES), fsync, and rename the staging directory to the final
        name. Returns the store path."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.file_sizes[-1] = self._fh.tell()
        self._fh.close()
        self._fh = None
        count = len(self.file_sizes)
        index = StoreIndex(store_id=self.store_id.hex(), files=tuple(self.file_sizes), dense=self.dense,
                           extents=self.extents, bases=self.bases, blobs=self.blobs, **index_fields)
        data = index.to_json()
        index_offset = align_up(self.file_sizes[0], ALIGNMENT)
        for n in range(count):
            with open(self.staging / FILE_NAME_PATTERN.format(n), "r+b") as f:
                if n == 0:
                    f.seek(index_offset)
                    f.write(data)
                    f.truncate(index_offset + len(data))
                    pre = pack_preamble(self.store_id, 0, count, index_offset, len(data), int(checksum(data), 16))
                else:
                    pre = pack_preamble(self.store_id, n, count)
                f.seek(0)
                f.write(pre)
                f.flush()
                os.fsync(f.fileno())
        for name, data in (plain_copies or {}).items():
            if name not in PLAIN_COPIES:
                raise ValueError(f"{name}: not a plain copy a store holds ({', '.join(PLAIN_COPIES)})")
            with open(self.staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        (self.staging / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(self.staging)
        old = None
        if self.out.exists():  # --overwrite: the old store stays whole until the new one is in place
            if not is_store(self.out):  # checked by convert() too; the store may have changed since
                raise ConvertError(f"{self.out}: is not a moestream store; not replacing it "
                                   f"(the new store is complete in {self.staging})")
            old = self.out.with_name(f"{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.out, old)
        os.rename(self.staging, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def abandon(self) -> None:
        """Close files, keeping the staging directory so that a later run can resume."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _check_staging_is_ours(staging: Path) -> None:
    """Refuse to delete a staging path that holds anything a conversion does not write."""
    if not staging.is_dir():
        raise ConvertError(f"{staging}: exists and is not a conversion's staging directory; move it away")
    for p in staging.iterdir():
        if not (p.name in _STAGING_NAMES or (p.name.startswith("experts-") and p.name.endswith(".moe"))):
            raise ConvertError(f"{staging}: holds {p.name!r}, which no conversion writes; not deleting it "
                               "(move it away)")
