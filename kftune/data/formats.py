"""The accepted row formats, defined once: alpaca and messages, and the one way both become chat messages.

Both forms become `[{"role", "content"}, ...]` so one chat template and one loss mask serve all. The
gate (row_rules.py, checker.py), training and evaluation (reading.py) and the tiny model's tokenizer
all read rows through `to_messages`; the accepted line the gate writes is `messages_json`.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
ALPACA_FIELDS = frozenset(("instruction", "input", "output", "system", "history"))  # alpaca form: these keys
MESSAGE_FIELDS = frozenset(("role", "content"))  # messages form: {"messages": [{role, content}, ...]}
PLAIN_ROLES = ("user", "assistant")  # the two shapes of a single-turn conversation
SYSTEM_ROLES = ("system", "user", "assistant")

to_json = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps builds a new one per call
from_json = json.JSONDecoder().decode  # json.loads without its per-call checks
_json_string = json.encoder.encode_basestring  # the C encoder of one string, as to_json writes it


def messages_json(messages: list[Message]) -> str:
    """to_json({"messages": messages}), byte for byte, at a third of the cost (roles are checked names)."""
    return messages_line(tuple(m["role"] for m in messages), [m["content"] for m in messages])


_LINE_FORMATS: dict[tuple[str, ...], str] = {}  # roles -> the accepted line with %s for each content


def messages_line(roles: tuple[str, ...], contents: list[str]) -> str:
    """messages_json for a conversation given as its roles and contents."""
    line = _LINE_FORMATS.get(roles)
    if line is None:
        line = _LINE_FORMATS[roles] = (
            '{"messages": [' + ", ".join(f'{{"role": "{r}", "content": %s}}' for r in roles) + "]}"
        )
    return line % tuple(map(_json_string, contents))


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    """alpaca (`instruction`, optional `input`, `output`, `system`, `history`) to chat messages."""
    messages: list[Message] = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    for pair in row.get("history") or []:
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [
        {"role": "user", "content": alpaca_prompt(row["instruction"], row.get("input"))},
        {"role": "assistant", "content": row["output"]},
    ]
    return messages


def alpaca_prompt(instruction: str, extra: str | None) -> str:
    """The user turn of an alpaca row: the instruction, then the input on its own line when there is one."""
    return f"{instruction}\n{extra}" if extra else instruction


def to_messages(row: dict[str, Any]) -> list[Message]:
    """The chat messages of a row in either form (checked already: see row_rules.schema)."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return alpaca_to_messages(row)
