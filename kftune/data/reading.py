"""Read SFT data (JSONL or a JSON array; alpaca or messages form) into chat messages, for training and
evaluation.

Each row is checked by the gate's own schema and role rules (row_rules.py), so a row the gate accepts
loads to the same messages here, and a bad row stops the load as `file:line: what is wrong`. The
gate's data-quality rules (content, personal data, lengths, duplicates) are the gate's job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.formats import Message
from kftune.data.row_rules import structure_problem


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
    # JSONL lines end at \n only (as the gate reads them): str.splitlines would also break at U+2028 and
    # other separators that JSON writers leave unescaped inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise KftuneError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
            ) from None


def load_conversations(path: str | Path) -> list[list[Message]]:
    """All rows of a data file as chat messages; the first bad row stops the load with its location."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{path}: data file not found; check data_path (--data_path)")
    conversations = []
    for where, row in _iter_rows(path):
        problem, messages = structure_problem(row)
        if problem:
            raise KftuneError(f"{where}: {problem}")
        conversations.append(messages)
    if not conversations:
        raise KftuneError(f"{path}: no samples (the file is empty); add JSONL rows in alpaca or messages form")
    return conversations


def to_dataset(conversations: list[list[Message]]):
    """A datasets.Dataset with one `messages` column, the form trl's SFTTrainer expects."""
    from datasets import Dataset

    return Dataset.from_dict({"messages": conversations})
