"""The benchmarks' --quick forms run from a checkout and print their tables (numbers are the benchmarks' job)."""

import json
import subprocess

import pytest

from .conftest import run_cli


def bench(script: str, out, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = run_cli(f"bench/{script}", "--quick", "--out", str(out), *args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_memory_table_quick(tmp_path):
    proc = bench("memory_table.py", tmp_path)
    rows = proc.stdout.split("method", 1)[1].splitlines()[1:8]
    labels = ["full-fp32", "full-bf16", "lora", "lora-ckpt", "qlora4", "qlora4-ckpt", "qlora8"]
    assert [row.split()[0] for row in rows] == labels
    # each method's peak against full fp32's, beside the guide's ratio
    ratios = [line for line in proc.stdout.splitlines() if "x full-fp32's (guide" in line]
    assert [line.split(":")[0] for line in ratios] == labels[2:]
    report = json.loads((tmp_path / "memory_table-quick-cpu.json").read_text())
    by_label = {r["label"]: r for r in report["rows"]}
    assert by_label["lora"]["trainable_params"] < by_label["full-fp32"]["trainable_params"]
    assert all(r["peak_bytes"] > 2**28 and r["estimate_bytes"] > 0 for r in report["rows"])
    assert (tmp_path / "memory_table-quick-cpu.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    proc = bench("throughput.py", tmp_path)
    assert "baseline: Trainer + peft" in proc.stdout and "kftune, padding-free (default)" in proc.stdout
    report = json.loads((tmp_path / "throughput-tiny-cpu.json").read_text())
    baseline, padded, free = report["runs"]
    assert baseline["ratio"] == 1.0 and free["mfu"] > 0
    # the baseline computes on padding: its real tokens per step equal kftune's, its padded tokens do not
    assert abs(baseline["tokens_per_step"] - free["tokens_per_step"]) < 0.2 * free["tokens_per_step"]
    assert len(padded["losses"]) == len(free["losses"]) == 6


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_overhead_quick(tmp_path):
    proc = bench("pipeline_overhead.py", tmp_path)
    assert "pipeline overhead:" in proc.stdout
    report = json.loads((tmp_path / "pipeline_overhead.json").read_text())
    assert (
        set(report["pipeline"])
        == set(report["in_process"])
        == {"validate-data", "train", "evaluate", "merge-adapter", "register-model"}
    )
    assert report["ratio"] > 0


def bench_module(name: str):
    import importlib
    import sys

    from .conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_peak_anonymous_memory_follows_a_childs_heap_not_its_file_pages(tmp_path):
    """A child that maps and reads a 256 MiB file and then allocates 128 MiB: its anonymous peak sees the 128, not the 256."""
    import os
    import sys

    report = bench_module("peers_report")
    data = tmp_path / "file.bin"
    data.write_bytes(os.urandom(1 << 20) * 256)
    code = (
        "import mmap, time\n"
        f"f = open({str(data)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "heap = bytearray(128 << 20)\n"
        "for i in range(0, len(heap), 4096): heap[i] = 1\n"
        "time.sleep(0.5)\n"
    )
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = report.AnonPeak(proc.pid)
    sampler.start()
    _, _, usage = os.wait4(proc.pid, 0)
    anon = sampler.stop()
    assert 128 << 20 <= anon < 200 << 20, anon
    assert usage.ru_maxrss * 1024 > 256 << 20  # peak RSS counts the file's pages too


def test_rows_give_medians_and_ranges_and_ratios_on_both_memory_measures():
    report = bench_module("peers_report")

    def run(rss, anon, speed):
        return {"peak_rss_bytes": rss, "peak_anon_bytes": anon, "real_tokens_per_s": speed, "losses": [1.0]}

    rows = [
        report.summarize("kftune", "lora", [run(30, 10, 150), run(34, 12, 160), run(32, 11, 140)]),
        report.summarize("trl", "lora", [run(50, 20, 100), run(48, 21, 90), run(52, 19, 95)]),
        report.summarize("llamafactory", "lora", [{"error": "boom"}]),
    ]
    assert rows[0]["peak_rss_bytes"] == {"median": 32, "min": 30, "max": 34}
    assert rows[2]["error"] == "boom" and len(rows[0]["runs"]) == 3
    assert report.ratios(rows) == [
        "lora: peak RSS 0.64x trl's (target <= 0.7: met)",
        "lora: peak anon 0.55x trl's (target <= 0.7: met)",
        "lora: real tokens/s 1.58x trl's (target >= 1.5: met)",
    ]
