"""The gate's sink: rows in file order are checked against each other (duplicates), written where
they belong (accepted, rejected, warnings) and split into train and eval."""

from __future__ import annotations

import heapq
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.checker import CleanRow
from kftune.data.formats import CHAT_FAMILY, detect, from_json, to_json
from kftune.data.rules import Note, Options, Row

EXAMPLES = 20  # rejected and warned rows shown in report.html
MASK32 = (1 << 32) - 1


class Sink:
    """Applies the rules across rows (duplicates) in file order and writes each row where it belongs."""

    def __init__(self, options: Options, name: str, folder: Path) -> None:
        self.options, self.name, self.folder = options, name, folder
        self.files = {
            k: open(folder / f"{k}.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
            for k in ("accepted", "rejected", "warnings")
        }
        self.rule_rows: Counter[str] = Counter()
        self.rows_in = self.accepted = self.rejected = self.warned = 0
        self.fatal: str | None = None
        self.examples: dict[str, list[dict]] = {"rejected": [], "warnings": []}
        self.seen: dict[int, int] = {}  # prompt key -> answer hash << 32 | line of its first row (one int: ~100 B)
        self.repeats: dict[tuple[int, int], int] = {}  # (prompt, answer) -> line, for answers after the first
        self.prompt_keys, self.question_keys, self.lines = array("Q"), array("Q"), array("Q")  # per accepted row
        self.lengths: Counter[int] = Counter()
        explicit = options.data_format != "auto"
        self.format, self.format_line = (options.data_format, None) if explicit else (None, None)

    def where(self, line: int) -> str:
        return f"{self.name}:{line}"

    def add(self, rows: list[Row | CleanRow]) -> None:
        """Checked rows, in file order (so the first of two duplicates is the one kept)."""
        for row in rows:
            if type(row) is tuple:  # a clean row from the fast lane
                line, tokens, keys, text, raw = row
                if self.format not in CHAT_FAMILY or self.format_line is None:  # explicit alpaca/messages: which?
                    self.check_format(line, detect(from_json(raw.decode()) if isinstance(raw, bytes) else raw))
                if keys[0] not in self.seen:  # a new prompt (nearly always): kept, without building a Row
                    self.seen[keys[0]] = keys[1] << 32 | min(line, MASK32)
                    self.rows_in += 1
                    self._keep(line, keys, tokens, text)
                    continue
                row = Row(line, None, raw, tokens=tokens, keys=keys, text=text)
            self.check_format(row.line, row.format)
            if not row.problems:
                self._duplicates(row)
            self._write(row)

    def check_format(self, line: int, fmt: str | None) -> None:
        """One format per file (alpaca and messages may share one, as they always could): the first row
        in another format stops the gate with one line naming it and both formats."""
        if fmt is None:  # a row that could not be read says so itself
            return
        if self.format is None:
            self.format, self.format_line = fmt, line
            return
        if fmt == self.format or ({fmt, self.format} <= CHAT_FAMILY and self.format_line is not None):
            return
        by = f"the file's first row (line {self.format_line}) is" if self.format_line else "--format says"
        raise KftuneError(
            f"{self.where(line)}: this row is {fmt}, but {by} {self.format}; keep one format per file "
            "(split the file, or convert the rows)"
        )

    def _duplicates(self, row: Row) -> None:
        """The first row wins; later ones name its line."""
        prompt, answer, _ = row.keys
        first = self.seen.get(prompt)
        if first is None:
            self.seen[prompt] = answer << 32 | min(row.line, MASK32)
        else:
            same = first & MASK32 if first >> 32 == answer else self.repeats.get((prompt, answer))
            if same is not None:
                row.problems.append(("duplicate.exact", f"duplicate of the row at line {same}; remove it"))
                return
            row.notes.append(
                (
                    "duplicate.conflicting_answer",
                    f"same prompt as line {first & MASK32} with a different answer; check which is right",
                )
            )
            self.repeats[(prompt, answer)] = row.line

    def note(self, note: Note) -> None:
        """A line that is not a row: counted and listed as a warning, never as a row."""
        self.rule_rows[note.rule] += 1
        self._record(
            "warnings", {"where": self.where(note.line), "line": note.line, "rule": note.rule, "message": note.message}
        )

    def _record(self, kind: str, record: dict) -> None:
        self.files[kind].write(to_json(record) + "\n")
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(record)

    def _write(self, row: Row) -> None:
        self.rows_in += 1
        if row.problems or row.notes:
            self.rule_rows.update({rule for rule, _ in row.problems + row.notes})
            place = {"where": self.where(row.line), "line": row.line} | (
                {"item": row.item} if row.item is not None else {}
            )
        for rule, message in row.notes:
            self._record("warnings", place | {"rule": rule, "message": message})
        self.warned += bool(row.notes)
        if row.problems:
            self.rejected += 1
            rule, message = row.problems[0]
            problems = [{"rule": r, "message": m} for r, m in row.problems]
            raw = from_json(row.raw.decode()) if isinstance(row.raw, bytes) else row.raw  # see check_block
            self._record("rejected", place | {"rule": rule, "message": message, "problems": problems, "row": raw})
            return
        self._keep(row.line, row.keys, row.tokens, row.text)

    def _keep(self, line: int, keys: tuple[int, int, int], tokens: int | None, text: str) -> None:
        """An accepted row: its line in accepted.jsonl, its keys for the split, its token count."""
        self.accepted += 1
        self.prompt_keys.append(keys[0])
        self.question_keys.append(keys[2])
        self.lines.append(line)
        if tokens is not None:
            self.lengths[tokens] += 1
        self.files["accepted"].write(text + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def split(self) -> tuple[int, int, list[str]]:
        """Write train.jsonl and eval.jsonl from accepted.jsonl; returns (train rows, eval rows, failures).

        The prompts with the smallest hashes go to eval, so the split is deterministic and rows that
        share a prompt never straddle it. An eval row whose question also appears in train (under
        another system prompt or history) moves to train, so the eval set stays unseen.
        """
        distinct, fraction = len(self.seen), self.options.eval_fraction
        failures, held_out = [], set()
        if fraction and distinct < 2:
            failures.append(
                f"{distinct} distinct prompt(s) accepted; an eval split needs at least 2 (or pass --eval-fraction 0)"
            )
        elif fraction:
            held_out = set(heapq.nsmallest(min(distinct - 1, max(1, round(fraction * distinct))), self.seen))
        self.seen.clear()  # the split's sets take its place in memory
        train_questions = {q for p, q in zip(self.prompt_keys, self.question_keys) if p not in held_out}
        counts: Counter[str] = Counter()
        self.files["accepted"].close()  # flushed before it is read back
        with (
            open(self.folder / "accepted.jsonl", "rb") as accepted,
            open(self.folder / "train.jsonl", "wb") as train,
            open(self.folder / "eval.jsonl", "wb") as evaluation,
        ):
            for i, (text, p) in enumerate(zip(accepted, self.prompt_keys)):
                if p not in held_out:
                    train.write(text)
                elif self.question_keys[i] not in train_questions:
                    evaluation.write(text)
                    counts["eval"] += 1
                else:
                    line = self.lines[i]
                    self._record(
                        "warnings",
                        {
                            "where": self.where(line),
                            "line": line,
                            "rule": "leakage.eval_in_train",
                            "message": "its question also appears in train under another system "
                            "prompt or history; moved from eval to train",
                        },
                    )
                    self.rule_rows["leakage.eval_in_train"] += 1
                    train.write(text)
        counts["train"] = len(self.prompt_keys) - counts["eval"]
        if held_out and not counts["eval"]:
            failures.append("every eval row's question also appears in train; the eval split is empty")
        return counts["train"], counts["eval"], failures


def token_stats(lengths: Counter[int], limit: int) -> dict[str, Any] | None:
    """min/mean/percentiles/max and a 30-bin histogram of tokens per accepted row (exact, from counts)."""
    total = sum(lengths.values())
    if not total:
        return None
    ordered = sorted(lengths.items())

    def percentile(p: float) -> int:
        rank, seen = p * (total - 1), 0
        for value, n in ordered:
            seen += n
            if seen > rank:
                return value
        return ordered[-1][0]

    top = max(ordered[-1][0], limit)
    width = max(1, -(-top // 30))
    bins = Counter()
    for value, n in ordered:
        bins[value // width] += n
    histogram = [[b * width, (b + 1) * width, bins[b]] for b in range(top // width + 1)]
    return {
        "rows": total,
        "min": ordered[0][0],
        "mean": round(sum(v * n for v, n in ordered) / total, 1),
        "p50": percentile(0.5),
        "p90": percentile(0.9),
        "p99": percentile(0.99),
        "max": ordered[-1][0],
        "over_limit": sum(n for v, n in ordered if v > limit),
        "max_seq_length": limit,
        "histogram": histogram,
    }


def gate_failures(sink: Sink, options: Options) -> list[str]:
    failures = [sink.fatal] if sink.fatal else []
    if not sink.rows_in:
        failures.append("the file has no rows; add JSONL rows in alpaca or messages form")
    elif sink.rejected / sink.rows_in > options.max_reject_fraction:
        failures.append(
            f"{sink.rejected / sink.rows_in:.1%} of rows rejected ({sink.rejected} of {sink.rows_in}), "
            f"above max_reject_fraction={options.max_reject_fraction:g}; see rejected.jsonl"
        )
    if sink.accepted < options.min_rows:
        failures.append(f"{sink.accepted} rows accepted, fewer than min_rows={options.min_rows}")
    return failures
