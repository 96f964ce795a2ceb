"""Exceptions raised by moestream. Every user-facing failure is one of these."""
from __future__ import annotations


class MoestreamError(Exception):
    """Base class: the CLI prints these as one line, never as a traceback."""


class FormatError(MoestreamError):
    """A store file is malformed. The message names the file, the byte offset and, where
    known, the (layer, expert) extent."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 extent: tuple[int, int] | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if offset is not None:
            parts.append(f"offset {offset}")
        if extent is not None:
            parts.append(f"layer {extent[0]} expert {extent[1]}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.offset = offset
        self.extent = extent


class ChecksumError(FormatError):
    """Stored bytes do not match the checksum recorded in the index."""


class ConvertError(MoestreamError):
    """A checkpoint cannot be converted (unsupported architecture, missing tensor, ...)."""


class BudgetError(MoestreamError):
    """A memory budget is too small for the work asked of it."""


class StoreIOError(MoestreamError):
    """A read failed (EIO, short read past end of file, misaligned O_DIRECT request)."""


class ReadCancelled(StoreIOError):
    """A read whose requester withdrew it before it reached the disk (a wrong prefetch guess)."""


class UsageError(MoestreamError, ValueError):
    """An argument is out of its domain (a NaN budget, a bool as an expert index, an unknown
    device). Also a ValueError, so callers that caught ValueError before still do."""
