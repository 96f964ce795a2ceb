"""A quantized tensor held in its stored form: views of its codes and fp16 planes, and the
shape they decode to. The tiers hold int8/int4 experts this way (no bf16 copy), and the
quantized matmul kernels of compute/quant_kernels.py multiply them where they lie.

Which extents are held so (`holds_quantized`) is a fact of the format: a quantized extent
whose tensors' groups lie inside their rows (QuantSpec.row_aligned) and that is not coded as a
delta against its layer's base expert. A delta extent still decodes to bf16 once, on load:
its weights are base + dequant(codes), and the base is a bf16 tensor per layer that a kernel
would have to read beside every expert's codes (delta is kept by the converter only where it
makes an extent smaller, i.e. for upcycled experts; random and trained experts never take it)."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .codecs import TORCH_DTYPES, TORCH_PLANE_DTYPES
from .constants import QUANT_TYPES, STAGE_DELTA, QuantSpec
from .index import Region, TensorSlice

#: the torch dtype of each float8 type's codes
FLOAT8_TORCH = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}


class QuantizedTensor:
    """One tensor of `shape` [out, in] in the layout of `spec` (constants.QuantSpec):
    `codes` uint8 [out, in * bits / 8], `scales` (and for int4 `mins`) float16 [out, in / group].
    The views belong to whoever handed the tensor out (a cache slot: read-only, valid while this
    object lives).

    Made from its three views, or (`in_payload`, what the tiers hand out for every expert of every
    token) from one uint8 payload and the planes' byte offsets in it: the views are then made
    only when asked for, and a kernel that reads by address (`addresses`) never makes them.

    `transposed`: the model's tensor is this matrix's transpose ([in, out], as GPT-OSS keeps its
    experts; TensorSlice.transposed): `shape`, the codes and `dequantize` are still the stored
    [out, in] matrix, which is what y = x · Wᵀ multiplies."""
    __slots__ = ("spec", "shape", "transposed", "_payload", "_offsets", "_codes", "_scales", "_mins", "_base")

    def __init__(self, spec: QuantSpec, shape: tuple[int, int], codes: torch.Tensor, scales: torch.Tensor,
                 mins: Optional[torch.Tensor]):
        self.spec, self.shape, self.transposed = spec, tuple(shape), False
        self._payload = self._offsets = self._base = None
        self._codes, self._scales, self._mins = codes, scales, mins

    @classmethod
    def in_payload(cls, spec: QuantSpec, shape: tuple[int, int], payload: torch.Tensor,
                   offsets: tuple[int, int, Optional[int]], transposed: bool = False,
                   base: Optional[int] = None) -> "QuantizedTensor":
        """The tensor whose codes, scales and mins start at byte `offsets` of `payload` (uint8, 1-D,
        kept alive by the result); `base`: payload.data_ptr() when the caller has it."""
        self = cls.__new__(cls)
        self.spec, self.shape, self.transposed = spec, tuple(shape), transposed
        self._payload, self._offsets, self._base = payload, offsets, base
        self._codes = self._scales = self._mins = None
        return self

    def _plane(self, i: int, dtype: torch.dtype, cols: int) -> Optional[torch.Tensor]:
        start = self._offsets[i]
        if start is None:
            return None
        rows = self.shape[0]
        n = rows * cols * dtype.itemsize
        return self._payload[start:start + n].view(dtype).view(rows, cols)

    @property
    def _plane_dtype(self) -> torch.dtype:
        return TORCH_PLANE_DTYPES[self.spec.type.plane_dtype]

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            self._codes = self._plane(0, torch.uint8, self.shape[1] * self.spec.type.bits // 8)
        return self._codes

    @property
    def scales(self) -> torch.Tensor:
        if self._scales is None:
            self._scales = self._plane(1, self._plane_dtype, self.shape[1] // self.spec.group)
        return self._scales

    @property
    def mins(self) -> Optional[torch.Tensor]:
        if self._mins is None and self._payload is not None:
            self._mins = self._plane(2, self._plane_dtype, self.shape[1] // self.spec.group)
        return self._mins

    @property
    def device(self) -> torch.device:
        return (self._payload if self._payload is not None else self._codes).device

    @property
    def is_cpu(self) -> bool:
        return (self._payload if self._payload is not None else self._codes).is_cpu

    @property
    def contiguous(self) -> bool:
        """Whether codes and planes are dense row-major (always, for the stored layout)."""
        return self._payload is not None or all(t is None or t.is_contiguous()
                                                for t in (self._codes, self._scales, self._mins))

    def addresses(self) -> tuple[int, int, int]:
        """Addresses of the codes, scales and mins (0 without mins): for kernels that read by address."""
        if self._payload is not None:
            if self._base is None:
                self._base = self._payload.data_ptr()
            base = self._base
            c, sc, mn = self._offsets
            return base + c, base + sc, base + mn if mn is not None else 0
        return (self._codes.data_ptr(), self._scales.data_ptr(),
                self._mins.data_ptr() if self._mins is not None else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and planes (what a matmul reads)."""
        rows, cols = self.shape
        qtype = self.spec.type
        return rows * (cols * qtype.bits // 8 + (cols // self.spec.group) * qtype.plane_bytes * len(qtype.planes))

    def dequantize(self, dequantize, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weights [out, in] in `dtype` (a new tensor), by `dequantize` (a codecs.Dequantizer)."""
        flat = lambda t: t.reshape(-1).view(torch.uint8) if t is not None else None   # noqa: E731
        numel = self.shape[0] * self.shape[1]
        return dequantize(flat(self.codes), flat(self.scales), flat(self.mins), quant=self.spec.kind,
                          group_size=self.spec.group, numel=numel, out_dtype=dtype).view(self.shape)


@functools.lru_cache(maxsize=4096)
def holds_quantized(region: Region) -> bool:
    """Whether the tiers may hold `region` in its stored (quantized) form: a quantized extent, not
    a delta, every quantized tensor a matrix whose groups lie inside its (stored) rows and whose
    planes start on a multiple of their item size (they are viewed as float16 / float32 in place);
    its raw tensors (TensorSlice.raw) start on a multiple of theirs."""
    q = region.quant
    if q is None:
        return False
    size = q.type.plane_bytes
    return (not region.has(STAGE_DELTA) and any(not t.raw for t in region.tensors)
            and all((t.offset % TORCH_DTYPES[t.dtype].itemsize == 0) if t.raw else
                    (len(t.shape) == 2 and q.row_aligned(t.stored_shape) and t.offset % size == 0
                     and q.code_bytes(t.numel) % size == 0) for t in region.tensors))


def quantized_views(region: Region, payload: torch.Tensor) -> dict[str, "QuantizedTensor | torch.Tensor"]:
    """The tensors of a region that `holds_quantized`, over its decoded payload (uint8, 1-D, at
    least raw_length bytes; on any device): QuantizedTensors, and plain tensors for its raw ones.
    Nothing is copied; the results keep `payload` alive."""
    out: dict[str, QuantizedTensor | torch.Tensor] = {}
    base = payload.data_ptr()
    for name, spec, shape, offsets, transposed, dtype in plane_layout(region):
        if spec is None:
            n = math.prod(shape) * dtype.itemsize
            out[name] = payload[offsets:offsets + n].view(dtype).view(shape)
        else:
            out[name] = QuantizedTensor.in_payload(spec, shape, payload, offsets, transposed, base)
    return out


@functools.lru_cache(maxsize=4096)
def plane_layout(region: Region) -> tuple:
    """(name, spec, stored shape, plane offsets, transposed, dtype) of each tensor of a region
    that holds_quantized, offsets in bytes from its payload's start: (codes, scales, mins or None)
    for a quantized tensor (spec set, dtype None), the tensor's own offset for a raw one (spec
    None). Worked out once per region, not at every hand-out of every expert."""
    q = region.quant
    assert q is not None
    out = []
    for t in region.tensors:
        if t.raw:
            out.append((t.name, None, tuple(t.shape), t.offset, False, TORCH_DTYPES[t.dtype]))
            continue
        codes, scales, mins = q.planes(t.numel)
        out.append((t.name, q, tuple(t.stored_shape),
                    (t.offset + codes[0], t.offset + scales[0], t.offset + mins[0] if mins else None),
                    t.transposed, None))
    return tuple(out)


def _mxfp4_payload(g: torch.Tensor) -> bytes:
    """Groups [n, G] as MXFP4 checkpoints are made: each group's exponent the smallest power of two
    that brings its largest magnitude to e2m1's 6 or below, each weight the nearest e2m1 value."""
    from .mxfp4 import FP4_VALUES
    magnitudes = torch.from_numpy(FP4_VALUES[:8])
    amax = g.abs().amax(1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[:, None]
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) | ((scaled < 0).long() << 3)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    return packed.numpy().tobytes() + (exp + 127).to(torch.uint8).numpy().tobytes()


def quantize_matrix(w: torch.Tensor, kind: str, group: int = 64) -> QuantizedTensor:
    """A float matrix [out, in] quantized the way the converter does (codecs.quantize), as a
    QuantizedTensor over a new buffer owned by the result (for tests and benchmarks). A float8
    kind, which the converter only keeps, is made the way FP8 checkpoints are: each group scaled
    to the format's largest finite value, then rounded to float8 by torch; mxfp4 the way MXFP4
    checkpoints are (_mxfp4_payload)."""
    from .codecs import quantize
    rows, cols = w.shape
    if kind == "mxfp4":
        payload = _mxfp4_payload(w.float().reshape(-1, group))
    elif QUANT_TYPES[kind].float_codes:
        g = w.float().reshape(-1, group)
        top = torch.finfo(FLOAT8_TORCH[kind]).max
        scale = (g.abs().amax(1, keepdim=True) / top).clamp(min=1e-30)
        payload = (g / scale).to(FLOAT8_TORCH[kind]).view(torch.uint8).numpy().tobytes() + scale.numpy().tobytes()
    else:
        payload = quantize(w.float().numpy(), kind, group)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    region = Region(0, 0, buf.numel(), buf.numel(), "0" * 16, (QuantSpec(kind, group).stage,),
                    (TensorSlice("w", "bf16", (rows, cols), 0, buf.numel()),))
    if not holds_quantized(region):
        raise ValueError(f"a [{rows}, {cols}] matrix in groups of {group} cannot be held quantized "
                         "(the groups must lie inside rows)")
    return quantized_views(region, buf)["w"]
