"""Issue 23 item 1: no CLI output path may destroy a store or the command's own inputs, nor
replace an existing file without --overwrite (each case one line, exit 2, nothing written)."""
import subprocess
import sys

import pytest
import torch

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


# ---- issue 23 items 11-15: the CLI's ends -------------------------------------------------------

def test_debug_zero_means_off_and_a_closed_stdout_is_a_normal_end(store):
    import os
    env = dict(os.environ, MOESTREAM_DEBUG="0")
    p = subprocess.run([sys.executable, "-m", "moestream.cli", "generate", "/nonexistent-store", "--prompt", "hi"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith("moestream: error:")
    sh = subprocess.run(f"{sys.executable} -m moestream.cli generate {store} --prompt hello "
                        f"--max-new-tokens 24 | head -c1", shell=True, capture_output=True, text=True,
                        executable="/bin/bash")
    assert len(sh.stdout) == 1
    assert "Broken pipe" not in sh.stderr and "error" not in sh.stderr, sh.stderr


def test_the_end_of_a_run_flushes_an_incomplete_character(store):
    """The streamed text ends with what tokenizer.decode gives for the same tokens, replacement
    characters included (what the server returns)."""
    from moestream.compute.generation import encode_prompt, generate_text, load_tokenizer
    from moestream.compute import load_model
    import io
    model = load_model(store)
    try:
        tok = load_tokenizer(model)
    finally:
        model.store.close()
    mismatches = 0
    for prompt in ("hi", "the", "a b", "xyz"):
        out, err = io.StringIO(), io.StringIO()
        generate_text(str(store), prompt, max_new_tokens=12, out=out, err=err)
        model = load_model(store)
        try:
            ids = torch.tensor([encode_prompt(tok, prompt, model.cfg.bos_token_id)])
            new = model.generate(ids, 12, eos_token_id=model.cfg.eos_token_id)[0, ids.shape[1]:].tolist()
        finally:
            model.store.close()
        want = prompt + tok.decode(new) + "\n"
        assert out.getvalue() == want, (out.getvalue(), want)
        mismatches += "\ufffd" in want
    print(f"{mismatches} of 4 runs end in an incomplete character")


def test_ctrl_c_in_generate_keeps_the_trace_and_the_report(store, tmp_path, monkeypatch):
    import io
    from moestream.compute.generation import generate_text
    from moestream.compute.models.common import CausalLM
    from moestream.formats.trace import RoutingTrace
    real = CausalLM.generate

    def interrupted(self, *args, on_token=None, **kw):
        def tick(t, n=[0]):
            on_token(t)
            n[0] += 1
            if n[0] == 3:
                raise KeyboardInterrupt
        return real(self, *args, on_token=tick, **kw)
    monkeypatch.setattr(CausalLM, "generate", interrupted)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        generate_text(str(store), "hello", max_new_tokens=20, trace=str(tmp_path / "t.npz"), out=out, err=err)
    assert "decode 3 tokens" in err.getvalue() and "interrupted" in err.getvalue()
    assert RoutingTrace.load(tmp_path / "t.npz").meta["interrupted"] is True
    monkeypatch.undo()
    p = subprocess.run([sys.executable, "-c", "import signal, os, sys; from moestream.cli import main; "
                        "import moestream.compute.generation as g; "
                        "g.generate_text = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()); "
                        f"sys.exit(main(['generate', {str(store)!r}, '--prompt', 'x']))"],
                       capture_output=True, text=True)
    assert p.returncode == 130 and p.stderr.strip() == "moestream: interrupted", p.stderr


def test_a_trace_onto_a_full_disk_names_the_file_and_leaves_nothing(store, tmp_path):
    """/dev/full: every write fails with ENOSPC, like a full disk."""
    from moestream.formats.atomic import write_atomic
    target = tmp_path / "t.npz"
    import errno
    import os

    def fill(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as e:
        write_atomic(target, fill)
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_api_misuse_gets_clear_errors(store):
    import moestream
    from moestream.compute import load_model
    with pytest.raises(moestream.UsageError, match=r"dtype='half': choose one of bfloat16, float16, float32"):
        load_model(store, dtype="half")
    model = load_model(store, dtype="float16")
    assert model.embed_tokens.weight.dtype == torch.float16
    model.store.close()
    with pytest.raises(moestream.MoestreamError, match="the store is closed"):
        model.store.dense()
    with pytest.raises(moestream.UsageError, match="prefetch_threshold=nan"):
        load_model(store, prefetch_threshold=float("nan"))
    with pytest.raises(moestream.UsageError, match="pinned_experts: the store has no layer 7 expert 0"):
        moestream.open(store, pinned_experts=[(7, 0)])


def test_missing_extras_name_the_install_line(store, monkeypatch, tmp_path):
    import importlib.util
    import moestream
    from moestream.compute.generation import generate_text
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("transformers", "matplotlib")
                        else real(name, *a))
    with pytest.raises(moestream.UsageError, match=r"needs transformers, which is not installed \(pip install 'moestream\[hf\]'\)"):
        generate_text(str(store), "hi", engine="transformers")
    from moestream.cli import main
    assert main(["bench", "cache", "--synthetic", "2x8x2", "--plot", str(tmp_path / "p.png")]) == 2


def test_generate_says_the_budgets_it_chose_and_refuses_more_than_is_free(store):
    p = run_cli("generate", store, "--prompt", "hi", "--max-new-tokens", "2", "--device-budget", "10%")
    assert p.returncode == 0, p.stderr
    assert "budgets: device tier" in p.stderr and "10% of the" in p.stderr and "of RAM available" in p.stderr
    p = run_cli("generate", store, "--prompt", "hi", "--max-new-tokens", "2", "--device-budget", "100TiB")
    assert p.returncode == 1 and "device_budget 100.00 TiB is more than the" in p.stderr and "Traceback" not in p.stderr


def test_prompt_from_stdin_or_a_file_and_the_version(store, tmp_path):
    """Issue 26 item 4 (part): --prompt - reads standard input, --prompt-file a file; both give
    what --prompt TEXT gives."""
    args = ("generate", str(store), "--max-new-tokens", "4")
    direct = run_cli(*args, "--prompt", "the cat")
    piped = subprocess.run([sys.executable, "-m", "moestream.cli", *args, "--prompt", "-"], input="the cat\n",
                           capture_output=True, text=True)
    (tmp_path / "p.txt").write_text("the cat\n")
    from_file = run_cli(*args, "--prompt-file", tmp_path / "p.txt")
    assert direct.returncode == piped.returncode == from_file.returncode == 0, piped.stderr + from_file.stderr
    assert direct.stdout == piped.stdout == from_file.stdout and direct.stdout.startswith("the cat")
    empty = subprocess.run([sys.executable, "-m", "moestream.cli", *args, "--prompt", "-"], input="",
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr
    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"moestream {moestream.__version__}"


def test_chat_keeps_the_history_streams_and_takes_commands(store, monkeypatch):
    """Issue 26 item 4: `moestream chat`: each turn is formatted with the whole history (the
    second prompt holds the first exchange), replies stream to stdout, /stats and /reset work,
    /exit ends."""
    import io
    import moestream.serving.chat_format as cf
    from moestream.chat import chat
    seen = []
    real = cf.format_chat

    def spy(messages, template):
        seen.append([dict(m) for m in messages])
        return real(messages, template)
    monkeypatch.setattr(cf, "format_chat", spy)
    out, err = io.StringIO(), io.StringIO()
    n = chat(str(store), max_new_tokens=5, temperature=0, inp=io.StringIO("hello\n/stats\nagain\n/reset\nthird\n/exit\nignored\n"),
             out=out, err=err)
    assert n == 3
    assert [m["content"] for m in seen[0]] == ["hello"]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"] and seen[1][2]["content"] == "again"
    assert [m["content"] for m in seen[2]] == ["third"]                      # after /reset
    assert "L1 hits" in err.getvalue() and "forgotten" in err.getvalue()
    replies = out.getvalue().split("\n")[:3]
    assert replies[0] == seen[1][1]["content"]                               # the streamed reply is the kept one
    p = subprocess.run([sys.executable, "-m", "moestream.cli", "chat", str(store), "--max-new-tokens", "3",
                        "--temperature", "0"], input="hi\n", capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.count("\n") == 1, p.stderr
