"""Throughput of the data validation gate against plain `json.loads` of the same file, in one run.

Generates a JSONL file of short, distinct alpaca rows, then times (1) reading it with
`json.loads` per line, (2) the gate without a tokenizer and (3) the gate with the tiny Qwen2
tokenizer (or --tokenizer), which counts tokens in batches under the chat template. Prints a
table of rows/s; the issue's target is 50,000 short rows/s on 2 cores with the tokenizer.

    python bench/validate_throughput.py [--rows N] [--quick] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
            row = {"instruction": f"用一句话介绍{topic}，编号{i}", "input": "",
                   "output": f"{topic}让人心情很好，第{i}次体验依然惊喜 {rnd.randint(0, 999)}"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


def timed(work) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of every thread, result): CPU time shows what a loaded machine hides."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def json_loads(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if json.loads(line) is not None)


def gate(path: Path, out: Path, tokenizer: str | None) -> int:
    from kftune.validate import Options, validate

    return validate(path, out, Options(tokenizer=tokenizer, min_rows=0)).rows_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the generated file")
    parser.add_argument("--quick", action="store_true", help="20,000 rows: a smoke run for tests")
    parser.add_argument("--tokenizer", help="a tokenizer or base model folder; default: a tiny Qwen2 built here")
    args = parser.parse_args(argv)
    rows = 20_000 if args.quick else args.rows

    with tempfile.TemporaryDirectory(prefix="kftune-bench-validate-") as tmp:
        tmp_path = Path(tmp)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from kftune.tiny_model import build_tiny_model

            tokenizer = str(build_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1, intermediate_size=32))
        data = tmp_path / "short.jsonl"
        size = write_rows(data, rows)
        runs = {"json.loads per line (baseline)": lambda: json_loads(data),
                "gate, no tokenizer": lambda: gate(data, tmp_path / "out-plain", None),
                "gate + batched tokenizer": lambda: gate(data, tmp_path / "out-tokens", tokenizer)}
        results = []
        for label, work in runs.items():
            wall, cpu, seen = timed(work)
            assert seen == rows, f"{label} saw {seen} rows of {rows}"
            results.append((label, wall, cpu))

    print(f"{rows:,} short rows, {size / rows:.0f} bytes each, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, tokenizer {args.tokenizer or 'tiny Qwen2 (built here)'}")
    print(f"{'what':34s} {'seconds':>8s} {'rows/s':>10s} {'rows/CPU-s':>11s} {'vs json.loads':>14s}")
    for label, wall, cpu in results:
        print(f"{label:34s} {wall:8.2f} {rows / wall:10,.0f} {rows / cpu:11,.0f} {results[0][1] / wall:13.2f}x")
    gate_rate = rows / results[-1][1]
    verdict = "met" if gate_rate >= TARGET_ROWS_PER_S else "NOT met"
    print(f"target {TARGET_ROWS_PER_S:,} rows/s with the tokenizer: {verdict} ({gate_rate:,.0f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
