"""`moestream bench convert` on a small synthetic checkpoint: every figure present and consistent."""
import json
import shutil

import pytest

from moestream.bench.convert import bench_convert, encode_rate, format_table
from moestream.cli import main


def test_bench_convert_reports_each_quant_against_disk_and_cores(tmp_path):
    d = bench_convert(64 << 20, workdir=str(tmp_path), progress=lambda m: None)
    assert d["input_bytes"] >= 64 << 20
    for q in ("keep", "int4"):
        m = d[q]
        assert "error" not in m, m
        assert m["input_gbps"] == pytest.approx(d["input_bytes"] / m["seconds"] / 1e9)
        assert m["vs_encode"] == pytest.approx(m["input_gbps"] / m["encode_gbps"])
        assert 0 < m["cpu_use"] <= 1.05 and m["peak_rss_bytes"] > 0
        if shutil.which("fio"):
            assert m["vs_disk"] == pytest.approx(m["input_gbps"] / d["disk_gbps"])
    # int4 stores a quarter of bf16's bits plus scales; keep about the input
    assert d["int4"]["store_bytes"] < 0.4 * d["keep"]["store_bytes"]
    assert d["keep"]["store_bytes"] > 0.9 * d["input_bytes"]
    assert "| int4 |" in format_table(d)
    assert list(tmp_path.iterdir()) == []           # everything it wrote is removed


def test_encode_rate_is_measured_per_quant():
    assert encode_rate("keep", 1, experts=2) > 0 and encode_rate("int4", 2, experts=2) > 0


def test_bench_convert_refuses_a_tiny_size(capsys):
    assert main(["bench", "convert", "--size", "1MiB"]) == 2
    assert "at least 64MiB" in capsys.readouterr().err
