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
