"""An FP8 block-scaled copy of a bf16/fp32 Hugging Face checkpoint, made the way DeepSeek's and
Qwen's FP8 checkpoints are: every 2-D `*_proj.weight` in float8 E4M3 with a float32
`weight_scale_inv` per 128x128 block (block max / 448), config.json's fp8 quantization_config;
everything else as it was. For measuring FP8 stores on bench decode's synthetic model:

    .venv/bin/python bench/fp8_checkpoint.py /tmp/moestream-bench-decode/qwen3moe-2L /tmp/qwen3moe-2L-fp8
    .venv/bin/moestream convert /tmp/qwen3moe-2L-fp8 /tmp/qwen3moe-2L-fp8.moe
    .venv/bin/python bench/decode_breakdown.py /tmp/qwen3moe-2L-fp8.moe --runs 5"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK, E4M3_MAX = 128, 448.0


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [rows, cols], multipliers float32 [ceil(rows/128), ceil(cols/128)])."""
    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = torch.zeros(br * BLOCK, bc * BLOCK)
    padded[:rows, :cols] = w.float()
    scale = padded.view(br, BLOCK, bc, BLOCK).abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for f in sorted(a.src.glob("*.safetensors")):
        out = {}
        for name, t in load_file(f).items():
            if t.dim() == 2 and name.endswith("_proj.weight"):
                out[name], out[name + "_scale_inv"] = fp8_blocks(t)
            else:
                out[name] = t
        save_file(out, a.out / f.name, metadata={"format": "pt"})
    for f in a.src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, a.out / f.name)
    index = a.out / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"].update({n + "_scale_inv": s for n, s in list(d["weight_map"].items())
                                if n.endswith("_proj.weight")})
        index.write_text(json.dumps(d))
    cfg = json.loads((a.out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK]}
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
