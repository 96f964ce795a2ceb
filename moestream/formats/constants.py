"""The expert-shard format, version 1: every constant in one place. docs/FORMAT.md describes the
same bytes in prose; change both together."""
from __future__ import annotations

import struct

import numpy as np

#: First 8 bytes of every file of a store.
MAGIC = b"MOESHRD\x00"
#: Versions this code reads and writes. A file with another version is refused.
FORMAT_VERSION = 1
#: Every extent, dense tensor and blob starts on this boundary and is zero-padded to a multiple
#: of it: O_DIRECT and GPUDirect Storage need block-aligned offsets and lengths.
ALIGNMENT = 4096
#: Bytes reserved at the start of each file for the preamble (one aligned block).
PREAMBLE_SIZE = 4096

#: Preamble layout (little-endian), at offset 0 of every file:
#:   magic[8] version:u32 preamble_size:u32 store_id[16] file_number:u32 file_count:u32
#:   index_offset:u64 index_length:u64 index_xxh3:u64 preamble_xxh3:u64
#: preamble_xxh3 covers bytes [0, 64). index_* are zero in every file but file 0.
PREAMBLE_STRUCT = struct.Struct("<8sII16sIIQQQ")
PREAMBLE_CHECKED_LENGTH = PREAMBLE_STRUCT.size  # 64
PREAMBLE_CHECKSUM_STRUCT = struct.Struct("<Q")  # at offset 64

#: Name of file number n inside a store directory.
FILE_NAME_PATTERN = "experts-{:05d}.moe"
#: Upper bound on the index size a reader accepts before reading it (bytes). An extent's entry
#: is ~450 bytes of JSON, so 32 MiB holds ~70k extents: 4x DeepSeek-V3 (58 x 256) and 3x Kimi-K2
#: (60 x 384). Parsing JSON costs ~30x its size in RAM, which a larger cap would let a hostile
#: header claim.
MAX_INDEX_LENGTH = 32 << 20

#: The most a zstd frame can expand: a 3-byte block header plus one RLE byte give a 128 KiB
#: block, so no frame decodes to more than 32768 times its size. A region whose declared
#: raw_length exceeds its stored length times this is refused before anything is allocated.
ZSTD_MAX_RATIO = 32768
#: Largest file a store carries as a blob (tokenizer and generation files are a few MiB).
MAX_BLOB_LENGTH = 256 << 20

#: Stored element types. bf16 has no numpy dtype: it travels as uint16 bit patterns.
DTYPES = ("bf16", "fp16", "fp32")
DTYPE_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_BITS_NUMPY = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.uint32}
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}

#: Quantization schemes for expert tensors ("keep" = store the source dtype unchanged).
QUANT_CHOICES = ("keep", "bf16", "fp16", "fp32", "int8", "int4")
INT_QUANTS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
DEFAULT_ZSTD_LEVEL = 3

#: Codec-chain stage names, in encode order. A chain is a list of these strings:
#:   "int8:G" | "int4:G"  group-wise quantization with G elements per group (absent: raw dtype)
#:   "delta"               arithmetic delta against the layer's base expert before quantization
#:   "xor-delta"           bitwise XOR against the layer's base expert (lossless stores)
#:   "shuffle"             byte-shuffle of each raw tensor plane (lossless stores)
#:   "zstd"                zstd frame over the whole payload
STAGE_DELTA = "delta"
STAGE_XOR_DELTA = "xor-delta"
STAGE_SHUFFLE = "shuffle"
STAGE_ZSTD = "zstd"

#: Quantization scale/min planes are stored as float16.
SCALE_DTYPE = np.float16


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Smallest multiple of `alignment` that is >= n."""
    return (n + alignment - 1) // alignment * alignment
