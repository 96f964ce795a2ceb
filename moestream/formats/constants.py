"""The expert-shard format, version 1: every constant in one place. docs/FORMAT.md describes the
same bytes in prose; change both together."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

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
INT_QUANTS = ("int8", "int4")   # the QUANT_TYPES (defined below) that convert --quant makes
#: Files of a checkpoint a store carries as blobs (and, as plain copies, next to its files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
#: The index's quant when experts differ (convert --profile): each extent's chain names its own
MIXED_QUANT = "mixed"
DEFAULT_GROUP_SIZE = 64
DEFAULT_ZSTD_LEVEL = 3
#: An expert extent keeps zstd (and the shuffle before it) only when that makes its 4096-padded
#: stored bytes at least this much smaller. Decoding costs CPU on the hot path of every miss,
#: and on NVMe it costs more than the read it saves: on the development machine a 6 MiB bf16
#: shuffle+zstd extent takes 8.9 ms to decode against 5.8 ms to read cold (docs/STORAGE.md), for
#: 11-30 % fewer bytes; a plain extent is read straight into its cache slot (CPU) or into device
#: memory (kvikio) and not decoded at all. Saving s pays when s > read bandwidth / decode
#: bandwidth of all decode threads, so 0.5 keeps zstd for what it halves (deltas of upcycled
#: experts, sparse or low-entropy tensors); 0 keeps it wherever it saves a page (slow disks).
DEFAULT_ZSTD_MIN_SAVING = 0.5

#: A quantized delta (against the layer's base expert) is kept only where its error is at most this
#: share of the plain extent's error: the tiers hold plain int extents as stored and the kernels
#: multiply them in place, while a delta extent decodes to bf16 on load (formats/quantized.py).
#: Upcycled experts' deltas are 10-100x more precise; independent experts' deltas only 1/E narrower.
DELTA_MAX_ERROR_RATIO = 0.5
#: ... and a quantized delta is encoded at all only where some tensor's ||w - base|| is at most this
#: share of ||w|| (the error follows the amplitude coded; independent experts sit at ~0.94-0.99)
DELTA_TRY_AMPLITUDE = 0.75
#: the converter computes a layer's base (a second read of the layer) only where the first
#: DELTA_PROBE_ELEMENTS of each tensor of DELTA_PROBE_EXPERTS experts say a delta could pay
DELTA_PROBE_ELEMENTS = 1 << 16
DELTA_PROBE_EXPERTS = 4

#: zstd is tried on a candidate payload only where ZSTD_PROBES slices of ZSTD_PROBE_BYTES spread over
#: it save at least the threshold (DEFAULT_ZSTD_MIN_SAVING or --zstd-min-saving) minus this margin
ZSTD_PROBES = 4
ZSTD_PROBE_BYTES = 64 << 10
ZSTD_PROBE_MARGIN = 0.15

#: fp16 scales keep 11 bits of precision only down to 2**-14; below that they are subnormal and lose
#: bits, and below 2**-24 they flush to zero (an int8 expert whose weights are all under ~7e-6, or an
#: int4 one whose range is under ~9e-7, would decode to zeros). An extent is stored unquantized, in
#: its source dtype, where its error with fp16 scales exceeds this multiple of the error the same
#: codes give with exact scales (`moestream inspect` counts such extents as "raw").
FP16_SCALE_MAX_ERROR_RATIO = 1.25
FP16_SMALLEST_NORMAL = 2.0 ** -14

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

@dataclass(frozen=True)
class QuantType:
    """One group-wise quantization type, the way ggml's type traits describe a block type: the
    bits of a code and the planes that follow the codes (one value per group each, of
    `plane_dtype`). A new type (fp8, mxfp4, a GGUF block type) is one entry here and one in
    compute/quant_kernels.py."""
    name: str
    bits: int                     # bits per code; codes of one group are packed low bits first
    planes: tuple[str, ...]       # planes after the codes, one value per group each
    formula: str                  # what a weight is, for docs and error messages
    plane_dtype: type = np.float16
    #: codes index a table of values (formats/codecs.code_values: float8 bytes, e2m1 nibbles), worth
    #: that value before their scale (the integer types' codes are their own values)
    float_codes: bool = False
    #: the scale plane holds E8M0 exponents (uint8 e: the scale is 2^(e - 127), 255 is NaN), as the
    #: OCP microscaling formats keep them
    e8m0_scales: bool = False

    @property
    def plane_bytes(self) -> int:
        return np.dtype(self.plane_dtype).itemsize

    def code_bytes(self, group: int) -> int:
        """Bytes of one group's codes."""
        return group * self.bits // 8

    def block_bytes(self, group: int) -> int:
        """Bytes one group takes in all (codes and its plane values)."""
        return self.code_bytes(group) + self.plane_bytes * len(self.planes)


#: The quantization types, by the name a chain stage uses ("int8:64").
QUANT_TYPES = {
    "int8": QuantType("int8", 8, ("scales",), "w = code * scale (code a signed byte, -127..127)"),
    "int4": QuantType("int4", 4, ("scales", "mins"), "w = code * scale + min (code 0..15, two a byte, low nibble first)"),
    # an FP8 block-scaled checkpoint's own bytes: its codes, and its fp32 block multipliers repeated
    # for each row of a block (the groups run along rows inside one block: formats/fp8.py)
    "fp8e4m3": QuantType("fp8e4m3", 8, ("scales",), "w = e4m3(code) * scale (an OCP E4M3FN byte, fp32 scale)",
                         np.float32, float_codes=True),
    "fp8e5m2": QuantType("fp8e5m2", 8, ("scales",), "w = e5m2(code) * scale (an OCP E5M2 byte, fp32 scale)",
                         np.float32, float_codes=True),
    # an MXFP4 checkpoint's own bytes (GPT-OSS): e2m1 codes two a byte (low nibble first), one E8M0
    # exponent per group of 32 (formats/mxfp4.py): 17 bytes per 32 weights
    "mxfp4": QuantType("mxfp4", 4, ("scales",), "w = e2m1(code) * 2^(scale - 127) (two codes a byte, low nibble first)",
                       np.uint8, float_codes=True, e8m0_scales=True),
}
#: the float8 types: kept as an FP8 checkpoint holds them (convert --quant keep), never produced by
#: quantizing (convert --quant takes INT_QUANTS)
FLOAT8_QUANTS = ("fp8e4m3", "fp8e5m2")
#: every type a checkpoint's own bytes are kept in (convert --quant keep), never made by quantizing
KEPT_QUANTS = (*FLOAT8_QUANTS, "mxfp4")


@dataclass(frozen=True)
class QuantSpec:
    """Group-wise quantization of one tensor, as its chain stage says ("int8:64"): `kind` one of
    QUANT_TYPES, `group` elements per group over the flattened tensor (even, 2..65536).

    Payload of a tensor of n elements, in this order: codes for whole groups (the last group
    padded) — int8 one signed byte per element, int4 and mxfp4 two per byte, low nibble first,
    float8 one byte per element — then one scale per group (fp16; float8: fp32; mxfp4: a uint8
    E8M0 exponent), then (int4 only) one fp16 minimum per group. Every reader and writer of these bytes takes the sizes from here."""
    kind: str
    group: int

    @staticmethod
    def parse(stage: str) -> Optional["QuantSpec"]:
        """The spec of a chain stage, None for a stage that is not a quantization; ValueError
        for a malformed one ("int4:7", "int3:64")."""
        kind, sep, group = stage.partition(":")
        if not sep:
            return None
        if kind not in QUANT_TYPES or not group.isdigit() or not 2 <= int(group) <= 1 << 16 or int(group) % 2:
            raise ValueError(f"unknown codec stage {stage!r}")
        return QuantSpec(kind, int(group))

    @property
    def stage(self) -> str:
        return f"{self.kind}:{self.group}"

    @property
    def type(self) -> QuantType:
        return QUANT_TYPES[self.kind]

    def groups(self, numel: int) -> int:
        return max(1, -(-numel // self.group))

    def code_bytes(self, numel: int) -> int:
        return self.groups(numel) * self.type.code_bytes(self.group)

    def row_aligned(self, shape: tuple[int, ...]) -> bool:
        """Whether every group of a tensor of `shape` lies inside one row (the last dimension is
        a multiple of the group): then its codes are a [rows, cols * bits / 8] matrix and its
        scales a [rows, cols / group] one, the layout the quantized matmul kernels read."""
        return len(shape) >= 2 and shape[-1] % self.group == 0

    def planes(self, numel: int) -> tuple[tuple[int, int], tuple[int, int], Optional[tuple[int, int]]]:
        """(start, end) byte ranges of the codes, scales and (int4) minimums in the payload."""
        c, g, b = self.code_bytes(numel), self.groups(numel), self.type.plane_bytes
        mins = (c + b * g, c + 2 * b * g) if "mins" in self.type.planes else None
        return (0, c), (c, c + b * g), mins

    def payload_length(self, numel: int) -> int:
        codes, scales, mins = self.planes(numel)
        return (mins or scales)[1]


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """Smallest multiple of `alignment` that is >= n."""
    return (n + alignment - 1) // alignment * alignment
