"""Tool-call scores: the call a model generates for an eval row's tool-calling turn, against the reference.

A model prompted with the row's tools and the conversation up to the assistant's first call should
answer with that call: Qwen2.5's format (and the tiny model's) is `<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>`. Per case: the output holds a call that parses as JSON, it names a
function the row declares, its name matches the reference's, and its arguments equal the reference's
exactly (as JSON values). The rates over the cases are `tool_call_parse_rate`,
`tool_call_declared_rate`, `tool_call_name_match` and `tool_call_args_match`; the last two are the
promotion gate's candidates for a tool-calling data set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kftune.data.formats import Message, Rows
from kftune.models.tool_call_text import parse_calls

METRICS = ("tool_call_parse_rate", "tool_call_declared_rate", "tool_call_name_match", "tool_call_args_match")


@dataclass(frozen=True)
class Case:
    """One tool-calling turn to reproduce: the prompt before it, the row's tools, the reference call."""

    prompt: list[Message]
    tools: list[dict]
    name: str
    arguments: dict[str, Any]


def cases(samples: Rows, limit: int) -> list[Case]:
    """The first tool-calling turn of each row that has one, for at most `limit` rows."""
    found = []
    for sample in samples:
        if isinstance(sample, list) or not sample.get("tools"):
            continue
        messages = sample["messages"]
        turn = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
        if turn is None:
            continue
        call = messages[turn]["tool_calls"][0]["function"]
        found.append(Case(messages[:turn], sample["tools"], call["name"], call["arguments"]))
        if len(found) == limit:
            break
    return found


def score(outputs: Sequence[str], found: Sequence[Case]) -> dict[str, Any]:
    """The four rates over the cases (each in [0, 1]) and how many cases there were; {} for none."""
    if not found:
        return {}
    totals = dict.fromkeys(METRICS, 0)
    for text, case in zip(outputs, found, strict=True):
        calls = parse_calls(text)
        if not calls:
            continue
        first = calls[0]
        declared = {t["function"]["name"] for t in case.tools}
        totals["tool_call_parse_rate"] += 1
        totals["tool_call_declared_rate"] += first["name"] in declared
        totals["tool_call_name_match"] += first["name"] == case.name
        totals["tool_call_args_match"] += first["name"] == case.name and first["arguments"] == case.arguments
    return {"tool_call_rows": len(found), **{k: v / len(found) for k, v in totals.items()}}


def generate(model, tokenizer, rows: Rows, limit: int, gen: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(scores, outputs): the model's answer to each case of `rows` (at most `limit`), prompted with the tools."""
    from kftune.models.infer import generate_reply  # heavy: imports torch; loaded when used

    found = cases(rows, limit)
    outputs = [generate_reply(model, tokenizer, c.prompt, gen, tools=c.tools)[0] for c in found]
    return score(outputs, found), outputs


def records(rows: Rows, limit: int, base: Sequence[str], tuned: Sequence[str]) -> list[dict[str, Any]]:
    """The lines of samples.jsonl for the tool-calling cases: prompt, reference call, both models' answers."""
    return [
        {
            "prompt": case.prompt,
            "reference": json.dumps({"name": case.name, "arguments": case.arguments}, ensure_ascii=False),
            "base_output": b,
            "tuned_output": t,
            "kind": "tool_call",
        }
        for case, b, t in zip(cases(rows, limit), base, tuned, strict=True)
    ]
