"""bench/llama_cpp.py without building llama.cpp: a stand-in llama-bench that prints what the
real one prints with `-o json`, and checks the arguments it was given."""
import json
import stat

import pytest

from moestream.bench import llama_cpp


def fake_tree(tmp_path, rows, code=0):
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "llama-bench"
    script.write_text("#!/bin/sh\n" f"echo \"$@\" > {tmp_path / 'args'}\n"
                      f"echo '{json.dumps(rows)}'\n" + (f"echo 'error: boom' >&2\nexit {code}\n" if code else ""))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def test_run_bench_reads_the_decode_row_and_passes_the_options(tmp_path):
    rows = [{"n_prompt": 0, "n_gen": 16, "avg_ts": 87.5, "stddev_ts": 1.5, "samples_ns": [1, 2]}]
    src = fake_tree(tmp_path, rows)
    r = llama_cpp.run_bench(src, tmp_path / "m.gguf", 16, threads=2, repack=False)
    assert r["tokens_per_s"] == 87.5 and r["stddev_tokens_per_s"] == 1.5
    args = (tmp_path / "args").read_text().split()
    for flag, value in (("-p", "0"), ("-n", "16"), ("-t", "2"), ("--repack", "0"), ("-lm", "mmap"), ("-o", "json")):
        assert args[args.index(flag) + 1] == value


def test_run_bench_reads_the_prefill_row_when_asked_for_a_prompt(tmp_path):
    rows = [{"n_prompt": 256, "n_gen": 0, "avg_ts": 1098.5, "stddev_ts": 9.1, "samples_ns": [1]}]
    src = fake_tree(tmp_path, rows)
    r = llama_cpp.run_bench(src, tmp_path / "m.gguf", 0, prompt=256, threads=2, repetitions=3)
    assert r["tokens_per_s"] == 1098.5
    args = (tmp_path / "args").read_text().split()
    for flag, value in (("-p", "256"), ("-n", "0"), ("-r", "3"), ("--repack", "1")):
        assert args[args.index(flag) + 1] == value


def test_run_bench_failure_names_the_exit_and_the_error(tmp_path):
    src = fake_tree(tmp_path, [], code=3)
    with pytest.raises(RuntimeError, match="llama-bench exit 3: error: boom"):
        llama_cpp.run_bench(src, tmp_path / "m.gguf", 4, threads=1)


def test_ensure_built_reuses_a_built_tree(tmp_path):
    src = llama_cpp.tree(tmp_path)
    (src / "build" / "bin").mkdir(parents=True)
    for n in ("llama-bench", "llama-quantize"):
        (src / "build" / "bin" / n).write_text("")
    assert llama_cpp.ensure_built(tmp_path) == (src, "")
