"""Writing numpy .npz files (routing traces, next-layer probes) so that a crash leaves the old
file or none, never half of one."""
from __future__ import annotations

import os

import numpy as np

from .atomic import write_atomic


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray], *, compressed: bool = False) -> None:
    """Write `arrays` to `path` through a temporary file beside it (formats/atomic.py)."""
    write_atomic(path, lambda f: (np.savez_compressed if compressed else np.savez)(f, **arrays))
