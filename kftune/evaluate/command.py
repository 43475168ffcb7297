"""`kftune evaluate`'s flags: the base and the tuned model scored on the same held-out data
(kftune.evaluate.evaluation), with optional general-ability benchmarks (kftune.evaluate.benchmarks)."""

from __future__ import annotations

import argparse

from kftune.evaluate.evaluation import Settings, evaluate
from kftune.evaluate.report import format_table
from kftune.models.fingerprint import ALLOW_FLAG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kftune evaluate",
        description="Score a base and a tuned model on the same "
        "held-out data: loss on assistant tokens, ROUGE-L/chrF and checks on greedy answers.",
    )
    p.add_argument(
        "--model", required=True, help="the tuned model: adapter folder, merged/full model folder or s3:// URI"
    )
    p.add_argument("--base_model", help="its base (default: the base recorded in the model's kftune_config.json)")
    p.add_argument(
        "--eval_data", required=True, help="held-out data (JSONL/JSON in any kftune data format; local or s3://)"
    )
    p.add_argument("--output_dir", default="./eval_output", help="where metrics.json, samples.jsonl and report.html go")
    p.add_argument("--samples", type=int, default=Settings.samples, help="prompts answered greedily and scored")
    p.add_argument("--max_new_tokens", type=int, default=Settings.max_new_tokens)
    p.add_argument("--max_seq_length", type=int, help="tokens per scored row (default: the training config's)")
    p.add_argument("--batch_size", type=int, default=Settings.batch_size)
    p.add_argument(
        "--checks",
        help="output checks: comma list of built-in names (title, hashtag, length) or "
        "module:attribute; default: all built-in ones",
    )
    p.add_argument(
        "--benchmarks",
        default="",
        help="comma list of lm-evaluation-harness task names (arc_easy,hellaswag) and task folders (lm-eval YAML "
        "with local data) run on both models; kftune_smoke is a shipped smoke check",
    )
    p.add_argument("--benchmark_limit", type=int, help="examples per benchmark task (default: all)")
    p.add_argument("--guard_max_drop", type=float, help="mark benchmark drops beyond this fraction of the base")
    p.add_argument("--validation", help="validate-data output folder or report.json, for the token-length histogram")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32", "fp16"],
        help="compute precision; the one training used reproduces its eval_loss (auto: bf16 where native)",
    )
    p.add_argument(
        ALLOW_FLAG,
        "--allow_template_mismatch",
        dest="allow_template_mismatch",
        action="store_true",
        help="go on when the tokenizer or chat template differs from the one the model was trained with",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        max_seq_length=args.max_seq_length,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        checks=args.checks,
        precision=args.precision,
    )
    metrics = evaluate(
        args.model,
        args.eval_data,
        args.output_dir,
        base_model=args.base_model,
        settings=settings,
        validation=args.validation,
        allow_template_mismatch=args.allow_template_mismatch,
        benchmarks=args.benchmarks,
        benchmark_limit=args.benchmark_limit,
        guard_max_drop=args.guard_max_drop,
    )
    print(format_table(metrics))
    return 0
