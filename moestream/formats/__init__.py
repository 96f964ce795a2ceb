"""The expert-shard format: constants, index, codecs, writer, reader, HF converter."""
from .codecs import EncodeOptions, checksum, dequantize_torch
from .constants import ALIGNMENT, FORMAT_VERSION, MAGIC
from .convert import convert
from .index import Region, StoreIndex, TensorSlice
from .reader import StoreReader

__all__ = ["ALIGNMENT", "FORMAT_VERSION", "MAGIC", "EncodeOptions", "Region", "StoreIndex", "StoreReader",
           "TensorSlice", "checksum", "convert", "dequantize_torch"]
