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
