"""Converter behaviour: refusals, atomicity, resume, carried config and tokenizer."""
import json
import re
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


def test_without_a_deriver_a_family_with_no_record_is_refused(checkpoints, tmp_path):
    # formats alone (no transformers at the edge) knows only its records
    from moestream.formats.convert import convert
    from ..conftest import retyped_checkpoint
    src = retyped_checkpoint(checkpoints["olmoe"], tmp_path / "c", "solar_open", "SolarOpenForCausalLM")
    with pytest.raises(ConvertError, match="unsupported architecture 'SolarOpenForCausalLM' .*supported: deepseek_v3"):
        convert(src, tmp_path / "s", progress=False)
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
    for bad in (-0.1, 1.0):
        with pytest.raises(ConvertError, match=rf"--zstd-min-saving {bad}: must lie in \[0, 1\)"):
            moestream.convert(checkpoints["mixtral"], tmp_path / "s", zstd_min_saving=bad, progress=False)
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
    monkeypatch.setattr(StoreWriter, "finish", lambda self, *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
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
    (("convert", ".", "/tmp/never", "--zstd-min-saving", "2"), "--zstd-min-saving 2.0: must lie in [0, 1)"),
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


# ---- checkpoints that cannot run are refused before anything is written -------------------------

def _edited_copy(src, dst, *, config=None, tensors=None, header=None):
    import shutil
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.torch import load_file, save_file
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("case,message", [
    ("fewer_experts_in_config", r"holds expert tensor model\.layers\.0\.block_sparse_moe\.experts\.4\..*declares 4 experts"),
    ("transposed_expert", r"experts\.3\.w1\.weight has shape \[64, 48\]; .*config\.json implies \[48, 64\]"),
    ("wrong_q_proj", r"q_proj\.weight has shape \[32, 64\]; .*implies \[64, 64\]"),
    ("heads_zero", r"config\.json: num_attention_heads = 0 is out of range"),
    ("heads_missing", r"config\.json: num_attention_heads must be an integer, got None"),
    ("vocab_huge", r"vocab_size = 68719476736 is out of range"),
    ("layers_string", r"num_hidden_layers must be an integer, got '2'"),
    ("topk_100", r"num_experts_per_tok = 100 exceeds the 8 experts"),
])
def test_checkpoints_that_cannot_run_are_refused(checkpoints, tmp_path, case, message):
    src = checkpoints["mixtral"]
    pre = "model.layers.0."
    edits = {
        "fewer_experts_in_config": dict(config=lambda c: c.update(num_local_experts=4)),
        "transposed_expert": dict(tensors=lambda sd: sd.update({
            f"{pre}block_sparse_moe.experts.3.w1.weight": sd[f"{pre}block_sparse_moe.experts.3.w1.weight"].t().contiguous()})),
        "wrong_q_proj": dict(tensors=lambda sd: sd.update({f"{pre}self_attn.q_proj.weight": torch.zeros(32, 64)})),
        "heads_zero": dict(config=lambda c: c.update(num_attention_heads=0)),
        "heads_missing": dict(config=lambda c: c.pop("num_attention_heads")),
        "vocab_huge": dict(config=lambda c: c.update(vocab_size=1 << 36)),
        "layers_string": dict(config=lambda c: c.update(num_hidden_layers="2")),
        "topk_100": dict(config=lambda c: c.update(num_experts_per_tok=100)),
    }
    bad = _edited_copy(src, tmp_path / "c", **edits[case])
    with pytest.raises(ConvertError, match=message):
        moestream.convert(bad, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("header,message", [
    (b"[1, 2]", "header is a JSON list, not an object"),
    (b'{"a": {"dtype": "F32", "shape": [2]}}', "data_offsets missing"),
    (b'{"a": {"dtype": "F32", "shape": [-1, -64], "data_offsets": [0, 0]}}', r"shape \[-1, -64\] is not a list"),
])
def test_malformed_safetensors_headers_are_named(checkpoints, tmp_path, header, message):
    import shutil
    import struct
    src = tmp_path / "c"
    shutil.copytree(checkpoints["mixtral"], src)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ConvertError, match=message):
        moestream.convert(src, tmp_path / "s", progress=False)


def test_config_that_is_not_an_object_is_one_line(checkpoints, tmp_path):
    src = _edited_copy(checkpoints["mixtral"], tmp_path / "c")
    (src / "config.json").write_text("[]")
    p = subprocess.run([sys.executable, "-m", "moestream.cli", "convert", str(src), str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "config.json: expected a JSON object, got list" in p.stderr
    assert "Traceback" not in p.stderr


def test_verify_checks_shapes_against_the_config(checkpoints, tmp_path):
    """A store whose index was rewritten (checksums recomputed) to disagree with its config."""
    from tests.formats.test_corruption import repack_index
    out = moestream.convert(checkpoints["mixtral"], tmp_path / "s", progress=False)

    def edit(d):
        d["config"]["moe_intermediate_size"] = 48
        d["config"]["intermediate_size"] = 40       # the config now says experts are [40, 64]
    repack_index(out / "experts-00000.moe", edit)
    with StoreReader(out) as r:
        bad = r.verify_all()
    assert bad and all("the config implies [40, 64]" in line or "implies [64, 40]" in line for line in bad)
    assert any("layer 1 expert 7: tensor w2 has shape [64, 48]" in line for line in bad)


@pytest.mark.parametrize("damage", ["delete_data_file", "journal_is_a_list", "truncate_data_file"])
def test_an_interrupted_conversion_with_damaged_staging_starts_over(checkpoints, tmp_path, monkeypatch, damage):
    src, out = checkpoints["qwen3_moe"], tmp_path / "s"
    real = StoreWriter.add_extent
    calls = {"n": 0}

    def crashing(self, layer, expert, enc, source_length):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real(self, layer, expert, enc, source_length)
    monkeypatch.setattr(StoreWriter, "add_extent", crashing)
    with pytest.raises(KeyboardInterrupt):
        moestream.convert(src, out, progress=False)
    monkeypatch.setattr(StoreWriter, "add_extent", real)
    staging = tmp_path / "s.partial"
    if damage == "delete_data_file":
        (staging / "experts-00000.moe").unlink()
    elif damage == "journal_is_a_list":
        (staging / "journal.json").write_text("[]")
    else:
        with open(staging / "experts-00000.moe", "r+b") as f:
            f.truncate(4096)
    p = subprocess.run([sys.executable, "-m", "moestream.cli", "convert", str(src), str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "starting over" in p.stdout + p.stderr
    with StoreReader(out) as r:
        assert r.verify_all() == []


def test_int_scales_beyond_fp16_are_refused_and_verify_flags_nan_scales(checkpoints, tmp_path):
    from tests.formats.test_corruption import repack_index
    from moestream.formats.codecs import checksum as xxh
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    bad = _edited_copy(checkpoints["mixtral"], tmp_path / "c", tensors=lambda sd: sd[name].__setitem__((0, 0), 1e10))
    with pytest.raises(ConvertError, match=r"tensor w2: cannot quantize to int8: .*beyond fp16's range"):
        moestream.convert(bad, tmp_path / "s8", quant="int8", progress=False)

    out = moestream.convert(checkpoints["mixtral"], tmp_path / "s", quant="int8", zstd_level=None, delta=False,
                            progress=False)
    with StoreReader(out) as r:
        reg = r.extent(0, 3)
    w1 = reg.tensors[0]
    groups = -(-w1.numel // 64)
    f = out / "experts-00000.moe"
    data = bytearray(f.read_bytes())
    scale_at = reg.offset + w1.offset + groups * 64          # the first fp16 scale of w1
    data[scale_at:scale_at + 2] = b"\x00\x7e"                 # fp16 NaN
    f.write_bytes(bytes(data))
    stored = bytes(data[reg.offset:reg.offset + reg.length])

    def fix_checksum(d):  # a hostile writer: the checksum matches the bad bytes
        for e in d["extents"]:
            if (e["layer"], e["expert"]) == (0, 3):
                e["checksum"] = xxh(stored)
    repack_index(f, fix_checksum)
    with StoreReader(out) as r:
        problems = r.verify_all()
    assert problems == [f"{f}: offset {reg.offset}: layer 0 expert 3: tensor w1 has NaN or inf quantization scales or float8 codes"]


def test_cli_convert_defaults_are_the_api_defaults():
    """`moestream convert` and `moestream.convert()` encode the same store when given nothing:
    the CLI's defaults are the ones the API takes from formats/constants.py."""
    import inspect as pyinspect

    from moestream.cli import build_parser
    from moestream.formats.convert import convert

    a = build_parser().parse_args(["convert", "CKPT", "OUT"])
    api = pyinspect.signature(convert).parameters
    for name in ("group_size", "zstd_level", "zstd_min_saving"):
        assert getattr(a, name) == api[name].default, name


# ---- shards: the index decides which copy of a tensor is the model's (issue 23 item 2) -----------

def _split_into_shards(src, dst, *, duplicate: str, index_names: str | None, write_index: bool = True):
    """A copy of `src` split into two shards a/b, both holding `duplicate` (b's copy negated so
    that the two differ); the index names shard `index_names` for it (None: not in the index)."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(sd)
    a = {n: sd[n] for n in names[: len(names) // 2]}
    b = {n: sd[n] for n in names[len(names) // 2:]}
    a[duplicate] = sd[duplicate]
    b[duplicate] = -sd[duplicate] - 1
    save_file(a, dst / "a.safetensors")
    save_file(b, dst / "b.safetensors")
    if write_index:
        wm = {n: "a.safetensors" for n in a} | {n: "b.safetensors" for n in b}
        if index_names is None:
            del wm[duplicate]
        else:
            wm[duplicate] = f"{index_names}.safetensors"
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return sd[duplicate], -sd[duplicate] - 1


@pytest.mark.parametrize("which", ["a", "b"])
def test_a_tensor_in_two_shards_is_the_copy_the_index_names(checkpoints, tmp_path, which):
    name = "model.norm.weight"
    copy_a, copy_b = _split_into_shards(checkpoints["mixtral"], tmp_path / "c", duplicate=name, index_names=which)
    out = moestream.convert(tmp_path / "c", tmp_path / "s", progress=False)
    with StoreReader(out) as r:
        got = r.dense()[name].float()
    want = copy_a if which == "a" else copy_b
    assert torch.equal(got, want.float()) and not torch.equal(got, (copy_b if which == "a" else copy_a).float())


@pytest.mark.parametrize("write_index", [True, False])
def test_a_tensor_in_two_shards_the_index_does_not_resolve_is_refused(checkpoints, tmp_path, write_index):
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    _split_into_shards(checkpoints["mixtral"], tmp_path / "c", duplicate=name, index_names=None,
                       write_index=write_index)
    with pytest.raises(ConvertError, match=rf"tensor {re.escape(name)} is in both .*a\.safetensors and .*b\.safetensors"):
        moestream.convert(tmp_path / "c", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("shard,message", [
    ("../x/b.safetensors", "lies outside the checkpoint directory"),
    ("/etc/b.safetensors", "lies outside the checkpoint directory"),
    ("link.safetensors", "resolves outside the checkpoint directory"),
    ("gone.safetensors", "is missing"),
])
def test_index_shards_outside_the_checkpoint_are_refused(checkpoints, tmp_path, shard, message):
    name = "model.norm.weight"
    _split_into_shards(checkpoints["mixtral"], tmp_path / "c", duplicate=name, index_names="a")
    (tmp_path / "x").mkdir()
    (tmp_path / "c" / "b.safetensors").rename(tmp_path / "x" / "b.safetensors")
    (tmp_path / "c" / "link.safetensors").symlink_to(tmp_path / "x" / "b.safetensors")
    idx = tmp_path / "c" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"] = {n: (shard if s == "b.safetensors" else s) for n, s in d["weight_map"].items()}
    idx.write_text(json.dumps(d))
    with pytest.raises(ConvertError, match=rf"{re.escape(str(idx))}: shard '{re.escape(shard)}' {message}"):
        moestream.convert(tmp_path / "c", tmp_path / "s", progress=False)


def test_index_naming_a_shard_without_the_tensor_is_refused(checkpoints, tmp_path):
    name = "model.norm.weight"
    _split_into_shards(checkpoints["mixtral"], tmp_path / "c", duplicate=name, index_names="a")
    idx = tmp_path / "c" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["model.embed_tokens.weight"] = "a.safetensors" if d["weight_map"]["model.embed_tokens.weight"] == "b.safetensors" else "b.safetensors"
    idx.write_text(json.dumps(d))
    with pytest.raises(ConvertError, match=r"names model\.embed_tokens\.weight in [ab]\.safetensors, which does not hold it"):
        moestream.convert(tmp_path / "c", tmp_path / "s", progress=False)


def test_tiny_experts_are_stored_unquantized_and_the_store_runs(checkpoints, tmp_path):
    """An expert scaled to 1e-6 (max ~1e-7) or to zero: int8 keeps the first in its source dtype
    (fp16 scales would flush it to zeros), stores the second exactly, says so in inspect, and
    the store's logits agree with transformers as an ordinary int8 store's do."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from moestream.formats.inspect import describe, format_description
    from ..conftest import store_logits
    pre = "model.layers.1.block_sparse_moe.experts."

    def shrink(sd):
        for w in ("w1", "w2", "w3"):
            sd[f"{pre}5.{w}.weight"] *= 1e-6
            sd[f"{pre}6.{w}.weight"] *= 0.0
    src = _edited_copy(checkpoints["mixtral"], tmp_path / "c", tensors=shrink)
    sd = load_file(src / "model.safetensors")
    out = moestream.convert(src, tmp_path / "s", quant="int8", progress=False)
    with StoreReader(out) as r:
        d = describe(r)
        tiny, zero = r.expert(1, 5), r.expert(1, 6)
    assert d["unquantized_experts"] == [[1, 5]]
    assert "unquantized  1 experts kept in their source dtype" in format_description(d)
    for w in ("w1", "w2", "w3"):
        assert torch.equal(tiny[w].float(), sd[f"{pre}5.{w}.weight"])
        assert torch.equal(zero[w].float(), torch.zeros_like(sd[f"{pre}6.{w}.weight"]))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(2)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = ref(ids).logits
    got = store_logits(out, ids, device_budget="64MiB")
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9


# ---- a store that converts and verifies is one that loads (issue 23 item 4) ---------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("case,message", [
    ("no_lm_head", r"tensor lm_head\.weight is missing \(config\.json has tie_word_embeddings false\)"),
    ("unknown_dense", r"tensor model\.layers\.0\.mystery\.weight is not part of the \w+ model"),
    ("no_norm", r"tensor model\.norm\.weight is missing"),
])
def test_dense_tensors_the_model_cannot_load_are_refused_and_verify_names_them(checkpoints, tmp_path, family,
                                                                               case, message):
    edit = {"no_lm_head": lambda sd: sd.pop("lm_head.weight"),
            "unknown_dense": lambda sd: sd.update({"model.layers.0.mystery.weight": torch.zeros(3)}),
            "no_norm": lambda sd: sd.pop("model.norm.weight")}[case]
    src = _edited_copy(checkpoints[family], tmp_path / "c", tensors=edit)
    with pytest.raises(ConvertError, match=message):
        moestream.convert(src, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    # a store written without the check (as before this change) verifies as not loadable
    from moestream.formats.convert import convert as formats_convert
    formats_convert(src, tmp_path / "old", progress=False)
    p = run_cli("verify", tmp_path / "old")
    assert p.returncode == 1 and re.search(message, p.stdout) and "dense tensors" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_a_tied_checkpoint_without_lm_head_converts_and_loads(checkpoints, tmp_path):
    from moestream.compute import load_model

    def tie(c):
        c["tie_word_embeddings"] = True
    src = _edited_copy(checkpoints["mixtral"], tmp_path / "c", config=tie, tensors=lambda sd: sd.pop("lm_head.weight"))
    out = moestream.convert(src, tmp_path / "s", progress=False)
    assert run_cli("verify", out).returncode == 0
    model = load_model(out)
    try:
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr() or torch.equal(
            model.lm_head.weight, model.embed_tokens.weight)
    finally:
        model.store.close()


def test_verify_of_a_good_store_checks_the_dense_set(checkpoints, tmp_path):
    p = run_cli("verify", moestream.convert(checkpoints["qwen3_moe"], tmp_path / "s", progress=False))
    assert p.returncode == 0 and p.stdout.startswith("ok:")
