"""Issue 23 item 1: no CLI output path may destroy a store or the command's own inputs, nor
replace an existing file without --overwrite (each case one line, exit 2, nothing written)."""
import subprocess
import sys

import pytest

import moestream


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moestream.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def store(checkpoints, tmp_path_factory):
    return moestream.convert(checkpoints["olmoe"], tmp_path_factory.mktemp("outs") / "s.moe", progress=False)


def untouched(path, before):
    return path.read_bytes() == before


@pytest.mark.parametrize("make_args,needle", [
    (lambda s, t: ("generate", s, "--prompt", "hi", "--max-new-tokens", "2", "--trace", s / "experts-00000.moe"),
     "lies inside the store"),
    (lambda s, t: ("fit-predictor", s, "--text", t, "-o", s / "experts-00000.moe"), "lies inside the store"),
    (lambda s, t: ("fit-predictor", s, "--text", t, "-o", t), "is one of this command's inputs"),
    (lambda s, t: ("profile", t, "-o", t), "is one of this command's inputs"),
    (lambda s, t: ("profile", t, "-o", s / "x.json"), "lies inside the store"),
])
def test_outputs_never_overwrite_a_store_or_an_input(store, tmp_path, make_args, needle):
    text = tmp_path / "t.txt"
    text.write_text("some text to fit on " * 20)
    data, before_text = store / "experts-00000.moe", text.read_bytes()
    before = data.read_bytes()
    p = run_cli(*make_args(store, text))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1], p.stderr
    assert untouched(data, before) and untouched(text, before_text)
    assert not (store / "x.json").exists()


def test_an_existing_trace_needs_overwrite(store, tmp_path):
    trace = tmp_path / "t.npz"
    trace.write_bytes(b"keep me")
    args = ("generate", store, "--prompt", "hi", "--max-new-tokens", "2", "--trace", trace)
    p = run_cli(*args)
    assert p.returncode == 2 and "exists; pass --overwrite" in p.stderr and trace.read_bytes() == b"keep me"
    p = run_cli(*args, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert trace.read_bytes()[:2] == b"PK"     # an .npz written in its place
