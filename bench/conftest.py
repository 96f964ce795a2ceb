def pytest_terminal_summary(terminalreporter):
    """Print GB/s per benchmark and each kernel's ratio to the copy measured in the same run."""
    bs = getattr(terminalreporter.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        terminalreporter.write_line("no benchmarks recorded")
        return
    rows = {b.name: b.extra_info["out_gbps"] for b in bs.benchmarks if "out_gbps" in b.extra_info}
    copy = rows.get("test_memcpy_same_size")
    terminalreporter.write_line("")
    for name, gbps in rows.items():
        ratio = f"  ({gbps / copy:.2f}x of copy)" if copy else ""
        terminalreporter.write_line(f"{name:<40} {gbps:8.2f} GB/s of output{ratio}")
