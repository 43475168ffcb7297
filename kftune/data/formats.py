"""Read SFT data (JSONL or a JSON array; alpaca or messages form) into chat messages.

Both forms become `[{"role", "content"}, ...]` so one chat template and one loss mask serve all.
Problems are reported as `file:line: what is wrong` (the full validation gate is validate.py's job).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

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
        line = _LINE_FORMATS[roles] = '{"messages": [' + ", ".join(
            f'{{"role": "{r}", "content": %s}}' for r in roles) + "]}"
    return line % tuple(map(_json_string, contents))


def alpaca_to_messages(row: dict[str, Any]) -> list[Message]:
    """alpaca (`instruction`, optional `input`, `output`, `system`, `history`) to chat messages."""
    messages: list[Message] = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    for pair in row.get("history") or []:
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n{row['input']}"
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return messages


def _row_problem(row: Any) -> str | None:
    """Why a parsed row can't be used for SFT, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with a string 'content'"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        if msgs[-1]["role"] != "assistant":
            return "the last message must be from the assistant (it is what the model learns)"
        return None
    if "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                return f"alpaca row needs a non-empty string {key!r}"
        if row.get("input") is not None and not isinstance(row["input"], str):
            return "'input' must be a string"
        history = row.get("history")
        if history is not None and not (
            isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 for h in history)
        ):
            return "'history' must be a list of [user, assistant] pairs"
        return None
    return "neither alpaca form (instruction/input/output) nor messages form (messages: [...])"


def to_messages(row: dict[str, Any]) -> list[Message]:
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return alpaca_to_messages(row)


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed row); a JSON array file is read whole, JSONL line by line."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise KftuneError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KftuneError(f"{path}:{exc.lineno}: invalid JSON array: {exc.msg}") from None
        for i, item in enumerate(items):
            yield f"{path}: item {i}", item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise KftuneError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None


def load_conversations(path: str | Path) -> list[list[Message]]:
    """All rows of a data file as chat messages; the first bad row stops the load with its location."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{path}: data file not found; check data_path (--data_path)")
    conversations = []
    for where, row in _iter_rows(path):
        problem = _row_problem(row)
        if problem:
            raise KftuneError(f"{where}: {problem}")
        conversations.append(to_messages(row))
    if not conversations:
        raise KftuneError(f"{path}: no samples (the file is empty); add JSONL rows in alpaca or messages form")
    return conversations


def to_dataset(conversations: list[list[Message]]):
    """A datasets.Dataset with one `messages` column, the form trl's SFTTrainer expects."""
    from datasets import Dataset

    return Dataset.from_dict({"messages": conversations})
