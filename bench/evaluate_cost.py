"""What a benchmark adds to the evaluate step: peak memory and wall time with and without one, same process kind.

Runs `kftune evaluate` (the pipeline's evaluate step: the base and the tuned model each loaded once,
scored, freed) twice in fresh processes, on a random model of the chosen shape with the tiny tokenizer
(bench/measure.build_model): once as the pipeline runs it by default, once with a multiple-choice
lm-evaluation-harness task of N examples (4 choices each, written here with its data beside its YAML).
The tuned model is a second folder holding the same weights, so both loads are real. Peak memory is
each process's own RSS high-water mark (os.wait4); lm-eval scores the models evaluate already holds, so
the peak should stay within 15% of the run without a benchmark (a second load of a model would not).

    python bench/evaluate_cost.py [--shape qwen2.5-0.5b|small] [--examples 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import QWEN2_5_0_5B, build_model

SHAPES = {
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
}
REPO = Path(__file__).resolve().parents[1]


def task_folder(folder: Path, examples: int) -> Path:
    """A 4-choice task of `examples` questions, its data beside its YAML (offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    cities = ["杭州", "成都", "上海", "广州", "北京", "西安", "长沙", "厦门"]
    docs = [
        {"q": f"第{i}家店「店铺{i}」在哪座城市？", "options": [cities[(i + k) % 8] for k in range(4)], "label": i % 4}
        for i in range(examples)
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{options}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1\n",
        encoding="utf-8",
    )
    return folder


def measure(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `kftune evaluate` process, reaped with os.wait4 for its own rusage."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        command = [sys.executable, "-m", "kftune.cli", "evaluate", *args]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"kftune evaluate failed ({proc.returncode}):\n{err.read()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--examples", type=int, default=100, help="benchmark examples (each scored on both models)")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--samples", type=int, default=2, help="greedy answers generated per model, as the pipeline does")
    p.add_argument("--quick", action="store_true", help="small shape, 20 examples: a check that the script runs")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        args.shape, args.examples, args.eval_rows = "small", 20, 8
    from kftune.dev.sample_data import write_samples

    cache = Path(tempfile.gettempdir()) / f"kftune-bench-{args.shape}"
    base = build_model(cache / "base", SHAPES[args.shape])
    with tempfile.TemporaryDirectory(prefix="kftune-evalcost-") as tmp:
        tuned = Path(tmp, "tuned")
        shutil.copytree(base, tuned)  # same weights, a second folder: evaluate loads each once
        data = write_samples(Path(tmp, "eval.jsonl"), rows=args.eval_rows, seed=7)
        task = task_folder(Path(tmp, "task"), args.examples)
        common = ["--model", str(tuned), "--base_model", str(base), "--eval_data", str(data)]
        common += ["--samples", str(args.samples), "--max_new_tokens", "16", "--max_seq_length", "256"]
        runs = {}
        for label, extra in (
            ("without", []),
            ("with", ["--benchmarks", str(task), "--benchmark_limit", str(args.examples)]),
        ):
            seconds, peak = measure([*common, "--output_dir", str(Path(tmp, label)), *extra])
            runs[label] = {"seconds": round(seconds, 2), "peak_bytes": peak}
            print(f"  {label:<8} benchmark: {seconds:7.1f} s, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr)
        metrics = json.loads(Path(tmp, "with", "metrics.json").read_text())["benchmarks"]["bench_mc"]
    extra_s = runs["with"]["seconds"] - runs["without"]["seconds"]
    per_example = extra_s / (2 * args.examples)  # each example scored on the base and the tuned model
    ratio = runs["with"]["peak_bytes"] / runs["without"]["peak_bytes"]
    load = os.getloadavg()
    lines = [
        f"evaluate step, shape {args.shape} {SHAPES[args.shape]}, {args.eval_rows} eval rows, {args.samples} samples, "
        f"benchmark: {args.examples} 4-choice examples (lm-eval, loglikelihood), both models",
        f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"{'run':<22}{'wall s':>9}{'peak GiB':>10}",
        f"{'without benchmark':<22}{runs['without']['seconds']:>9.1f}{runs['without']['peak_bytes'] / 2**30:>10.2f}",
        f"{'with benchmark':<22}{runs['with']['seconds']:>9.1f}{runs['with']['peak_bytes'] / 2**30:>10.2f}",
        f"benchmark adds {extra_s:.1f} s: {per_example * 1000:.0f} ms per example per model "
        f"({metrics['examples']} examples scored, acc base {metrics['base']:.3f} tuned {metrics['tuned']:.3f})",
        f"peak memory with / without: {ratio:.3f} ({'within' if ratio <= 1.15 else 'NOT within'} 15%)",
    ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "evaluate-cost-quick.json" if args.quick else f"evaluate-cost-{args.shape}.json"
    (args.out / name).write_text(
        json.dumps(
            {"shape": args.shape, "examples": args.examples, "runs": runs, "ratio": ratio, "table": lines}, indent=2
        )
        + "\n"
    )
    return 0 if ratio <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
