"""Writing numpy .npz files (routing traces, next-layer probes) so that a crash leaves the old
file or none, never half of one."""
from __future__ import annotations

import os

import numpy as np


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray], *, compressed: bool = False) -> None:
    """Write `arrays` to `path` through a temporary file beside it, fsynced, then renamed over it."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
