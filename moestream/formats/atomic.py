"""Output files written whole or not at all: a temporary file beside the target, fsynced, then
renamed over it. A failure (a full disk, Ctrl-C) removes the temporary file and leaves the old
target, or none, never half of one."""
from __future__ import annotations

import errno
import os
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a binary file that becomes `path` once it returns. OSError names `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, (BlockingIOError, InterruptedError)):
            raise OSError(e.errno or errno.EIO, e.strerror or str(e), path) from None
        raise
