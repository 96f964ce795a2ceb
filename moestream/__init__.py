"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from NVMe."""
from .errors import BudgetError, ChecksumError, ConvertError, FormatError, MoestreamError, StoreIOError
from .formats import StoreReader, convert

__version__ = "0.1.0"
__all__ = ["BudgetError", "ChecksumError", "ConvertError", "FormatError", "MoestreamError", "StoreIOError",
           "StoreReader", "convert", "__version__"]
