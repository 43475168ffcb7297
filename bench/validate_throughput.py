"""Throughput of the data validation gate against plain `json.loads` of the same file, in one run.

Generates a JSONL file of short, distinct alpaca rows, then times (1) reading it with
`json.loads` per line, (2) the gate without a tokenizer, (3) the gate with the tiny Qwen2
tokenizer (or --tokenizer) counting every row's tokens under the chat template, checking rows
in worker processes (one per usable CPU), and (4) the same in one process. Importing
transformers and torch to load a tokenizer takes seconds; it is timed once, apart (a warm-up
run on a one-row file), so the table shows rows per second of the gate itself. CPU seconds
include the worker processes. Prints a table; the issue's target is 50,000 short rows/s on 2
cores with the tokenizer. The machine may be shared: the load average is printed, run it
more than once (--repeat) and read the range.

    python bench/validate_throughput.py [--rows N] [--quick] [--repeat N] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

TARGET_ROWS_PER_S = 50_000
TOPICS = ("猫", "咖啡", "火锅", "春天", "city walk", "面包", "雨天", "the sea", "旧书店", "跑步")


def write_rows(path: Path, rows: int, seed: int = 0) -> int:
    """Short distinct alpaca rows (~25 characters of prompt and answer each); returns the file size."""
    rnd = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            topic = rnd.choice(TOPICS)
            row = {
                "instruction": f"用一句话介绍{topic}，编号{i}",
                "input": "",
                "output": f"{topic}让人心情很好，第{i}次体验依然惊喜 {rnd.randint(0, 999)}",
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the gate's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(work) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of every thread and worker process, result)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = work()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def json_loads(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if json.loads(line) is not None)


def gate(path: Path, out: Path, tokenizer: str | None, workers: int = 0) -> int:
    from kftune.data.validate import Options, validate

    report = validate(path, out, Options(tokenizer=tokenizer, min_rows=0, workers=workers))
    if tokenizer:
        assert report.token_lengths["rows"] == report.accepted and report.token_counting["mismatches"] == 0
    return report.rows_in


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else ""
    )
    return f"{cpus} usable CPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the generated file")
    parser.add_argument("--quick", action="store_true", help="20,000 rows, one pass: a smoke run for tests")
    parser.add_argument("--repeat", type=int, default=1, help="time every line this many times; prints the range")
    parser.add_argument("--tokenizer", help="a tokenizer or base model folder; default: a tiny Qwen2 built here")
    args = parser.parse_args(argv)
    rows = 20_000 if args.quick else args.rows

    with tempfile.TemporaryDirectory(prefix="kftune-bench-validate-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from kftune.dev.tiny_model import build_tiny_model

            tokenizer = str(
                build_tiny_model(
                    tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32
                )
            )
        data = tmp_path / "short.jsonl"
        size = write_rows(data, rows)
        write_rows(tmp_path / "one.jsonl", 1)
        startup, _, _ = timed(lambda: gate(tmp_path / "one.jsonl", tmp_path / "warm-up", tokenizer))
        runs = {
            "json.loads per line (baseline)": lambda: json_loads(data),
            "gate, no tokenizer": lambda: gate(data, tmp_path / "out-plain", None),
            "gate + tokenizer (workers)": lambda: gate(data, tmp_path / "out-tokens", tokenizer),
            "gate + tokenizer, one process": lambda: gate(data, tmp_path / "out-one", tokenizer, workers=1),
        }
        results: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
        for _ in range(args.repeat):
            for label, work in runs.items():
                wall, cpu, seen = timed(work)
                assert seen == rows, f"{label} saw {seen} rows of {rows}"
                results[label].append((wall, cpu))

    print(
        f"{rows:,} short rows, {size / rows:.0f} bytes each; {machine()}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the machine slows every line)"
    )
    print(
        f"tokenizer {args.tokenizer or 'tiny Qwen2 (built here)'}: loading it took {startup:.1f} s, not counted "
        "below (a fresh process also imports transformers and torch first: seconds)"
    )
    print(f"{'what':32s} {'rows/s (best)':>14s} {'rows/s range':>19s} {'rows/CPU-s':>11s} {'vs json.loads':>14s}")
    best = {label: rows / min(wall for wall, _ in timings) for label, timings in results.items()}
    for label, timings in results.items():
        rates = sorted(rows / wall for wall, _ in timings)
        cpu = min(c for _, c in timings)
        print(
            f"{label:32s} {best[label]:14,.0f} {f'{rates[0]:,.0f}-{rates[-1]:,.0f}':>19s} {rows / cpu:11,.0f} "
            f"{best[label] / best['json.loads per line (baseline)']:13.2f}x"
        )
    gate_rate = best["gate + tokenizer (workers)"]
    verdict = "met" if gate_rate >= TARGET_ROWS_PER_S else "NOT met"
    print(f"target {TARGET_ROWS_PER_S:,} rows/s with the tokenizer: {verdict} ({gate_rate:,.0f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
