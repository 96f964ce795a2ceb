"""`moestream bench io` end to end on a small synthetic store (figures are not asserted:
speed targets live in the benchmark, not in tests)."""
import json
import shutil
import subprocess
import sys

from moestream.bench.io import bench_io, format_table, run_fio


def test_bench_io_reports_every_figure(tmp_path):
    d = bench_io(synthetic=40 << 20, workdir=str(tmp_path), repeat=1, backends=["posix"], progress=lambda m: None)
    rows = {(r["engine"], r["order"], r["cache"][:4]) for r in d["results"]}
    assert rows == {("posix", o, c) for o in ("sequential", "random") for c in ("cold", "warm")}
    assert all(r["gbps"] > 0 and r["bytes"] == d["bytes_per_pass"] for r in d["results"])
    assert d["extents"] > 0 and d["bytes_per_pass"] >= d["extents"] * (6 << 20)
    assert d["safetensors_random_cold"]["bytes"] > 0 and d["store_fetch_random_cold"]["bytes"] == d["bytes_per_pass"]
    if shutil.which("fio"):
        assert d["fio"]["random"]["gbps"] > 0 and "posix_random_cold_vs_fio" in d["ratios"]
    else:
        assert d["fio"] == {} and d["uring_random_cold_vs_fio"] is None
    table = format_table(d)
    assert "posix" in table and "safetensors" in table
    if shutil.which("fio"):   # the table says what fio ran, to rerun it by hand
        assert f"fio (random): {d['fio']['random']['command']}" in table
    assert list(tmp_path.iterdir()) == []  # the synthetic store is removed


def test_cli_bench_io_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "moestream.cli", "bench", "io", "--synthetic", "30MiB", "--workdir",
                        str(tmp_path), "--repeat", "1", "--backend", "posix", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert "uring_random_cold_vs_fio" in d and d["queue_depth"] == 32 and d["chunk_bytes"] == 1 << 20


def test_run_fio_without_fio(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert run_fio("/nonexistent", rw="read", bs=4096, iodepth=1, size=4096) is None


def test_cli_bench_io_refuses_zero_repeats(capsys):
    from moestream.cli import main
    assert main(["bench", "io", "--synthetic", "1MiB", "--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_the_raw_figure_is_uring_at_its_best_over_fios_grid(tmp_path):
    """uring_random_cold_vs_fio_best compares best against best: our raw path over the same grid
    of request sizes and depths as fio's sweep (issue 22 item 5)."""
    import pytest
    from moestream.storage.uring import supported as uring_supported
    if not uring_supported()[0]:
        pytest.skip("no io_uring here")
    d = bench_io(synthetic=40 << 20, workdir=str(tmp_path), repeat=1, backends=["uring"], progress=lambda m: None)
    grid = {(x["chunk"], x["queue_depth"]) for x in d["uring_sweep"]}
    assert len(grid) == 9 and all(x["gbps"] > 0 for x in d["uring_sweep"])
    assert d["uring_best_random_cold_gbps"] == max(x["gbps"] for x in d["uring_sweep"])
    if shutil.which("fio"):
        assert d["uring_random_cold_vs_fio_best"] == d["uring_best_random_cold_gbps"] / d["fio_best_random_cold_gbps"]
    assert "uring sweep" in format_table(d)


def test_bench_io_plots_each_request_size_for_ours_and_fio(tmp_path):
    from moestream.bench.io import plot
    sweep = [{"chunk": c, "queue_depth": q, "gbps": 1.0 + q / 100} for c in (1 << 18, 1 << 20) for q in (32, 128)]
    fio = [{"bs": c, "iodepth": q, "gbps": 2.0} for c in (1 << 18, 1 << 20) for q in (32, 128)] + [{"bs": 1, "iodepth": 1}]
    labels = plot({"uring_sweep": sweep, "fio_sweep": fio, "page_cache_dropped": True}, str(tmp_path / "io.png"))
    assert labels == ["moestream uring, 256.00 KiB requests", "moestream uring, 1.00 MiB requests",
                      "fio, 256.00 KiB requests", "fio, 1.00 MiB requests"]     # a failed fio point is not drawn
    assert (tmp_path / "io.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
