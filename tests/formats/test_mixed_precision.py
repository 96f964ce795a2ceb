"""convert --profile: the profile's hot experts at 8 bits, the rest at 4, shown by inspect."""
import json
import subprocess
import sys

import numpy as np
import pytest

import moestream
from moestream.errors import ConvertError
from moestream.formats import StoreReader
from moestream.formats.profile import build_profile, save_profile
from moestream.formats.trace import RoutingTrace


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    # layer 0 expert 5 and layer 1 expert 3 used at every step, the rest once; 2 layers x 8 experts
    e = np.array([[[5, 0], [3, 1]], [[5, 2], [3, 4]], [[5, 6], [3, 7]]])
    t = RoutingTrace((0, 1), 8, np.arange(3), e, np.full(e.shape, 0.5, np.float32))
    path = tmp_path_factory.mktemp("profile") / "p.json"
    save_profile(build_profile([t]), path)
    return path


def test_hot_experts_keep_more_bits(checkpoints, profile, tmp_path):
    out = tmp_path / "mixed"
    r = subprocess.run([sys.executable, "-m", "moestream.cli", "convert", str(checkpoints["mixtral"]), str(out),
                        "--profile", str(profile), "--hot-fraction", "0.125", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with StoreReader(out) as rd:
        idx = rd.index
        assert idx.quant == "mixed"
        kinds = {k: reg.quant.kind for k, reg in idx.extents.items()}
        hot = {k for k, v in kinds.items() if v == "int8"}
        assert hot == {(1, 3), (0, 5)}          # 12.5 % of 16 pairs, most used first
        assert set(kinds.values()) == {"int8", "int4"}
        assert rd.verify_all() == []
    r = subprocess.run([sys.executable, "-m", "moestream.cli", "inspect", str(out), "--json"], capture_output=True,
                       text=True)
    bits = json.loads(r.stdout)["expert_bits"]
    assert bits == {"0": "44444844", "1": "44484444"}


def test_a_mixed_store_streams(checkpoints, profile, tmp_path):
    import torch
    out = moestream.convert(checkpoints["mixtral"], tmp_path / "m", hot_experts={(0, 1)}, progress=False)
    model = moestream.load_model(out, device_budget=4 * 36864, host_budget=0)
    try:
        logits = model(torch.tensor([[1, 2, 3]]))
        assert torch.isfinite(logits).all()
    finally:
        model.store.close()


def test_profile_mismatch_and_quant_conflict_are_refused(checkpoints, tmp_path):
    with pytest.raises(ConvertError, match="layer 7 expert 0"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "a", hot_experts={(7, 0)}, progress=False)
    with pytest.raises(ConvertError, match="--quant 'int8' and --profile"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "b", quant="int8", hot_experts=set(), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
