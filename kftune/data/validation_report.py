"""What the data gate found: the Report (report.json), its terminal summary and report.html."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
            f"{self.source} ({self.data_format}, sha256 {self.dataset_sha256[:12]}...)",
            f"rows in {self.rows_in}: accepted {self.accepted}, rejected {self.rejected} ({share:.1%}), "
            f"with warnings {self.rows_with_warnings}; split: train {self.train_rows}, eval {self.eval_rows}",
        ]
        found = [(rule, v["action"], v["rows"]) for rule, v in self.rules.items() if v["rows"]]
        if found:
            width = max(len(r) for r, _, _ in found)
            lines += [f"  {rule.ljust(width)}  {action:8s} {rows:>8d}" for rule, action, rows in found]
        if self.token_lengths:
            t = self.token_lengths
            lines.append(f"tokens per row: min {t['min']}, p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}")
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        lines.append(f"report: {Path(self.out_dir) / 'report.html'}")
        return "\n".join(lines)


def _histogram_svg(stats: dict[str, Any]) -> str:
    """Bars of rows per token-length bin, with the max_seq_length limit as a red line."""
    bins, limit = stats["histogram"], stats["max_seq_length"]
    width, height, pad = 640, 220, 30
    top_count = max(n for _, _, n in bins) or 1
    bar = (width - 2 * pad) / len(bins)
    span = bins[-1][1]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img" '
             f'aria-label="token-length histogram">']
    for i, (lo, hi, n) in enumerate(bins):
        h = (height - pad) * n / top_count
        parts.append(f'<rect x="{pad + i * bar:.1f}" y="{height - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                     f'fill="#4a7ebb"><title>{lo}-{hi - 1} tokens: {n} rows</title></rect>')
    x = pad + (width - 2 * pad) * limit / span
    parts.append(f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="#c00" stroke-dasharray="4"/>')
    parts.append(f'<text x="{x + 3:.1f}" y="{pad}" fill="#c00" font-size="11">max_seq_length {limit}</text>')
    parts.append(f'<text x="{pad}" y="{height + 16}" font-size="11">0</text>')
    parts.append(f'<text x="{width - pad}" y="{height + 16}" font-size="11" text-anchor="end">{span} tokens</text>')
    parts.append(f'<text x="{pad}" y="{pad / 2}" font-size="11">{top_count} rows</text></svg>')
    return "".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: Report, examples: dict[str, list[dict]]) -> str:
    """One self-contained page: verdict, counts, rules, token lengths (SVG) and example rows."""
    verdict = "PASSED" if report.passed else "FAILED"
    summary = [["source", report.source], ["format", report.data_format], ["dataset sha256", report.dataset_sha256],
               ["rows in", report.rows_in], ["accepted", report.accepted], ["rejected", report.rejected],
               ["rows with warnings", report.rows_with_warnings], ["train rows", report.train_rows],
               ["eval rows", report.eval_rows], ["seconds", report.seconds]]
    rules = [[rule, RULES[rule], v["action"], v["rows"]] for rule, v in report.rules.items()]
    sections = [
        f"<h1>validate-data: {verdict}</h1>",
        "".join(f"<p class=fail>{html.escape(f)}</p>" for f in report.failures),
        _table(["", ""], summary),
        "<h2>Rules</h2>", _table(["rule", "what", "action", "rows"], rules),
    ]
    if report.token_lengths:
        t = report.token_lengths
        sections += ["<h2>Tokens per accepted row</h2>",
                     _table(["min", "mean", "p50", "p90", "p99", "max", "over max_seq_length"],
                            [[t["min"], t["mean"], t["p50"], t["p90"], t["p99"], t["max"], t["over_limit"]]]),
                     _histogram_svg(t)]
    for kind in ("rejected", "warnings"):
        if examples[kind]:
            sections += [f"<h2>First {len(examples[kind])} {kind} (all in {kind}.jsonl)</h2>",
                         _table(["where", "rule", "message"], [[e["where"], e["rule"], e["message"]] for e in examples[kind]])]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.fail{color:#c00;font-weight:bold}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>validate-data {verdict}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
