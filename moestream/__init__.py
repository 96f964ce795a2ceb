"""moestream: run Mixture-of-Experts models larger than memory by streaming experts from NVMe."""
from .errors import BudgetError, ChecksumError, ConvertError, FormatError, MoestreamError, StoreIOError
from .formats import StoreReader, convert
from .storage import Store, open

__version__ = "0.1.0"
__all__ = ["BudgetError", "ChecksumError", "ConvertError", "FormatError", "MoestreamError", "StoreIOError",
           "Store", "StoreReader", "convert", "open", "__version__"]
