import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A random-initialised checkpoint per family, saved by transformers' save_pretrained (fp32)."""
    from moestream.demo import build_checkpoint
    root = tmp_path_factory.mktemp("ckpt")
    return {f: build_checkpoint(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def sharded_bf16_checkpoint(tmp_path_factory) -> Path:
    """Mixtral in bf16, sharded by save_pretrained (model.safetensors.index.json)."""
    from moestream.demo import build_checkpoint
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("sharded") / "m", seed=7, dtype="bfloat16",
                            max_shard_size="1MB", hidden_size=128, moe_intermediate_size=256)


def store_logits(store, ids, **load_options):
    """Logits [B, T, V] of `store`'s native forward on ids [B, T] (load_model with
    `load_options`), the store closed after."""
    import torch
    from moestream.compute import load_model
    model = load_model(store, **load_options)
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        model.store.close()


def quantized_twins(src: Path, root: Path, quantize, quantization_config: dict):
    """Two copies of checkpoint `src` under `root`: "q", where quantize(name, tensor) -> (the
    tensors stored instead {name: tensor}, their dequantized values) or None (kept as it is), with
    `quantization_config` in its config.json; "ref", a plain checkpoint of the dequantized values.
    Returns (q dir, ref dir, the dequantized state)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    q, ref = root / "q", root / "ref"
    shutil.copytree(src, q)
    shutil.copytree(src, ref)
    stored, deq = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        done = quantize(name, t)
        if done is None:
            stored[name] = deq[name] = t
        else:
            stored.update(done[0])
            deq[name] = done[1]
    save_file(stored, q / "model.safetensors", metadata={"format": "pt"})
    save_file(deq, ref / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (q / "config.json").write_text(json.dumps(cfg))
    return q, ref, deq


def retyped_checkpoint(src: Path, dst: Path, model_type: str, architecture: str) -> Path:
    """A copy of checkpoint `src` at `dst` whose config.json names another model_type and class."""
    import json
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = model_type, [architecture]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
