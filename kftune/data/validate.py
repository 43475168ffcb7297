"""The data validation gate: every fault in an SFT data set found by row and rule, no valid row lost.

`validate(source, out_dir, options)` reads the data once, streaming: JSONL line by line, and a
JSON array item by item (an incremental parser, so neither form is held in memory). Each row is
parsed, checked against RULES, normalised to chat messages and token-counted in batches under
the base model's chat template. Accepted rows, rejected rows (file:line, rule, message) and
warnings stream to files; only 64-bit hashes (about 250 bytes per accepted row, measured) are
kept for the duplicate, leakage and split logic, never rows. A second pass over
accepted.jsonl writes the train/eval split. Everything is written to a temporary folder that
is renamed into place last, so `out_dir` is either complete or untouched.

`kftune validate-data DATA ...` exits 0 when the gate passes, 1 when it fails (the report is
still written) and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.atomic import building
from kftune.core.errors import KftuneError
from kftune.data.checker import Checker, hash64, norm, question_of
from kftune.data.formats import FORMATS
from kftune.data.parallel import parallel_batches, row_batches, serial_blocks, worker_count
from kftune.data.row_rules import schema
from kftune.data.rules import POLICY_KINDS, RULES, Note, Options
from kftune.data.sink import Sink, gate_failures, token_stats
from kftune.data.streaming import BrokenFile, fetch, open_data, read_rows
from kftune.data.token_counting import load_counter
from kftune.data.validation_report import Report, render_html

PROGRESS_MIN_BYTES = 16 * 1024 * 1024


def _external_questions(source: str) -> tuple[set[int], int]:
    """Question keys of an external eval set, and how many of its rows were unusable (skipped)."""
    questions, unusable = set(), 0
    with open_data(fetch(source)) as (stream, _, data_format):
        try:
            for row in read_rows(stream, data_format):
                if isinstance(row, Note):
                    continue
                if not row.problems:
                    schema(row)
                if row.problems or not any(m.get("role") == "user" for m in row.messages):
                    unusable += 1
                else:
                    questions.add(hash64(question_of(row.messages, [norm(m["content"]) for m in row.messages])))
        except BrokenFile as exc:
            raise KftuneError(f"--eval-data {source}:{exc.line}: {exc.message}") from None
    return questions, unusable


def _progress(total: int, enabled: bool) -> Any:
    """A byte-based progress bar for long files, or None."""
    if not enabled or total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="validate-data", mininterval=1.0)


def _run(sink: Sink, checker: Checker, path: Path, options: Options) -> tuple[str, str]:
    """Stream the file through the checker and the sink, batch by batch; returns (sha256, format)."""
    with open_data(path) as (stream, reader, data_format):
        size = path.stat().st_size
        bar = _progress(size, options.progress)
        workers = worker_count(options, size) if data_format == "jsonl" else 1
        if workers > 1:
            batches = parallel_batches(sink, checker, stream, workers)
        elif data_format == "jsonl":
            batches = serial_blocks(sink, checker, stream)
        else:
            batches = (checker.check(batch) for batch in row_batches(sink, read_rows(stream, data_format)))
        for batch in batches:
            sink.add(batch)
            if bar:
                bar.update(reader.bytes_read - bar.n)
        if bar:
            bar.close()
        stream.read()  # the sha256 covers every byte, also after a broken array
        return reader.sha256.hexdigest(), data_format


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off while rows stream through (and in the forked workers).

    Each row makes a few lists and tuples, so the collector would run every few hundred rows and
    walk every live object, the caches included: 10-30% of the gate's time, measured. Nothing in
    the gate makes reference cycles (rows are freed by reference counting; memory stays bounded,
    as tests/test_validate.py measures), and whatever else does is collected when it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that isn't an earlier validation output (it would be deleted)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KftuneError(f"--out {out_dir} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / artifacts.VALIDATION_REPORT).is_file():
        raise KftuneError(
            f"--out {out_dir} exists and is not an earlier validate-data output; pick another folder or empty it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def validate(source: str | os.PathLike, out_dir: str | os.PathLike, options: Options | None = None) -> Report:
    """Validate `source` (a local file or s3:// URI) and write every output to `out_dir`.

    Usage errors (no such file, a tokenizer that won't load, an `out_dir` that isn't ours to
    replace) raise KftuneError; a failed gate is a Report with `passed` False.
    """
    options = options or Options()
    started = time.perf_counter()
    name, out_dir = str(source), Path(out_dir)
    path = fetch(name)
    _prepare_out_dir(out_dir)
    counter = load_counter(options.tokenizer, options.max_seq_length) if options.tokenizer else None
    external, unusable = _external_questions(options.eval_data) if options.eval_data else (None, 0)
    with building(out_dir) as tmp:
        sink = Sink(options, name, tmp)
        try:
            with _without_cycle_collection():
                sha256, data_format = _run(sink, Checker(options, counter, external), path, options)
                train_rows, eval_rows, split_failures = sink.split()
        finally:
            sink.close()
        rules = {rule: {"action": options.action(rule), "rows": sink.rule_rows[rule]} for rule in RULES}
        if counter is None:
            for rule in ("length.too_long", "roles.template_error"):
                rules[rule]["action"] = "skipped (no --base_model or --tokenizer)"
        if external is None:
            rules["leakage.external_eval"]["action"] = "skipped (no --eval-data)"
        failures = gate_failures(sink, options) + split_failures
        report = Report(
            passed=not failures,
            failures=failures,
            out_dir=str(out_dir),
            source=name,
            dataset_sha256=sha256,
            data_format=data_format,
            rows_in=sink.rows_in,
            accepted=sink.accepted,
            rejected=sink.rejected,
            rows_with_warnings=sink.warned,
            train_rows=train_rows,
            eval_rows=eval_rows,
            rules=rules,
            token_lengths=token_stats(sink.lengths, options.max_seq_length),
            token_counting=counter.describe() if counter else None,
            options=asdict(options) | ({"eval_data_unusable_rows": unusable} if external is not None else {}),
            seconds=round(time.perf_counter() - started, 3),
            row_format=sink.format,
        )
        (tmp / artifacts.VALIDATION_REPORT).write_text(
            json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", "utf-8"
        )
        (tmp / artifacts.REPORT).write_text(render_html(report, sink.examples), "utf-8")
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def _policies(values: list[str]) -> dict[str, str]:
    """--policy length=truncate --policy pii=redact (or comma-separated) -> {"length": ..., "pii": ...}."""
    chosen = {}
    for item in (part.strip() for value in values for part in value.split(",") if part.strip()):
        kind, _, value = item.partition("=")
        if kind not in POLICY_KINDS or value not in POLICY_KINDS[kind]:
            choices = "; ".join(f"{k}={'|'.join(v)}" for k, v in POLICY_KINDS.items())
            raise KftuneError(f"--policy {item!r} is not a policy; choose from {choices}")
        chosen[kind] = value
    return chosen


def _parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="kftune validate-data",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "data", metavar="DATA", help="JSONL or JSON array file (any of --format's formats), or an s3:// URI"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--base_model",
        "--base-model",
        metavar="M",
        help="base model whose tokenizer and chat template count the tokens",
    )
    model.add_argument("--tokenizer", metavar="T", help="a tokenizer folder or hub id instead of the base model")
    parser.add_argument(
        "--max_seq_length",
        "--max-seq-length",
        metavar="N",
        type=int,
        default=defaults.max_seq_length,
        help="tokens per row after the chat template, as in training",
    )
    parser.add_argument(
        "--eval-fraction",
        "--eval_fraction",
        metavar="F",
        type=float,
        default=defaults.eval_fraction,
        help="share of distinct prompts held out as eval.jsonl (0: none)",
    )
    parser.add_argument(
        "--eval-data",
        "--eval_data",
        metavar="E",
        help="external eval set; train rows that share a question with it are rejected",
    )
    parser.add_argument(
        "--format",
        dest="data_format",
        choices=("auto", *FORMATS),
        default=defaults.data_format,
        help="the rows' format; auto takes the first row's, and a row in another format stops the gate",
    )
    parser.add_argument("--out", metavar="DIR", default="validation", help="output folder (replaced atomically)")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="KIND=VALUE",
        help="length=reject|truncate|keep (default reject), pii=flag|reject|redact (default flag); "
        "repeat or comma-separate",
    )
    parser.add_argument(
        "--max-reject-fraction",
        "--max_reject_fraction",
        metavar="F",
        type=float,
        default=defaults.max_reject_fraction,
        help="the gate fails above this share of rejected rows",
    )
    parser.add_argument(
        "--min-rows",
        "--min_rows",
        metavar="N",
        type=int,
        default=defaults.min_rows,
        help="the gate fails with fewer accepted rows",
    )
    parser.add_argument(
        "--min-response-chars",
        "--min_response_chars",
        metavar="N",
        type=int,
        default=defaults.min_response_chars,
        help="shorter final answers are rejected",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=defaults.workers,
        help="processes checking rows of a JSONL file (0: one per CPU, at most 4, for files over 8 MiB; 1: none)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    policies = _policies(args.policy)
    options = Options(
        tokenizer=args.base_model or args.tokenizer,
        max_seq_length=args.max_seq_length,
        length_policy=policies.get("length", "reject"),
        pii_policy=policies.get("pii", "flag"),
        min_response_chars=args.min_response_chars,
        eval_fraction=args.eval_fraction,
        eval_data=args.eval_data,
        max_reject_fraction=args.max_reject_fraction,
        min_rows=args.min_rows,
        workers=args.workers,
        progress=True,
        data_format=args.data_format,
    )
    report = validate(args.data, args.out, options)
    print(report.summary())
    return 0 if report.passed else 1
