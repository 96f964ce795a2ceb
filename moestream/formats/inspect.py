"""A summary of a store for `moestream inspect`: sizes, codec chains and ratios per layer."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from .constants import INT_QUANTS, MIXED_QUANT
from .index import Region
from .reader import StoreReader


def chain_counts(regions: Iterable[Region]) -> dict[str, int]:
    """Extents per codec chain ("int4:64+zstd", "raw" for none), most common first."""
    return dict(Counter("+".join(r.chain) or "raw" for r in regions).most_common())


def describe(reader: StoreReader) -> dict[str, Any]:
    """Plain-data description of an open store (JSON-serialisable)."""
    idx = reader.index
    layers = []
    for layer in idx.moe_layers:
        regions = [idx.extents[(layer, e)] for e in range(idx.experts_per_layer)]
        stored = sum(r.padded_length for r in regions)
        source = sum(r.source_length for r in regions)
        layers.append({"layer": layer, "stored_bytes": stored, "source_bytes": source,
                       "ratio": source / stored if stored else 0.0, "chains": chain_counts(regions)})
    dense_stored = sum(r.padded_length for r in idx.dense.values()) + sum(r.padded_length for r in idx.bases.values())
    expert_stored = sum(r.padded_length for r in idx.extents.values())
    extent_sizes = [r.padded_length for r in idx.extents.values()]
    return {
        "path": str(reader.path),
        "architecture": idx.architecture,
        "model_type": idx.config.get("model_type"),
        "hidden_size": idx.config.get("hidden_size"),
        "num_hidden_layers": idx.config.get("num_hidden_layers"),
        "moe_layers": len(idx.moe_layers),
        "experts_per_layer": idx.experts_per_layer,
        "experts_per_token": idx.config.get("num_experts_per_tok"),
        "quant": idx.quant,
        "group_size": idx.group_size or None,
        "bytes_on_disk": sum(reader.file_sizes),
        "source_bytes": idx.source_bytes,
        "ratio": idx.source_bytes / sum(reader.file_sizes),
        "expert_bytes": expert_stored,
        "dense_bytes": dense_stored,
        "extent_bytes": {"min": min(extent_sizes), "max": max(extent_sizes)},
        "files": [{"name": p.name, "bytes": s} for p, s in zip(reader.files, reader.file_sizes)],
        "carried_files": sorted(idx.blobs),
        "layers": layers,
        # per layer, one character per expert: its bits (8/4 quantized, 16/32 raw floats)
        # experts of a quantized store kept in their source dtype (weights too small for fp16 scales:
        # codecs.FP16_SCALE_MAX_ERROR_RATIO)
        "unquantized_experts": sorted([layer, e] for (layer, e), r in idx.extents.items() if r.quant is None)
        if idx.quant in (*INT_QUANTS, MIXED_QUANT) else [],
        "expert_bits": {str(layer): "".join(_bits_mark(idx.extents[(layer, e)]) for e in range(idx.experts_per_layer))
                        for layer in idx.moe_layers} if idx.quant == "mixed" else None,
    }


def _bits_mark(region) -> str:
    q = region.quant
    if q is not None:
        return q.kind[3:]      # "int8" -> "8"
    return {"bf16": "h", "fp16": "h", "fp32": "f"}.get(region.tensors[0].dtype, "?")


def format_description(d: dict[str, Any]) -> str:
    from ..units import format_size
    lines = [
        f"store        {d['path']}",
        f"architecture {d['architecture']}  (hidden {d['hidden_size']}, {d['num_hidden_layers']} layers, "
        f"{d['moe_layers']} MoE layers x {d['experts_per_layer']} experts, top-{d['experts_per_token']})",
        f"quant        {d['quant']}" + (f" (group size {d['group_size']})" if d["group_size"] else ""),
        f"on disk      {format_size(d['bytes_on_disk'])} ({d['bytes_on_disk']} bytes) vs source "
        f"{format_size(d['source_bytes'])}: ratio {d['ratio']:.3f}x",
        f"experts      {format_size(d['expert_bytes'])}, extents {format_size(d['extent_bytes']['min'])}"
        f"..{format_size(d['extent_bytes']['max'])}; dense + bases {format_size(d['dense_bytes'])}",
        "files        " + ", ".join(f"{f['name']} ({format_size(f['bytes'])})" for f in d["files"]),
        "carries      " + (", ".join(d["carried_files"]) or "-"),
        "",
        f"{'layer':>5}  {'stored':>12}  {'source':>12}  {'ratio':>6}  codec chains (extents)",
    ]
    for l in d["layers"]:
        chains = ", ".join(f"{c} ({n})" for c, n in l["chains"].items())
        lines.append(f"{l['layer']:>5}  {format_size(l['stored_bytes']):>12}  {format_size(l['source_bytes']):>12}  "
                     f"{l['ratio']:>5.2f}x  {chains}")
    if d.get("unquantized_experts"):
        shown = ", ".join(f"{l}:{e}" for l, e in d["unquantized_experts"][:16])
        more = len(d["unquantized_experts"]) - 16
        lines += ["", f"unquantized  {len(d['unquantized_experts'])} experts kept in their source dtype, their weights "
                  f"too small for fp16 scales (layer:expert): {shown}" + (f" and {more} more" if more > 0 else "")]
    if d.get("expert_bits"):
        lines += ["", "expert bits (one digit per expert, expert 0 first):"]
        lines += [f"{layer:>5}  {bits}" for layer, bits in d["expert_bits"].items()]
    return "\n".join(lines)
