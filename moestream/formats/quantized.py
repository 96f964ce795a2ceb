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

from dataclasses import dataclass
from typing import Optional

import torch

from .constants import STAGE_DELTA, QuantSpec
from .index import Region, TensorSlice


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor of `shape` [out, in] in the layout of `spec` (constants.QuantSpec):
    `codes` uint8 [out, in * bits / 8], `scales` (and for int4 `mins`) float16 [out, in / group].
    The views belong to whoever handed the tensor out (a cache slot: read-only, valid while this
    object lives)."""
    spec: QuantSpec
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    mins: Optional[torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and planes (what a matmul reads)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def dequantize(self, dequantize, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weights [out, in] in `dtype` (a new tensor), by `dequantize` (a codecs.Dequantizer)."""
        flat = lambda t: t.reshape(-1).view(torch.uint8) if t is not None else None   # noqa: E731
        numel = self.shape[0] * self.shape[1]
        return dequantize(flat(self.codes), flat(self.scales), flat(self.mins), quant=self.spec.kind,
                          group_size=self.spec.group, numel=numel, out_dtype=dtype).view(self.shape)


def holds_quantized(region: Region) -> bool:
    """Whether the tiers may hold `region` in its stored (quantized) form: a quantized extent, not
    a delta, every tensor a matrix whose groups lie inside its rows and whose fp16 planes start on
    an even byte (they are viewed as float16 in place)."""
    q = region.quant
    return (q is not None and not region.has(STAGE_DELTA) and bool(region.tensors)
            and all(len(t.shape) == 2 and q.row_aligned(t.shape) and t.offset % 2 == 0
                    and q.code_bytes(t.numel) % 2 == 0 for t in region.tensors))


def quantized_views(region: Region, payload: torch.Tensor) -> dict[str, QuantizedTensor]:
    """The tensors of a region that `holds_quantized`, as views of its decoded payload (uint8, 1-D,
    at least raw_length bytes; on any device). Nothing is copied; the caller keeps `payload` alive
    through the views."""
    q = region.quant
    assert q is not None
    out = {}
    for t in region.tensors:
        rows, cols = t.shape
        buf = payload[t.offset:t.offset + t.length]
        codes, scales, mins = q.planes(t.numel)
        per_row = cols // q.group
        out[t.name] = QuantizedTensor(
            q, (rows, cols), buf[slice(*codes)].view(rows, -1),
            buf[slice(*scales)].view(torch.float16).view(rows, per_row),
            buf[slice(*mins)].view(torch.float16).view(rows, per_row) if mins else None)
    return out


def quantize_matrix(w: torch.Tensor, kind: str, group: int = 64) -> QuantizedTensor:
    """A float matrix [out, in] quantized the way the converter does (codecs.quantize), as a
    QuantizedTensor over a new buffer owned by the result (for tests and benchmarks)."""
    from .codecs import quantize
    rows, cols = w.shape
    buf = torch.frombuffer(bytearray(quantize(w.float().numpy(), kind, group)), dtype=torch.uint8)
    region = Region(0, 0, buf.numel(), buf.numel(), "0" * 16, (QuantSpec(kind, group).stage,),
                    (TensorSlice("w", "bf16", (rows, cols), 0, buf.numel()),))
    if not holds_quantized(region):
        raise ValueError(f"a [{rows}, {cols}] matrix in groups of {group} cannot be held quantized "
                         "(the groups must lie inside rows)")
    return quantized_views(region, buf)["w"]
