"""Read SFT data (JSONL or a JSON array; any format of kftune.data.formats) into samples, for training and
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
from kftune.data.formats import CHAT_FAMILY, Message, Sample, detect, to_json
from kftune.data.row_rules import sample_problem


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


def load_samples(path: str | Path) -> list[Sample]:
    """All rows of a data file as samples (formats' one shape); the first bad row stops the load with its
    location, and so does the first row in another format than the file's first (alpaca and messages may mix)."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{path}: data file not found; check data_path (--data_path)")
    samples: list[Sample] = []
    first: tuple[str, str] | None = None  # (where, format) of the first row
    for where, row in _iter_rows(path):
        problem, sample = sample_problem(row)
        if problem:
            raise KftuneError(f"{where}: {problem}")
        fmt = detect(row)
        if first is None:
            first = (where, fmt)
        elif fmt != first[1] and not {fmt, first[1]} <= CHAT_FAMILY:
            raise KftuneError(
                f"{where}: this row is {fmt}, but the file's first row ({first[0]}) is {first[1]}; "
                "keep one format per file"
            )
        samples.append(sample)
    if not samples:
        raise KftuneError(f"{path}: no samples (the file is empty); add JSONL rows (alpaca, messages, ...)")
    return samples


def is_text(samples: list[Sample]) -> bool:
    """True for a text corpus (continued pretraining): loss on every token, no chat template."""
    return "text" in samples[0]


def load_conversations(path: str | Path) -> list[list[Message]]:
    """The chat messages of every row (a text corpus has none: refused with one line)."""
    samples = load_samples(path)
    if is_text(samples):
        raise KftuneError(f"{path}: a text corpus has no conversations; this step needs chat rows")
    return [s["messages"] for s in samples]


def to_dataset(samples: list[Sample] | list[list[Message]]):
    """A datasets.Dataset in the form trl's SFTTrainer expects: a `messages` column, and `tools` (JSON text)
    when any row calls tools. Messages of tool rows are stored as JSON values, not Arrow structs, so one row's
    argument names never turn up as nulls in another's (the chat template would render them)."""
    from datasets import Dataset, Features, Json, List, Value

    conversations = [s if isinstance(s, list) else s["messages"] for s in samples]
    tools = [None if isinstance(s, list) else s.get("tools") for s in samples]
    if not any(tools) and not any(len(m) != 2 for c in conversations for m in c):
        return Dataset.from_dict({"messages": conversations})
    features = Features({"messages": List(Json()), "tools": Value("string")})
    columns = {"messages": conversations, "tools": [to_json(t) if t else None for t in tools]}
    return Dataset.from_dict(columns, features=features)


def text_blocks(texts: list[str], tokenizer, block: int) -> list[list[int]]:
    """Documents tokenized, joined with the tokenizer's EOS after each, and cut into blocks of `block` tokens
    (the last one shorter): continued pretraining wastes no token on padding and learns where documents end."""
    if tokenizer.eos_token_id is None:
        raise KftuneError("the tokenizer has no EOS token to put between documents; use a tokenizer that has one")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    return [stream[i : i + block] for i in range(0, len(stream), block)]


def text_dataset(samples: list[Sample], tokenizer, block: int):
    """A tokenized Dataset of `text_blocks` (trl takes it as is; every token is labelled)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": text_blocks([s["text"] for s in samples], tokenizer, block)})
