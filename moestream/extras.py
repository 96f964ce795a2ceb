"""The optional dependencies (pyproject's extras) and the one-line error that names the install
command when a command needs one that is missing, checked before any work is done."""
from __future__ import annotations

import importlib.util

from .errors import UsageError

#: module -> the extra that installs it
EXTRAS = {"transformers": "hf", "fastapi": "serve", "uvicorn": "serve", "matplotlib": "test", "kvikio": "gpu"}


def require(module: str, what: str) -> None:
    """UsageError naming `what` needs and the pip line, when `module` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        extra = EXTRAS.get(module)
        how = f"pip install 'moestream[{extra}]'" if extra else f"pip install {module}"
        raise UsageError(f"{what} needs {module}, which is not installed ({how})")
