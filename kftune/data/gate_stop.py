"""The one line a pipeline prints when the data gate stops it: which data, how much was rejected, by which
rules, what to do about each, and where the rejected rows and the report are.

A user reads this line in a terminal or in the KFP UI, not the report; it must be enough to act on.
"""

from __future__ import annotations

from typing import Any, Protocol

# What to do about the rules that reject rows, in the pipeline's own flags (`kftune pipeline run --help`).
RULE_FIXES: dict[str, str] = {
    "length.too_long": "raise --max-seq-length (now {max_seq_length}) or shorten the rows",
    "parse.invalid_json": "fix the JSON on the lines listed in rejected.jsonl",
    "parse.invalid_utf8": "re-save the file as UTF-8",
    "parse.not_object": "make every row a JSON object",
    "parse.broken_array": "close the JSON array (or convert the file to JSONL)",
    "schema.unknown_form": "give each row instruction/input/output (alpaca) or messages",
    "schema.missing_field": "fill in the missing field (alpaca needs instruction and output)",
    "schema.wrong_type": "make the field a string (messages: a list of {role, content})",
    "roles.unknown_role": "use only the roles system, user and assistant",
    "roles.no_assistant": "add the assistant's answer",
    "roles.not_ending_with_assistant": "end each conversation with the assistant's turn",
    "roles.not_alternating": "alternate user and assistant turns, starting with user",
    "roles.empty_content": "fill in or drop the empty turns",
    "roles.template_error": "check the conversations against the base model's chat template",
    "length.short_response": "drop or lengthen the very short answers",
    "duplicate.exact": "drop the repeated rows",
    "leakage.external_eval": "drop the training rows that repeat eval questions",
}
TOP_RULES = 3


class GateReport(Protocol):
    """What the message needs of kftune.validate.Report."""

    source: str
    rows_in: int
    rejected: int
    failures: list[str]
    rules: dict[str, dict[str, Any]]
    options: dict[str, Any]


def rejecting_rules(report: GateReport, top: int = TOP_RULES) -> list[tuple[str, int]]:
    """The rules that rejected rows, most rows first (ties by name, so the line is stable)."""
    found = [
        (rule, int(v["rows"])) for rule, v in report.rules.items() if v.get("action") == "reject" and v.get("rows")
    ]
    return sorted(found, key=lambda item: (-item[1], item[0]))[:top]


def stop_message(report: GateReport, data: str, artifact_uri: str) -> str:
    """One line, no newline: the gate's verdict on `data` and what to do; `artifact_uri` holds its files."""
    share = f"{report.rejected / report.rows_in:.1%}" if report.rows_in else "0%"
    rules = rejecting_rules(report)
    limit = report.options.get("max_reject_fraction")
    parts = [
        f"data validation gate failed for {data}: {share} of rows rejected ({report.rejected} of {report.rows_in}"
        + (f", above max_reject_fraction {limit:g})" if limit is not None else ")")
    ]
    if rules:
        parts.append("top rules: " + ", ".join(f"{rule} {rows}" for rule, rows in rules))
    other = [f for f in report.failures if "of rows rejected" not in f]  # the share is said above
    if other:
        parts.append("; ".join(other))
    fixes = [f"{rule}: {RULE_FIXES[rule].format(**report.options)}" for rule, _ in rules if rule in RULE_FIXES]
    if fixes:
        parts.append("to fix: " + "; ".join(fixes))
    parts.append(f"rejected rows: {artifact_uri}/rejected.jsonl, report: {artifact_uri}/report.html")
    return " | ".join(parts).replace("\n", " ")
