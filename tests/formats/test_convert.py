"""Converter behaviour: refusals, atomicity, resume, carried config and tokenizer."""
import json
import subprocess
import sys

import pytest
import torch

import moestream
from moestream.errors import ConvertError, FormatError
from moestream.formats import StoreReader
from moestream.formats.writer import StoreWriter


def test_store_carries_config_and_tokenizer(checkpoints, tmp_path):
    src = checkpoints["olmoe"]
    out = moestream.convert(src, tmp_path / "s", progress=False)
    with StoreReader(out) as r:
        assert r.config == json.loads((src / "config.json").read_text())
        assert r.architecture == "olmoe" and r.layers == [0, 1] and r.experts_per_layer == 8
        assert r.blob("tokenizer.json") == (src / "tokenizer.json").read_bytes()
        assert "tokenizer_config.json" in r.index.blobs


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
    import shutil
    src = tmp_path / "c"
    shutil.copytree(checkpoints["mixtral"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="unsupported architecture 'LlamaForCausalLM'"):
        moestream.convert(src, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    src = tmp_path / "c"
    shutil.copytree(checkpoints["mixtral"], src)
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(sd, src / "model.safetensors")
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w2\.weight is missing"):
        moestream.convert(src, tmp_path / "s", progress=False)


def test_bad_arguments(checkpoints, tmp_path):
    with pytest.raises(ConvertError, match="--quant"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "s", quant="int3", progress=False)
    with pytest.raises(ConvertError, match="--group-size"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "s", quant="int4", group_size=7, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConvertError, match="already exists"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "exists", progress=False)


def test_crash_leaves_no_valid_store_and_resume_completes(checkpoints, tmp_path, monkeypatch):
    src, out = checkpoints["qwen3_moe"], tmp_path / "s"
    calls = {"n": 0}
    real = StoreWriter.add_extent

    def crashing(self, layer, expert, enc, source_length):
        calls["n"] += 1
        if calls["n"] == 11:  # in layer 1, after layer 0 was journaled
            raise KeyboardInterrupt
        return real(self, layer, expert, enc, source_length)

    monkeypatch.setattr(StoreWriter, "add_extent", crashing)
    with pytest.raises(KeyboardInterrupt):
        moestream.convert(src, out, progress=False)
    assert not out.exists() and (tmp_path / "s.partial" / "journal.json").exists()
    with pytest.raises(FormatError):
        StoreReader(out)
    with pytest.raises(FormatError, match="file count 0"):  # the staging copy never looks complete
        StoreReader(tmp_path / "s.partial")

    monkeypatch.setattr(StoreWriter, "add_extent", real)
    seen = []
    orig_init = StoreWriter.__init__

    def spy(self, *a, **k):
        orig_init(self, *a, **k)
        seen.append(self.resumed)
    monkeypatch.setattr(StoreWriter, "__init__", spy)
    moestream.convert(src, out, progress=False)
    assert seen == [True] and not (tmp_path / "s.partial").exists()
    fresh = moestream.convert(src, tmp_path / "fresh", progress=False)
    with StoreReader(out) as a, StoreReader(fresh) as b:
        for l in a.layers:
            for e in range(a.experts_per_layer):
                x, y = a.expert(l, e), b.expert(l, e)
                assert all(torch.equal(x[k], y[k]) for k in x)
        assert a.verify_all() == []


def test_changed_options_restart_instead_of_resuming(checkpoints, tmp_path, monkeypatch):
    src, out = checkpoints["mixtral"], tmp_path / "s"
    monkeypatch.setattr(StoreWriter, "finish", lambda self, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        moestream.convert(src, out, progress=False)
    monkeypatch.undo()
    resumed = []
    orig_init = StoreWriter.__init__

    def spy(self, *a, **k):
        orig_init(self, *a, **k)
        resumed.append(self.resumed)
    monkeypatch.setattr(StoreWriter, "__init__", spy)
    moestream.convert(src, out, quant="int8", progress=False)
    assert resumed == [False]
    with StoreReader(out) as r:
        assert r.index.quant == "int8"


def test_overwrite_replaces_only_when_complete(checkpoints, tmp_path):
    out = moestream.convert(checkpoints["mixtral"], tmp_path / "s", progress=False)
    moestream.convert(checkpoints["mixtral"], out, quant="int4", overwrite=True, progress=False)
    with StoreReader(out) as r:
        assert r.index.quant == "int4"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moestream.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_convert_inspect_verify(checkpoints, tmp_path):
    out = tmp_path / "s"
    p = run_cli("convert", checkpoints["mixtral"], out, "--quant", "int8", "--group-size", "32", "--quiet")
    assert p.returncode == 0, p.stderr
    p = run_cli("inspect", out, "--json")
    d = json.loads(p.stdout)
    assert d["architecture"] == "mixtral" and d["quant"] == "int8" and d["group_size"] == 32
    assert d["bytes_on_disk"] == (out / "experts-00000.moe").stat().st_size
    assert len(d["layers"]) == 2 and all(l["ratio"] > 0 for l in d["layers"])
    p = run_cli("inspect", out)
    assert p.returncode == 0 and "int8:32" in p.stdout
    p = run_cli("verify", out)
    assert p.returncode == 0 and "ok:" in p.stdout
    with StoreReader(out) as r:
        reg = r.extent(0, 2)
    f = out / "experts-00000.moe"
    with open(f, "r+b") as fh:
        fh.seek(reg.offset)
        fh.write(b"\xff\xff\xff\xff")
    p = run_cli("verify", out)
    assert p.returncode == 1
    assert p.stdout.strip() == f"{f}: offset {reg.offset}: layer 0 expert 2: checksum mismatch"


@pytest.mark.parametrize("args,needle", [
    (("inspect", "/nonexistent/store"), "no such store"),
    (("verify", "/nonexistent/store"), "no such store"),
    (("convert", "/nonexistent/ckpt", "/tmp/never"), "not a directory"),
    (("convert", ".", "/tmp/never", "--max-file-size", "lots"), "cannot parse 'lots'"),
    (("convert", ".", "/tmp/never", "--quant", "int3"), "invalid choice"),
])
def test_cli_errors_are_one_line(args, needle):
    p = run_cli(*args)
    assert p.returncode != 0
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---- two writers, --overwrite: nothing that is not a store is ever deleted -----------------------

def test_second_conversion_into_the_same_output_is_refused_while_the_first_runs(checkpoints, tmp_path):
    from moestream.formats.writer import ConversionLock
    out = tmp_path / "s"
    with ConversionLock(out):  # a conversion in progress holds this for its whole run
        code = subprocess.run([sys.executable, "-m", "moestream.cli", "convert", str(checkpoints["mixtral"]),
                               str(out), "--quant", "int8", "--overwrite", "--quiet"],
                              capture_output=True, text=True)
        assert code.returncode == 1
        assert f"another conversion (pid {__import__('os').getpid()}) is writing this store" in code.stderr
        assert "Traceback" not in code.stderr
        assert not out.exists() and not (tmp_path / "s.partial").exists()
    assert not (tmp_path / "s.lock").exists()
    moestream.convert(checkpoints["mixtral"], out, progress=False)  # the lock is free again
    assert not (tmp_path / "s.lock").exists()


def test_concurrent_conversions_never_corrupt_the_store(checkpoints, tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "moestream.cli", "convert", str(checkpoints["qwen2_moe"]), str(out), "--quiet"]
    procs = [subprocess.Popen(cmd + ["--quant", q, "--overwrite"], stderr=subprocess.PIPE, text=True)
             for q in ("int4", "int8", "keep")]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or "another conversion" in err, err
    with StoreReader(out) as r:
        assert r.verify_all() == []


def test_overwrite_refuses_the_source_and_its_ancestors(checkpoints, tmp_path):
    import shutil
    src = tmp_path / "parent" / "ckpt.partial"
    shutil.copytree(checkpoints["mixtral"], src)
    before = sorted(p.name for p in src.iterdir())
    # OUT is the source, an ancestor of it, the same path spelled otherwise, or (ckpt) a store
    # whose staging directory ckpt.partial would be the source
    for out in (src, src.parent, tmp_path / "parent" / ".." / "parent" / "ckpt.partial", src.with_name("ckpt")):
        with pytest.raises(ConvertError, match="is the source checkpoint or holds it"):
            moestream.convert(src, out, overwrite=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def test_overwrite_replaces_only_a_store(checkpoints, tmp_path):
    from moestream.cli import main
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("do not delete")
    with pytest.raises(ConvertError, match="is not a moestream store; --overwrite replaces only a store"):
        moestream.convert(checkpoints["mixtral"], keep, overwrite=True, progress=False)
    assert (keep / "mine.txt").read_text() == "do not delete"
    plain = tmp_path / "file.moe"
    plain.write_text("a file")
    assert main(["convert", str(checkpoints["mixtral"]), str(plain), "--overwrite", "--quiet"]) == 1
    assert plain.read_text() == "a file"
    assert not list(tmp_path.glob("file.moe.*"))  # no .old-*, .partial or .lock left behind
    out = moestream.convert(checkpoints["mixtral"], tmp_path / "s", progress=False)
    moestream.convert(checkpoints["mixtral"], out, quant="int8", overwrite=True, progress=False)
    with StoreReader(out) as r:
        assert r.index.quant == "int8"


def test_staging_that_holds_foreign_files_is_not_deleted(checkpoints, tmp_path):
    staging = tmp_path / "s.partial"
    staging.mkdir()
    (staging / "thesis.tex").write_text("years of work")
    with pytest.raises(ConvertError, match="holds 'thesis.tex', which no conversion writes"):
        moestream.convert(checkpoints["mixtral"], tmp_path / "s", progress=False)
    assert (staging / "thesis.tex").read_text() == "years of work"
