"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from NVMe."""
from .errors import BudgetError, ChecksumError, ConvertError, FormatError, MoestreamError, StoreIOError, UsageError
import functools as _functools

from .formats import StoreReader
from .formats import convert as _convert
from .storage import Store, open

__version__ = "0.1.0"
__all__ = ["BudgetError", "ChecksumError", "ConvertError", "FormatError", "MoestreamError", "StoreIOError", "UsageError",
           "Store", "StoreReader", "convert", "from_pretrained", "load_model", "open", "__version__"]


@_functools.wraps(_convert)
def convert(src, out, **options):
    # the converter checks the dense tensors against the engine that will load the store
    # (formats cannot import the models): a store that converts is one that loads
    # and a family with no record of ours is derived from transformers' own model class
    from .engines import dense_problems, derive_family
    options.setdefault("dense_check", dense_problems)
    options.setdefault("derive_family", derive_family)
    return _convert(src, out, **options)


def __getattr__(name: str):
    # load_model pulls in the model families and the Numba kernels: imported on first use, so
    # that `import moestream` (a weight store for another engine) stays light
    if name == "load_model":
        from .compute.loader import load_model
        return load_model
    if name == "from_pretrained":   # a transformers model whose experts stream from the store (the hf extra)
        from .integrations.transformers import from_store
        return from_store
    raise AttributeError(f"module 'moestream' has no attribute {name!r}")
