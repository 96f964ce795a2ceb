"""llama.cpp, the peer users run MoE models from disk with, as a system of `bench decode`.

Built here from the sources the PyPI sdist of `llama-cpp-python` vendors (llama.cpp commit
0c1e570 in 0.3.36): `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`, then a
CPU-only cmake build of `llama-bench` and `llama-quantize` (GGML_NATIVE, 7 minutes on 2 cores),
kept in the workdir and reused. Never run by `make test`.

The model is the benchmark's own synthetic checkpoint written as a GGUF by the gguf-py of that
same tree (qwen3moe, bf16, a 4096-token SentencePiece-style vocabulary of placeholder pieces: the
checkpoint has no tokenizer, and llama-bench feeds token ids), then `llama-quantize` to Q8_0 and
Q4_0 with llama.cpp's default choices (the router stays F32; Q4_0 keeps output.weight in Q6_K).
`llama-bench -p 0 -n N -t <cores> -o json` decodes N tokens from random token ids: its routing
comes from the model's random routers, not from our replayed trace (see bench/decode.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Optional

VERSION = "0.3.36"
#: llama.cpp's types for our quant names (bench decode's systems)
QUANT_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def tree(workdir: Path) -> Path:
    return Path(workdir) / f"llama-cpp-python-{VERSION}" / "vendor" / "llama.cpp"


def ensure_built(workdir: Path, log=print) -> tuple[Optional[Path], str]:
    """(the llama.cpp source tree with build/bin/llama-bench and llama-quantize, "") once built in
    `workdir`, or (None, why not)."""
    src = tree(workdir)
    bins = [src / "build" / "bin" / n for n in ("llama-bench", "llama-quantize")]
    if all(b.exists() for b in bins):
        return src, ""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed (apt-get install cmake g++)"
    workdir = Path(workdir)
    sdist = workdir / f"llama_cpp_python-{VERSION}.tar.gz"
    try:
        if not sdist.exists():
            log(f"downloading the llama-cpp-python {VERSION} sdist (it vendors llama.cpp)")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={VERSION}", "-d", str(workdir)], check=True, capture_output=True)
        if not src.exists():
            with tarfile.open(sdist) as t:
                t.extractall(workdir / f"llama-cpp-python-{VERSION}.partial", filter="data")
            os.replace(workdir / f"llama-cpp-python-{VERSION}.partial" / f"llama_cpp_python-{VERSION}",
                       workdir / f"llama-cpp-python-{VERSION}")
        log(f"building llama-bench and llama-quantize in {src / 'build'} (several minutes, once)")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"],   # static: the binaries keep working if the tree moves
                       check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(src / "build"), f"-j{os.cpu_count() or 2}", "--target",
                        "llama-bench", "llama-quantize"], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
        err = getattr(e, "stderr", b"") or b""
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if isinstance(err, bytes) else []
        return None, f"llama.cpp could not be built: {e}" + (f" ({tail[0][:200]})" if tail else "")
    return src, ""


def _gguf(src: Path):
    sys.path.insert(0, str(src / "gguf-py"))
    import gguf
    return gguf


def write_gguf(checkpoint: Path, out: Path, src: Path, log=print) -> Path:
    """The synthetic Qwen3-MoE checkpoint (bf16 safetensors) as a bf16 GGUF, written once."""
    if out.exists():
        return out
    import numpy as np
    import torch
    from safetensors import safe_open
    gguf = _gguf(src)
    cfg = json.loads((checkpoint / "config.json").read_text())
    log(f"writing {out} (qwen3moe, bf16)")
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(partial), "qwen3moe")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    w.add_add_bos_token(False)
    # the names the converter reads GGUFs by (formats/gguf_checkpoint.py), the other way round
    from ..formats.gguf_checkpoint import GGUF_ARCHITECTURES, MODEL_TENSORS
    names = {hf: g for g, hf in MODEL_TENSORS.items()}
    per_layer = {hf.removesuffix(".weight"): g.removesuffix(".weight")
                 for g, hf in GGUF_ARCHITECTURES["qwen3moe"].layer_tensors
                 if g.endswith(".weight") and "shexp" not in g}
    files = sorted(checkpoint.glob("*.safetensors"))
    handles = [safe_open(str(f), "pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def bits(name):
        t = where[name].get_tensor(name)
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype.itemsize == 2 else t.numpy()

    def add(name, arr, f32=False):
        if f32:
            arr = (torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().numpy()
                   if arr.dtype == np.uint16 else arr.astype(np.float32))
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.BF16)
    for k, v in names.items():
        add(v, bits(k), f32=v.endswith("norm.weight"))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for k, v in per_layer.items():
            if p + k + ".weight" in where:         # biases and shared experts: not in Qwen3-MoE
                add(f"blk.{layer}.{v}.weight", bits(p + k + ".weight"), f32="norm" in v or v == "ffn_gate_inp")
        for proj, gname in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            add(f"blk.{layer}.{gname}.weight",
                np.stack([bits(f"{p}mlp.experts.{e}.{proj}.weight") for e in range(cfg["num_experts"])]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(partial, out)
    return out


def model_file(src: Path, checkpoint: Path, quant: str, log=print) -> Path:
    """The GGUF of `checkpoint` in llama.cpp type QUANT_TYPES[quant], made once beside it."""
    bf16 = write_gguf(checkpoint, checkpoint.parent / f"{checkpoint.name}-bf16.gguf", src, log)
    if quant == "bf16":
        return bf16
    out = checkpoint.parent / f"{checkpoint.name}-{quant}.gguf"
    if not out.exists():
        log(f"llama-quantize {bf16.name} -> {out.name} ({QUANT_TYPES[quant]})")
        partial = out.with_name(out.name + ".partial")
        subprocess.run([str(src / "build" / "bin" / "llama-quantize"), str(bf16), str(partial), QUANT_TYPES[quant]],
                       check=True, capture_output=True)
        os.replace(partial, out)
    return out


def run_bench(src: Path, gguf_path: Path, tokens: int, *, threads: int, repack: bool = True,
              load_mode: str = "mmap", repetitions: int = 2, prompt: int = 0) -> dict[str, Any]:
    """`llama-bench -p 0 -n tokens` on `gguf_path`: its decode tok/s (mean over repetitions) and the
    command line; with `prompt` (and tokens 0), `-p prompt -n 0`: its prefill tok/s instead."""
    cmd = [str(src / "build" / "bin" / "llama-bench"), "-m", str(gguf_path), "-p", str(prompt), "-n", str(tokens),
           "-t", str(threads), "-r", str(repetitions), "-lm", load_mode, "--repack", "1" if repack else "0",
           "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}")
    rows = json.loads(p.stdout)
    row = [r for r in rows if (r.get("n_gen") if tokens else r.get("n_prompt"))][0]
    return {"tokens_per_s": row["avg_ts"], "stddev_tokens_per_s": row.get("stddev_ts"),
            "samples_ns": row.get("samples_ns"), "command": " ".join(cmd[1:])}
