"""What the data gate found: the Report (report.json), its terminal summary and report.html."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kftune.core.pages import render_page, token_histogram
from kftune.data.rules import RULES


@dataclass(frozen=True)
class Report:
    """What the gate found; `passed` decides whether the pipeline goes on to training."""

    passed: bool
    failures: list[str]
    out_dir: str
    source: str
    dataset_sha256: str
    data_format: str  # jsonl or json-array
    rows_in: int
    accepted: int
    rejected: int
    rows_with_warnings: int
    train_rows: int
    eval_rows: int
    rules: dict[str, dict[str, Any]]  # rule -> {"action", "rows"}
    token_lengths: dict[str, Any] | None  # over accepted rows; None without a tokenizer
    token_counting: dict[str, Any] | None
    options: dict[str, Any]
    seconds: float
    row_format: str | None = None  # the rows' format (alpaca and messages may share a file); None: no row read

    @property
    def train_path(self) -> Path:
        return Path(self.out_dir) / "train.jsonl"

    @property
    def eval_path(self) -> Path:
        return Path(self.out_dir) / "eval.jsonl"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A short plain-text account for the terminal."""
        share = self.rejected / self.rows_in if self.rows_in else 0.0
        lines = [
            f"{self.source} ({self.data_format}{', ' + self.row_format if self.row_format else ''}, sha256 {self.dataset_sha256[:12]}...)",
            f"rows in {self.rows_in}: accepted {self.accepted}, rejected {self.rejected} ({share:.1%}), "
            f"with warnings {self.rows_with_warnings}; split: train {self.train_rows}, eval {self.eval_rows}",
        ]
        found = [(rule, v["action"], v["rows"]) for rule, v in self.rules.items() if v["rows"]]
        if found:
            width = max(len(r) for r, _, _ in found)
            lines += [f"  {rule.ljust(width)}  {action:8s} {rows:>8d}" for rule, action, rows in found]
        if self.token_lengths:
            t = self.token_lengths
            lines.append(
                f"tokens per row: min {t['min']}, p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"
            )
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        lines.append(f"report: {Path(self.out_dir) / 'report.html'}")
        return "\n".join(lines)


VALIDATION_PAGE = """{% extends "base.html" %}
{% block title %}validate-data {{ verdict }}{% endblock %}
{% block body %}
<h1>validate-data: {{ verdict }}</h1>
{% for failure in report.failures %}<p class="fail">{{ failure }}</p>{% endfor %}
<table class="meta">{% for name, value in summary %}<tr><td>{{ name }}</td><td>{{ value }}</td></tr>{% endfor %}</table>
<h2>Rules</h2>
<table><tr><th>rule</th><th>what</th><th>action</th><th>rows</th></tr>
{% for rule, found in report.rules.items() %}
<tr><td>{{ rule }}</td><td>{{ rules[rule] }}</td><td>{{ found.action }}</td><td class="num">{{ found.rows }}</td></tr>
{% endfor %}</table>
{% if t %}
<h2>Tokens per accepted row</h2>
<table><tr><th>min</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>over max_seq_length</th></tr>
<tr>{% for key in ("min", "mean", "p50", "p90", "p99", "max", "over_limit") %}<td class="num">{{ t[key] }}</td>{% endfor %}</tr></table>
{{ histogram }}
{% endif %}
{% for kind, shown in examples.items() if shown %}
<h2>First {{ shown|length }} {{ kind }} (all in {{ kind }}.jsonl)</h2>
<table><tr><th>where</th><th>rule</th><th>message</th></tr>
{% for e in shown %}<tr><td>{{ e.where }}</td><td>{{ e.rule }}</td><td>{{ e.message }}</td></tr>{% endfor %}</table>
{% endfor %}
{% endblock %}
"""


def render_html(report: Report, examples: dict[str, list[dict]]) -> str:
    """One self-contained page: verdict, counts, rules, token lengths and example rows."""
    summary = [
        ["source", report.source],
        ["format", report.data_format],
        ["dataset sha256", report.dataset_sha256],
        ["rows in", report.rows_in],
        ["accepted", report.accepted],
        ["rejected", report.rejected],
        ["rows with warnings", report.rows_with_warnings],
        ["train rows", report.train_rows],
        ["eval rows", report.eval_rows],
        ["seconds", report.seconds],
    ]
    t = report.token_lengths
    return render_page(
        VALIDATION_PAGE,
        verdict="PASSED" if report.passed else "FAILED",
        report=report,
        summary=summary,
        rules=RULES,
        t=t,
        histogram=token_histogram(t) if t else "",
        examples={kind: examples[kind] for kind in ("rejected", "warnings")},
    )
