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
import bisect
import collections
import contextlib
import gc
import hashlib
import heapq
import html
import io
import itertools
import json
import os
import re
import time
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from kftune.train.config import FIELDS as TRAIN_FIELDS
from kftune.data.formats import ROLES, Message, to_messages
from kftune.core.atomic import building
from kftune.core.errors import ConfigError, KftuneError
from kftune.data.token_counting import TokenCounter, load_counter

# Every rule, by its stable name (used in rejected.jsonl, warnings.jsonl and report.json).
RULES: dict[str, str] = {
    "parse.invalid_json": "the line is not valid JSON",
    "parse.not_object": "the row is valid JSON but not an object",
    "parse.invalid_utf8": "the line is not valid UTF-8",
    "parse.bom": "a UTF-8 byte-order mark (removed)",
    "parse.blank_line": "a blank line (skipped)",
    "parse.broken_array": "the JSON array breaks off; items after that point cannot be read",
    "schema.unknown_form": "neither alpaca form (instruction/input/output) nor messages form (messages)",
    "schema.missing_field": "a required field is missing",
    "schema.wrong_type": "a field has the wrong type",
    "schema.unknown_field": "a field neither form defines (ignored)",
    "roles.unknown_role": "a role other than system, user or assistant",
    "roles.system_not_first": "a system message after the first message",
    "roles.not_alternating": "user and assistant turns do not alternate, starting with user",
    "roles.no_assistant": "no assistant turn to learn from",
    "roles.not_ending_with_assistant": "the conversation does not end with the assistant",
    "roles.empty_content": "a turn with empty or whitespace-only content",
    "roles.template_error": "the base model's chat template refuses the conversation",
    "length.too_long": "more tokens than max_seq_length under the base model's tokenizer and chat template",
    "length.short_response": "the final response is shorter than min_response_chars",
    "duplicate.exact": "the same sample as an earlier row (after whitespace, case and NFKC normalisation)",
    "duplicate.conflicting_answer": "the same prompt as an earlier row with a different answer",
    "leakage.eval_in_train": "an eval row whose question also appears in train (moved to train)",
    "leakage.external_eval": "the question also appears in the external eval set (--eval-data)",
    "pii.email": "an e-mail address",
    "pii.phone": "a phone number (mainland China mobile or international +CC form)",
    "pii.id_number": "an 18-digit resident ID number with a valid check digit",
    "pii.card_number": "a 13-19 digit card number passing the Luhn check",
    "content.response_equals_prompt": "the response repeats the prompt",
    "content.replacement_char": "U+FFFD replacement characters (text lost in a bad decode)",
    "content.mojibake": "mojibake: UTF-8 text decoded with the wrong codec",
    "content.control_char": "control characters other than tab and newline",
}
WARNING_RULES = {"parse.bom", "parse.blank_line", "schema.unknown_field", "duplicate.conflicting_answer"}
LENGTH_POLICIES = ("reject", "truncate", "keep")
PII_POLICIES = ("flag", "reject", "redact")
POLICY_KINDS = {"length": LENGTH_POLICIES, "pii": PII_POLICIES}
DEFAULT_MAX_SEQ_LENGTH: int = TRAIN_FIELDS["max_seq_length"].default
BOM = b"\xef\xbb\xbf"
PROGRESS_MIN_BYTES = 16 * 1024 * 1024
PARALLEL_MIN_BYTES = 8 * 1024 * 1024  # smaller files are checked in-process (forking costs more than it saves)
BLOCK_BYTES = 1 << 19  # lines per worker task, by size (about 3,000 short rows)
EXAMPLES = 20  # rejected and warned rows shown in report.html
MASK32 = (1 << 32) - 1

Issue = tuple[str, str]  # (rule, message)
_to_json = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps builds a new one per call
_from_json = json.JSONDecoder().decode  # json.loads without its per-call checks
_json_string = json.encoder.encode_basestring  # the C encoder of one string, as _to_json writes it


def _messages_json(messages: list[Message]) -> str:
    """_to_json({"messages": messages}), byte for byte, at a third of the cost (roles are checked names)."""
    return _messages_line(tuple(m["role"] for m in messages), [m["content"] for m in messages])


_LINE_FORMATS: dict[tuple[str, ...], str] = {}  # roles -> the accepted line with %s for each content


def _messages_line(roles: tuple[str, ...], contents: list[str]) -> str:
    """_messages_json for a conversation given as its roles and contents."""
    line = _LINE_FORMATS.get(roles)
    if line is None:
        line = _LINE_FORMATS[roles] = '{"messages": [' + ", ".join(
            f'{{"role": "{r}", "content": %s}}' for r in roles) + "]}"
    return line % tuple(map(_json_string, contents))


@dataclass(frozen=True)
class Options:
    """How strict the gate is. Every problem with the values is reported at once, naming the flag."""

    tokenizer: str | None = None  # base model or tokenizer (folder, hub id, s3://); None skips length.too_long
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH  # tokens after the chat template, as in training
    length_policy: str = "reject"  # too-long rows: reject, truncate (the final answer) or keep
    pii_policy: str = "flag"  # rows with personal data: flag (warn), reject or redact
    min_response_chars: int = 2  # a shorter final answer is rejected (1 turns the rule off)
    eval_fraction: float = 0.1  # share of distinct prompts held out for eval (0: no eval split)
    eval_data: str | None = None  # an external eval set; train rows sharing a question with it are rejected
    max_reject_fraction: float = 0.05  # the gate fails above this share of rejected rows
    min_rows: int = 10  # the gate fails with fewer accepted rows
    batch_rows: int = 1024  # rows per tokenizer call on the per-row way (the fast lane counts a block at once)
    workers: int = 0  # processes checking JSONL rows: 0 = one per CPU (at most 4) for files over 8 MiB, 1 = none
    progress: bool = False  # a progress bar on stderr for files over 16 MiB

    def __post_init__(self) -> None:
        problems = []
        if self.max_seq_length < 1:
            problems.append(f"--max_seq_length must be at least 1, got {self.max_seq_length}")
        for name, kind in (("length_policy", "length"), ("pii_policy", "pii")):
            if getattr(self, name) not in POLICY_KINDS[kind]:
                problems.append(f"--policy {kind}={getattr(self, name)}: expected one of {', '.join(POLICY_KINDS[kind])}")
        if self.min_response_chars < 1:
            problems.append(f"--min-response-chars must be at least 1, got {self.min_response_chars}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.max_reject_fraction <= 1:
            problems.append(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        if self.min_rows < 0:
            problems.append(f"--min-rows must be at least 0, got {self.min_rows}")
        if self.batch_rows < 1:
            problems.append(f"batch_rows must be at least 1, got {self.batch_rows}")
        if self.workers < 0:
            problems.append(f"--workers must be at least 0 (0: one per CPU), got {self.workers}")
        if problems:
            raise ConfigError(problems, source="validation options")

    def action(self, rule: str) -> str:
        """What the gate does with a row that breaks `rule`: reject, warn, or a policy's fix."""
        if rule.startswith("pii."):
            return self.pii_policy
        if rule == "length.too_long":
            return self.length_policy
        if rule == "leakage.eval_in_train":
            return "move"
        return "warn" if rule in WARNING_RULES else "reject"


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


@dataclass(slots=True)
class _Row:
    """One row on its way through the gate."""

    line: int  # where it starts in the file (1-based)
    item: int | None  # index in a JSON array, None for JSONL
    raw: Any  # the parsed value, or the text that could not be parsed
    problems: list[Issue] = field(default_factory=list)  # any of these rejects the row
    notes: list[Issue] = field(default_factory=list)  # warnings and fixes applied
    messages: list[Message] | None = None
    tokens: int | None = None
    keys: tuple[int, int, int] | None = None  # (prompt, answer, question) hashes for the rules across rows
    text: str | None = None  # the accepted line, {"messages": [...]} as JSON


@dataclass(frozen=True, slots=True)
class _Note:
    """A warning about a line that is not a row (a blank line, a byte-order mark)."""

    line: int
    rule: str
    message: str


class _BrokenFile(Exception):
    """The rest of the file can't be read (a JSON array that breaks off)."""

    def __init__(self, line: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.line, self.rule, self.message = line, rule, message


# ---------------------------------------------------------------------------------------------
# Reading: bytes are hashed as they stream past, so the dataset sha256 costs no second read.


class _HashingReader(io.RawIOBase):
    """A raw file that feeds every byte read to sha256 and counts them (for the progress bar)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        self.sha256.update(memoryview(buffer)[:n])
        self.bytes_read += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _jsonl_rows(stream: Iterable[bytes], first_line: int = 1) -> Iterator[_Row | _Note]:
    """Rows of a JSONL file; a line that can't be decoded or parsed becomes a rejected row."""
    for number, raw in enumerate(stream, start=first_line):
        if raw[:1] != b"{":  # nearly every line opens an object: no BOM, not blank
            if raw.startswith(BOM):
                raw = raw[len(BOM):]
                yield _Note(number, "parse.bom", "a UTF-8 byte-order mark starts the line; it was removed")
            if not raw.strip():
                yield _Note(number, "parse.blank_line", "blank line skipped; remove it")
                continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _Row(number, None, raw.decode("utf-8", "replace").rstrip("\r\n"), problems=[(
                "parse.invalid_utf8",
                f"byte {exc.start + 1} (0x{raw[exc.start]:02x}) is not valid UTF-8; re-save the file as UTF-8")])
            continue
        try:
            yield _Row(number, None, _from_json(text))
        except json.JSONDecodeError as exc:
            yield _Row(number, None, text.rstrip("\r\n"), problems=[(
                "parse.invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}; fix or remove the line")])


_NOT_SPACE = re.compile(r"[^ \t\r\n]")
_NUMBER_ENDS = (" ", "\t", "\r", "\n", ",", "]")


class _ArrayItems:
    """Items of a JSON array file, decoded one at a time with `raw_decode` (bounded memory).

    The buffer holds at most about one item plus a 1 MiB read-ahead. A syntax error ends the
    array: there is no reliable way to find the next item after it, so it raises _BrokenFile.
    """

    def __init__(self, stream: IO[str], chunk_chars: int = 1 << 20) -> None:
        self._stream, self._chunk = stream, chunk_chars
        self._decoder = json.JSONDecoder()
        self._buf, self._pos, self._line, self._eof = "", 0, 1, False

    def _advance(self, to: int) -> None:
        self._line += self._buf.count("\n", self._pos, to)
        self._pos = to

    def _fill(self) -> None:
        """Drop what was consumed and read on, at least doubling what is buffered (amortised re-parses)."""
        try:
            new = self._stream.read(max(self._chunk, len(self._buf) - self._pos))
        except UnicodeDecodeError as exc:
            raise _BrokenFile(self._line, "parse.invalid_utf8",
                              f"not valid UTF-8 near here ({exc.reason}); re-save the file as UTF-8") from None
        self._buf, self._pos, self._eof = self._buf[self._pos:] + new, 0, not new

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            found = _NOT_SPACE.search(self._buf, self._pos)
            if found:
                self._advance(found.start())
                return self._buf[self._pos]
            self._advance(len(self._buf))
            if self._eof:
                return ""
            self._fill()

    def _value(self) -> tuple[int, Any]:
        self._peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                # Text cut at the buffer's end fails in a string or within a few characters of the end;
                # any other error is real, and reading on would only load the rest of the file.
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self._buf) - 16
                if self._eof or not cut:
                    line = self._line + self._buf.count("\n", self._pos, exc.pos)
                    raise _BrokenFile(line, "parse.broken_array",
                                      f"invalid JSON in the array ({exc.msg}); items after this point "
                                      "cannot be read; fix the file or convert it to JSONL") from None
            else:
                if self._eof or isinstance(value, (dict, list, str)) or self._buf[end:end + 1] in _NUMBER_ENDS:
                    line = self._line
                    self._advance(end)
                    return line, value
            self._fill()  # a number or literal cut at the buffer's end (6.5e|3) may go on

    def _expect(self, chars: str, what: str) -> str:
        found = self._peek()
        if not found or found not in chars:
            seen = f"found {found!r}" if found else "the file ends"
            raise _BrokenFile(self._line, "parse.broken_array",
                              f"expected {what}, {seen}; items after this point cannot be read")
        self._advance(self._pos + 1)
        return found

    def __iter__(self) -> Iterator[_Row]:
        self._expect("[", "'[' to open the array")
        if self._peek() == "]":
            self._advance(self._pos + 1)
        else:
            index, closer = 0, ","
            while closer == ",":
                line, value = self._value()
                yield _Row(line, index, value)
                index += 1
                closer = self._expect(",]", f"',' or ']' after item {index - 1}")
        if self._peek():
            raise _BrokenFile(self._line, "parse.broken_array", "data after the closing ']'; remove it")


def _sniff(stream: io.BufferedReader, name: str) -> str:
    """jsonl or json-array. A file starting with '[' is a JSON array, unless its first line is a
    complete JSON value and more lines follow (or the file is named .jsonl): then it is JSONL
    whose first row happens to be an array."""
    head = stream.peek(1 << 20).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        return "jsonl"
    first, _, rest = head.partition(b"\n")
    try:
        json.loads(first)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that aren't UTF-8
        return "json-array"
    return "jsonl" if rest.strip() or name.endswith(".jsonl") else "json-array"


def _rows(stream: io.BufferedReader, data_format: str) -> Iterator[_Row | _Note]:
    if data_format == "jsonl":
        return _jsonl_rows(stream)
    return _array_rows(stream)


def _array_rows(stream: io.BufferedReader) -> Iterator[_Row | _Note]:
    if stream.peek(3).startswith(BOM):
        yield _Note(1, "parse.bom", "a UTF-8 byte-order mark starts the file; it was removed")
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        yield from _ArrayItems(text)
    finally:
        text.detach()  # the byte stream stays open, to hash what follows a broken array


def _fetch(source: str) -> Path:
    """A local path for the data: `s3://` artifacts are downloaded (verified, cached) first."""
    if source.startswith("s3://"):
        from kftune.core.storage import resolve_path

        return Path(resolve_path(source))
    path = Path(source)
    if not path.is_file():
        raise KftuneError(f"{source}: data file not found; pass a JSONL or JSON array file, or an s3:// URI")
    return path


# ---------------------------------------------------------------------------------------------
# Row rules: schema, roles, content, personal data. Each adds (rule, message) pairs to the row.

ALPACA_FIELDS = {"instruction", "input", "output", "system", "history"}
MESSAGE_FIELDS = {"role", "content"}


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _label(row: _Row, i: int) -> str:
    """Where message i came from, in the row's own terms: messages[2], 'output', history[0][1].

    Built only for a message that has a problem, so good rows never pay for it.
    """
    obj = row.raw
    if "messages" in obj:
        return f"messages[{i % len(row.messages)}]"
    history = [f"history[{k}][{j}]" for k in range(len(obj.get("history") or [])) for j in (0, 1)]
    prompt = "'instruction'" + (" + 'input'" if obj.get("input") else "")
    return (["'system'"] * bool(obj.get("system")) + history + [prompt, "'output'"])[i]


def _messages_schema(row: _Row, obj: dict) -> None:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        row.problems.append(("schema.wrong_type", f"'messages' is {_type(messages)}; expected a non-empty list "
                                                  "of {role, content} objects"))
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            row.problems.append(("schema.wrong_type", f"messages[{i}] is {_type(m)}; expected an object "
                                                      "with 'role' and 'content'"))
            continue
        for key in ("role", "content"):
            if key not in m:
                row.problems.append(("schema.missing_field", f"messages[{i}] has no {key!r}"))
            elif not isinstance(m[key], str):
                row.problems.append(("schema.wrong_type", f"messages[{i}].{key} is {_type(m[key])}; expected a string"))
        if not MESSAGE_FIELDS.issuperset(m):
            extra = ", ".join(sorted(set(m) - MESSAGE_FIELDS))
            row.notes.append(("schema.unknown_field", f"messages[{i}] has unknown field(s) {extra}; ignored"))
    if len(obj) > 1:
        row.notes.append(("schema.unknown_field", f"unknown field(s) {', '.join(sorted(set(obj) - {'messages'}))}; "
                                                  "ignored"))


def _alpaca_schema(row: _Row, obj: dict) -> None:
    for key in ("instruction", "output"):
        if key not in obj:
            row.problems.append(("schema.missing_field", f"alpaca row has no {key!r}"))
        elif not isinstance(obj[key], str):
            row.problems.append(("schema.wrong_type", f"{key!r} is {_type(obj[key])}; expected a string"))
    for key in ("input", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            row.problems.append(("schema.wrong_type", f"{key!r} is {_type(obj[key])}; expected a string or null"))
    history = obj.get("history")
    if history is not None and not (isinstance(history, list) and all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history)):
        row.problems.append(("schema.wrong_type", "'history' must be a list of [user, assistant] string pairs"))
    if not ALPACA_FIELDS.issuperset(obj):
        extra = ", ".join(sorted(set(obj) - ALPACA_FIELDS))
        row.notes.append(("schema.unknown_field", f"unknown field(s) {extra}; ignored"))


def _schema(row: _Row) -> None:
    """Recognise the form, check field types and normalise the row to chat messages."""
    obj = row.raw
    if not isinstance(obj, dict):
        row.problems.append(("parse.not_object", f"the row is a JSON {_type(obj)}; expected an object"))
        return
    if "messages" in obj:
        if ALPACA_FIELDS.isdisjoint(obj):
            _messages_schema(row, obj)
        else:
            mixed = ", ".join(sorted(ALPACA_FIELDS.intersection(obj)))
            row.problems.append(("schema.unknown_form", f"the row mixes messages form with alpaca fields ({mixed}); "
                                                        "keep one form"))
    elif "instruction" in obj or "output" in obj:
        _alpaca_schema(row, obj)
    else:
        fields = ", ".join(sorted(obj)) or "none"
        row.problems.append(("schema.unknown_form", f"neither alpaca form (instruction, input, output) nor messages "
                                                    f"form (messages); the row's fields: {fields}"))
    if not row.problems:
        row.messages = to_messages(obj)


_PLAIN, _WITH_SYSTEM = ["user", "assistant"], ["system", "user", "assistant"]


def _alternates(roles: list[str]) -> bool:
    """An optional system message, then user/assistant pairs: the one shape that needs no diagnosis."""
    if roles == _PLAIN or roles == _WITH_SYSTEM:
        return True
    body = roles[1:] if roles[0] == "system" else roles
    pairs = len(body) // 2
    return bool(body) and len(body) % 2 == 0 and body[::2] == ["user"] * pairs and body[1::2] == ["assistant"] * pairs


def _role_problems(row: _Row, roles: list[str]) -> None:
    unknown = [i for i, r in enumerate(roles) if r not in ROLES]
    for i in unknown:
        row.problems.append(("roles.unknown_role", f"{_label(row, i)}.role is {roles[i]!r}; expected one of "
                                                   f"{', '.join(ROLES)}"))
    for i, r in enumerate(roles[1:], start=1):
        if r == "system":
            row.problems.append(("roles.system_not_first", f"{_label(row, i)} is a system message; only the first "
                                                           "message may be"))
    turns = [(i, r) for i, r in enumerate(roles) if r != "system"]
    expected = ("user", "assistant")
    wrong = next(((i, r, expected[n % 2]) for n, (i, r) in enumerate(turns) if r != expected[n % 2]), None)
    if wrong and not unknown:
        i, r, should = wrong
        row.problems.append(("roles.not_alternating", f"{_label(row, i)} is {r!r} where {should!r} should be; "
                                                      "turns must go user, assistant, user, ..."))
    if "assistant" not in roles:
        row.problems.append(("roles.no_assistant", "no assistant turn; add the answer the model should learn"))
    elif roles[-1] != "assistant":
        row.problems.append(("roles.not_ending_with_assistant", f"the last turn ({_label(row, -1)}) is "
                                                                f"{roles[-1]!r}; end with the assistant's answer"))


def _roles(row: _Row) -> None:
    roles = [m["role"] for m in row.messages]
    if not _alternates(roles):
        _role_problems(row, roles)
    for i, m in enumerate(row.messages):
        if not m["content"].strip():
            row.problems.append(("roles.empty_content", f"{_label(row, i)} ({m['role']}) is empty or whitespace only"))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# UTF-8 bytes decoded as cp1252/latin-1 turn into a lead letter (Â..ô) plus 1-3 continuation characters.
_CONTINUATION = re.escape("".join(sorted({bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(0x80, 0xC0)})))
_MOJIBAKE = re.compile(f"[\u00c2-\u00df][{_CONTINUATION}]|[\u00e0-\u00ef][{_CONTINUATION}]{{2}}"
                       f"|[\u00f0-\u00f4][{_CONTINUATION}]{{3}}|锟斤拷")
# One scan for any character the content rules look at; clean text (nearly all of it) stops here.
_SUSPECT = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00c2-\u00f4锟]")


def _is_mojibake(piece: str) -> bool:
    """True when `piece` is UTF-8 that was decoded as cp1252 or latin-1 (it re-decodes cleanly)."""
    if piece == "锟斤拷":  # U+FFFD pairs read back as GBK
        return True
    try:
        data = b"".join(c.encode("cp1252") if c.encode("cp1252", "ignore") else c.encode("latin-1") for c in piece)
        data.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return False
    return True


def _content(row: _Row, suspects: list[int]) -> None:
    for i in suspects:
        text = row.messages[i]["content"]
        if not _SUSPECT.search(text):
            continue
        if "\ufffd" in text:
            row.problems.append(("content.replacement_char",
                                 f"{_label(row, i)} has {text.count(chr(0xFFFD))} U+FFFD character(s): text was lost "
                                 "in a bad decode; re-export the source as UTF-8"))
        bad = _CONTROL.search(text)
        if bad:
            row.problems.append(("content.control_char", f"{_label(row, i)} has control character "
                                                         f"U+{ord(bad.group()):04X} at offset {bad.start()}; remove it"))
        pieces = [p.group() for p in _MOJIBAKE.finditer(text) if _is_mojibake(p.group())]
        if pieces:
            row.problems.append(("content.mojibake", f"{_label(row, i)} has mojibake {pieces[0]!r}: UTF-8 decoded "
                                                     "with the wrong codec; re-export the source as UTF-8"))


_PII = re.compile(
    r"(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
    r"|(?P<id_number>(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx]))"
    r"|(?P<phone>(?<!\d)(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"
    r"|(?<![\w+])(?:\+|00)[1-9]\d{0,2}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]?\d{2,4}){1,4}(?!\d))"
    r"|(?P<card_number>(?<!\d)\d(?:[ -]?\d){12,18}(?!\d))"
)
# Every number _PII looks for has at least 8 digits. A chain of digits is tried from its first digit only
# (the lookbehind): the same matches, without re-scanning each long number from every digit in it.
_EIGHT_DIGITS = re.compile(r"\d(?<!\d\d)(?:[ ()-]{0,2}\d){7}")
# One scan per message for anything the content and PII rules would find; clean text stops here.
_WORTH_A_LOOK = re.compile(f"{_SUSPECT.pattern}|@|{_EIGHT_DIGITS.pattern}")
_SUSPECT_OR_AT = re.compile(_SUSPECT.pattern[:-1] + "@]")  # with _EIGHT_DIGITS, _WORTH_A_LOOK in two faster scans
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
PII_MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "id_number": "[ID_NUMBER]", "card_number": "[CARD_NUMBER]"}


def _id_check_ok(number: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of a mainland resident ID (GB 11643)."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0 and len(set(digits)) > 1


def _pii_kind(match: re.Match) -> str | None:
    """The kind of personal data a match really is, after the checks a regex can't do."""
    kind, text = match.lastgroup, match.group()
    digits = "".join(c for c in text if c.isdigit())
    if kind == "id_number":
        if _id_check_ok(text):
            return kind
        return "card_number" if text.isdigit() and _luhn_ok(text) else None
    if kind == "phone":
        return kind if 8 <= len(digits.removeprefix("00")) <= 15 else None
    if kind == "card_number":
        return kind if _luhn_ok(digits) else None
    return kind  # email


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each e-mail, phone, resident ID and card number in `text`."""
    if "@" not in text and not _EIGHT_DIGITS.search(text):
        return []
    found = []
    for match in _PII.finditer(text):
        kind = _pii_kind(match)
        if kind:
            found.append((kind, match.start(), match.end()))
    return found


def _masked(value: str) -> str:
    """Enough of a value to find it in the file, not enough to leak it into a report."""
    return value[:3] + "*" * max(1, len(value) - 5) + value[-2:] if len(value) > 6 else "*" * len(value)


PII_OUTCOME = {"flag": " (flagged)", "reject": "; remove it or use --policy pii=redact", "redact": "; replaced with {}"}


def _pii(row: _Row, policy: str, suspects: list[int]) -> None:
    """One issue per kind of personal data per message, naming each value masked."""
    for i in suspects:
        m = row.messages[i]
        found = find_pii(m["content"])
        if not found:
            continue
        for kind in dict.fromkeys(k for k, _, _ in found):
            values = ", ".join(_masked(m["content"][a:b]) for k, a, b in found if k == kind)
            issue = (f"pii.{kind}", f"{_label(row, i)} has {kind.replace('_', ' ')} {values}"
                                    + PII_OUTCOME[policy].format(PII_MASKS[kind]))
            (row.problems if policy == "reject" else row.notes).append(issue)
        if policy == "redact":
            text = m["content"]
            for kind, start, end in reversed(found):
                text = text[:start] + PII_MASKS[kind] + text[end:]
            row.messages[i] = {"role": m["role"], "content": text}


def _short_response(row: _Row, minimum: int) -> None:
    answer = row.messages[-1]["content"].strip()
    if len(answer) < minimum:
        row.problems.append(("length.short_response", f"{_label(row, -1)} has {len(answer)} character(s), fewer "
                                                      f"than min_response_chars={minimum}; lengthen it or lower "
                                                      "--min-response-chars"))


def check_row(row: _Row, options: Options) -> None:
    """Every rule that needs only the row itself; stops at the first stage that rejects it."""
    if row.problems:  # it did not parse
        return
    _schema(row)
    if row.problems:
        return
    _roles(row)
    if row.problems:
        return
    suspects = [i for i, m in enumerate(row.messages) if _WORTH_A_LOOK.search(m["content"])]
    if suspects:
        _content(row, suspects)
        _pii(row, options.pii_policy, suspects)
    _short_response(row, options.min_response_chars)


# ---------------------------------------------------------------------------------------------
# Keys for duplicates, leakage and the split.


# Full-width punctuation NFKC maps to one ASCII character each, as it does on its own in any
# context, so replacing it first gives the same NFKC text; most Chinese text then passes the
# quick check, and normalising (20x slower) is left to what remains.
_FULL_WIDTH = tuple((c, unicodedata.normalize("NFKC", c)) for c in "，！？：；（）\u3000")


def _norm(text: str) -> str:
    """Text as compared for duplicates and leakage: NFKC, case-folded, whitespace collapsed."""
    if not text.isascii():
        for wide, narrow in _FULL_WIDTH:
            if wide in text:
                text = text.replace(wide, narrow)
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def prompt_key(norms: list[str], roles: list[str]) -> int:
    """A stable 64-bit hash of everything before the final answer: it decides the split, so it
    must not change between runs (Python's own `hash` is salted per process)."""
    if len(norms) == 2:  # one question: the join below, without its machinery
        text = roles[0] + "\x1f" + norms[0]
    else:
        text = "\x1e".join([r + "\x1f" + n for r, n in zip(roles[:-1], norms[:-1])])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _hash64(text: str) -> int:
    """A 64-bit key for comparisons within one run; forked workers share the process's hash salt."""
    return hash(text) & 0xFFFF_FFFF_FFFF_FFFF


def question_of(messages: list[Message], norms: list[str]) -> str:
    """The last user turn, normalised: the same question under another system prompt or history."""
    return next(n for m, n in zip(reversed(messages), reversed(norms)) if m["role"] == "user")


# ---------------------------------------------------------------------------------------------
# The fast lane. Nearly every row of a real data set breaks no rule; for those, the rules above come
# down to type checks and scans that find nothing. The lane does them for a batch at once: every
# content of the batch joined into one text, scanned once and normalised once (a separator that no
# rule, NFKC or casefold touches keeps the contents apart). Any row the lane is not sure of (an
# unusual field or shape, a suspect character, a short answer, too many tokens, an answer that
# repeats its prompt) goes the slow way, through check_row, so both ways give the same result
# (tests/test_validate.py compares them on random rows).

_SEP = "\ue000"  # a private-use character: not whitespace, not cased, left alone by NFKC
_AROUND_SEP = re.compile(f" ?{_SEP} ?")  # after whitespace is collapsed, a separator with its neighbours
_ALPACA_CLEAN = frozenset(("instruction", "input", "output", "system", "history"))
_ROLES_PLAIN, _ROLES_SYSTEM = ("user", "assistant"), ("system", "user", "assistant")
Clean = tuple[int | None, tuple[int, int, int], str]  # (tokens, keys, accepted line) of a row that broke no rule


def _clean_shape(obj: Any) -> tuple[tuple[str, ...], list[str]] | None:
    """(roles, contents) of a row with exactly one form's fields, each of its type, in a shape the
    role rules accept; None for anything else (the slow way then says what is wrong)."""
    if type(obj) is not dict:
        return None
    if "messages" in obj:
        messages = obj["messages"]
        if len(obj) != 1 or type(messages) is not list or not messages:
            return None
        roles, contents = [], []
        for m in messages:
            if type(m) is not dict or len(m) != 2:
                return None
            role, content = m.get("role"), m.get("content")
            if type(role) is not str or type(content) is not str:
                return None
            roles.append(role)
            contents.append(content)
        return (tuple(roles), contents) if _alternates(roles) else None
    if not obj.keys() <= _ALPACA_CLEAN:
        return None
    instruction, output, extra = obj.get("instruction"), obj.get("output"), obj.get("input")
    system, history = obj.get("system"), obj.get("history")
    if (type(instruction) is not str or type(output) is not str or (extra is not None and type(extra) is not str)
            or (system is not None and type(system) is not str) or not (history is None or history == [])):
        return None
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return (_ROLES_SYSTEM, [system, prompt, output]) if system else (_ROLES_PLAIN, [prompt, output])


# ---------------------------------------------------------------------------------------------
# The gate: rows in, files out.


class _Checker:
    """Everything that looks at one row at a time, ending with its keys and its accepted line.

    It holds no state across rows that matters for the result, so rows can be checked in
    worker processes (see `_check_block`) and come back in order to the gate."""

    def __init__(self, options: Options, counter: TokenCounter | None, external: set[int] | None) -> None:
        self.options, self.counter, self.external = options, counter, external

    def check(self, batch: list[_Row]) -> list[_Row]:
        """The fast lane for clean rows, the slow way for the rest."""
        slow = []
        for row, clean in zip(batch, self.fast([None if row.problems else row.raw for row in batch])):
            if type(clean) is tuple:
                row.tokens, row.keys, row.text = clean
            else:
                row.tokens = clean  # counted already when it is too long for the lane
                slow.append(row)
        self.slow(slow)
        return batch

    def slow(self, batch: list[_Row]) -> list[_Row]:
        """Row rules, then token counts for the whole batch in one tokenizer call, then the keys."""
        for row in batch:
            check_row(row, self.options)
        if self.counter:
            self._lengths([r for r in batch if not r.problems])
        for row in batch:
            if not row.problems:
                self._keys(row)
        return batch

    def fast(self, objs: list[Any]) -> list[Clean | int | None]:
        """For each parsed row: what the slow way would give a row that breaks no rule and gets no
        warning, or its token count (too many) or None when the row has to go the slow way."""
        shapes = [_clean_shape(obj) for obj in objs]
        live = [i for i, shape in enumerate(shapes) if shape]
        contents = [c for i in live for c in shapes[i][1]]
        joined = _SEP.join(contents)
        if joined.count(_SEP) != len(contents) - 1 and contents:  # a content holds the separator itself
            live = [i for i in live if not any(_SEP in c for c in shapes[i][1])]
            contents = [c for i in live for c in shapes[i][1]]
            joined = _SEP.join(contents)
        starts, at = [], 0
        for c in contents:
            starts.append(at)
            at += len(c) + 1
        found = itertools.chain(_SUSPECT_OR_AT.finditer(joined), _EIGHT_DIGITS.finditer(joined))
        suspect = {bisect.bisect_right(starts, m.start()) - 1 for m in found}
        norms = _AROUND_SEP.split(_norm(joined)) if contents else []
        minimum, offset, rows = self.options.min_response_chars, 0, []
        for i in live:
            roles, texts = shapes[i]
            n = len(texts)
            first, offset = offset, offset + n
            if (not suspect.isdisjoint(range(first, offset)) or not all(t.strip() for t in texts)
                    or len(texts[-1].strip()) < minimum):
                continue
            row_norms = norms[first:offset]
            if row_norms[-1] == row_norms[-2]:  # the answer repeats the prompt
                continue
            question = _hash64(row_norms[-2])  # a clean row alternates: its last user turn is the prompt
            if self.external is not None and question in self.external:
                continue
            rows.append((i, roles, texts, (prompt_key(row_norms, roles), _hash64(row_norms[-1]), question)))
        results: list[Clean | int | None] = [None] * len(objs)
        counter = self.counter
        if counter:
            rows = [r for r in rows if counter.template_problem(r[1]) is None]
            tokens = counter.count_texts([r[2] for r in rows], [r[1] for r in rows])
        else:
            tokens = [None] * len(rows)
        limit = self.options.max_seq_length
        for (i, roles, texts, keys), n in zip(rows, tokens):
            results[i] = (n, keys, _messages_line(roles, texts)) if n is None or n <= limit else n
        return results

    def _lengths(self, rows: list[_Row]) -> None:
        counter, limit = self.counter, self.options.max_seq_length
        live, roles = [], []
        for row in rows:
            row_roles = tuple(m["role"] for m in row.messages)
            problem = counter.template_problem(row_roles)
            if problem:
                row.problems.append(("roles.template_error", f"the chat template refuses this row ({problem})"))
            elif row.tokens is None:
                live.append(row)
                roles.append(row_roles)
        for row, n in zip(live, counter.count([r.messages for r in live], roles)):
            row.tokens = n
        for row in rows:
            n = row.tokens
            if n is None or n <= limit:
                continue
            message = f"{n} tokens under the chat template, above max_seq_length={limit}"
            if self.options.length_policy == "reject":
                row.problems.append(("length.too_long", f"{message}; shorten it or use --policy length=truncate"))
            elif self.options.length_policy == "keep":
                row.notes.append(("length.too_long", f"{message}; kept (training truncates it)"))
            elif (cut := counter.truncate(row.messages)) is None:
                row.problems.append(("length.too_long", f"{message}, and the prompt alone does not fit; shorten it"))
            else:
                row.messages, row.tokens = cut
                row.notes.append(("length.too_long", f"{message}; the final answer was cut to {row.tokens} tokens"))

    def _keys(self, row: _Row) -> None:
        """Rules on the final, normalised text (the response repeating the prompt, overlap with the
        external eval set), then the hashes the duplicate and split rules compare, and the line."""
        messages = row.messages
        norms = [_norm(m["content"]) for m in messages]
        roles = [m["role"] for m in messages]
        if roles[-2] == "user" and norms[-1] == norms[-2]:
            row.problems.append(("content.response_equals_prompt", f"{_label(row, -1)} repeats the prompt "
                                                                   f"{_label(row, -2)}; write a real answer"))
            return
        question = _hash64(question_of(messages, norms))
        if self.external is not None and question in self.external:
            row.problems.append(("leakage.external_eval", "the question also appears in the external eval set "
                                                          "(--eval-data); drop it from one of them"))
            return
        row.keys = prompt_key(norms, roles), _hash64(norms[-1]), question
        row.text = _messages_json(messages)


class _Gate:
    """Applies the rules across rows (duplicates) in file order and writes each row where it belongs."""

    def __init__(self, options: Options, name: str, folder: Path) -> None:
        self.options, self.name, self.folder = options, name, folder
        self.files = {k: open(folder / f"{k}.jsonl", "w", encoding="utf-8") for k in ("accepted", "rejected", "warnings")}
        self.rule_rows: Counter[str] = Counter()
        self.rows_in = self.accepted = self.rejected = self.warned = 0
        self.fatal: str | None = None
        self.examples: dict[str, list[dict]] = {"rejected": [], "warnings": []}
        self.seen: dict[int, int] = {}  # prompt key -> answer hash << 32 | line of its first row (one int: ~100 B)
        self.repeats: dict[tuple[int, int], int] = {}  # (prompt, answer) -> line, for answers after the first
        self.prompt_keys, self.question_keys, self.lines = array("Q"), array("Q"), array("Q")  # per accepted row
        self.lengths: Counter[int] = Counter()

    def where(self, line: int) -> str:
        return f"{self.name}:{line}"

    def add(self, rows: list[_Row | CleanRow]) -> None:
        """Checked rows, in file order (so the first of two duplicates is the one kept)."""
        for row in rows:
            if type(row) is tuple:  # a clean row from the fast lane
                line, tokens, keys, text, raw = row
                if keys[0] not in self.seen:  # a new prompt (nearly always): kept, without building a _Row
                    self.seen[keys[0]] = keys[1] << 32 | min(line, MASK32)
                    self.rows_in += 1
                    self._keep(line, keys, tokens, text)
                    continue
                row = _Row(line, None, raw, tokens=tokens, keys=keys, text=text)
            if not row.problems:
                self._duplicates(row)
            self._write(row)

    def _duplicates(self, row: _Row) -> None:
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
            row.notes.append(("duplicate.conflicting_answer",
                              f"same prompt as line {first & MASK32} with a different answer; check which is right"))
            self.repeats[(prompt, answer)] = row.line

    def note(self, note: _Note) -> None:
        """A line that is not a row: counted and listed as a warning, never as a row."""
        self.rule_rows[note.rule] += 1
        self._record("warnings", {"where": self.where(note.line), "line": note.line, "rule": note.rule,
                                  "message": note.message})

    def _record(self, kind: str, record: dict) -> None:
        self.files[kind].write(_to_json(record) + "\n")
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(record)

    def _write(self, row: _Row) -> None:
        self.rows_in += 1
        if row.problems or row.notes:
            self.rule_rows.update({rule for rule, _ in row.problems + row.notes})
            place = {"where": self.where(row.line), "line": row.line} | (
                {"item": row.item} if row.item is not None else {})
        for rule, message in row.notes:
            self._record("warnings", place | {"rule": rule, "message": message})
        self.warned += bool(row.notes)
        if row.problems:
            self.rejected += 1
            rule, message = row.problems[0]
            problems = [{"rule": r, "message": m} for r, m in row.problems]
            raw = _from_json(row.raw.decode()) if isinstance(row.raw, bytes) else row.raw  # see _check_block
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
            failures.append(f"{distinct} distinct prompt(s) accepted; an eval split needs at least 2 "
                            "(or pass --eval-fraction 0)")
        elif fraction:
            held_out = set(heapq.nsmallest(min(distinct - 1, max(1, round(fraction * distinct))), self.seen))
        self.seen.clear()  # the split's sets take its place in memory
        train_questions = {q for p, q in zip(self.prompt_keys, self.question_keys) if p not in held_out}
        counts: Counter[str] = Counter()
        self.files["accepted"].close()  # flushed before it is read back
        with open(self.folder / "accepted.jsonl", "rb") as accepted, \
                open(self.folder / "train.jsonl", "wb") as train, open(self.folder / "eval.jsonl", "wb") as evaluation:
            for i, (text, p) in enumerate(zip(accepted, self.prompt_keys)):
                if p not in held_out:
                    train.write(text)
                elif self.question_keys[i] not in train_questions:
                    evaluation.write(text)
                    counts["eval"] += 1
                else:
                    line = self.lines[i]
                    self._record("warnings", {"where": self.where(line), "line": line, "rule": "leakage.eval_in_train",
                                              "message": "its question also appears in train under another system "
                                                         "prompt or history; moved from eval to train"})
                    self.rule_rows["leakage.eval_in_train"] += 1
                    train.write(text)
        counts["train"] = len(self.prompt_keys) - counts["eval"]
        if held_out and not counts["eval"]:
            failures.append("every eval row's question also appears in train; the eval split is empty")
        return counts["train"], counts["eval"], failures


def _token_stats(lengths: Counter[int], limit: int) -> dict[str, Any] | None:
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
    return {"rows": total, "min": ordered[0][0], "mean": round(sum(v * n for v, n in ordered) / total, 1),
            "p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99), "max": ordered[-1][0],
            "over_limit": sum(n for v, n in ordered if v > limit), "max_seq_length": limit, "histogram": histogram}


def _failures(gate: _Gate, options: Options) -> list[str]:
    failures = [gate.fatal] if gate.fatal else []
    if not gate.rows_in:
        failures.append("the file has no rows; add JSONL rows in alpaca or messages form")
    elif gate.rejected / gate.rows_in > options.max_reject_fraction:
        failures.append(f"{gate.rejected / gate.rows_in:.1%} of rows rejected ({gate.rejected} of {gate.rows_in}), "
                        f"above max_reject_fraction={options.max_reject_fraction:g}; see rejected.jsonl")
    if gate.accepted < options.min_rows:
        failures.append(f"{gate.accepted} rows accepted, fewer than min_rows={options.min_rows}")
    return failures


def _external_questions(source: str) -> tuple[set[int], int]:
    """Question keys of an external eval set, and how many of its rows were unusable (skipped)."""
    questions, unusable = set(), 0
    with _open(_fetch(source)) as (stream, _, data_format):
        try:
            for row in _rows(stream, data_format):
                if isinstance(row, _Note):
                    continue
                if not row.problems:
                    _schema(row)
                if row.problems or not any(m.get("role") == "user" for m in row.messages):
                    unusable += 1
                else:
                    questions.add(_hash64(question_of(row.messages, [_norm(m["content"]) for m in row.messages])))
        except _BrokenFile as exc:
            raise KftuneError(f"--eval-data {source}:{exc.line}: {exc.message}") from None
    return questions, unusable


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[io.BufferedReader, _HashingReader, str]]:
    """A data file opened for streaming: (buffered byte stream, hashing reader, format)."""
    reader = _HashingReader(io.FileIO(path, "r"))
    with io.BufferedReader(reader, buffer_size=1 << 20) as stream:
        yield stream, reader, _sniff(stream, path.name)


def _progress(total: int, enabled: bool) -> Any:
    """A byte-based progress bar for long files, or None."""
    if not enabled or total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="validate-data", mininterval=1.0)


def _batches(gate: _Gate, items: Iterator[_Row | _Note]) -> Iterator[list[_Row]]:
    """Rows in batches of `batch_rows`; notes go straight to the gate. A file that breaks off ends
    with its broken item as a rejected row, and the gate fails whatever the counts."""
    batch: list[_Row] = []
    try:
        for item in items:
            if isinstance(item, _Note):
                gate.note(item)
                continue
            batch.append(item)
            if len(batch) == gate.options.batch_rows:
                yield batch
                batch = []
    except _BrokenFile as exc:
        gate.fatal = f"{gate.where(exc.line)}: {exc.message}"
        batch.append(_Row(exc.line, None, None, problems=[(exc.rule, exc.message)]))
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Checking rows in worker processes: the main process reads blocks of lines and keeps the rules
# across rows and the writing; forked workers parse and check the blocks, a few in flight at a
# time (bounded memory), and the results are taken in file order, so the output is the same.

_worker_checker: _Checker | None = None


def _start_worker(checker: _Checker) -> None:
    global _worker_checker
    _worker_checker = checker  # inherited through fork, not pickled


def _block_values(lines: list[bytes]) -> list[Any] | None:
    """The JSON value of each line, from one json call; None when a line holds anything but one
    value (a blank line, a BOM, bad JSON or UTF-8: the block is then read line by line)."""
    try:
        values = _from_json((b"[" + b",".join(lines) + b"]").decode("utf-8"))
    except ValueError:  # JSONDecodeError or UnicodeDecodeError
        return None
    return values if len(values) == len(lines) else None  # a line like `1, 2` holds two values


# A row that broke no rule, as the fast lane hands it to the gate: (line, tokens, keys, accepted
# line, the line's bytes). Far cheaper to build and to pickle back from a worker than a _Row.
CleanRow = tuple[int, int | None, tuple[int, int, int], str, bytes]


def _check_block(checker: _Checker, first_line: int, lines: list[bytes]) -> list[_Row | _Note | CleanRow]:
    """Parse and check one block of JSONL lines; the items come back in file order.

    An accepted row keeps its line's bytes instead of the parsed object (cheaper to pickle back
    from a worker); the gate parses it again only if it turns out to be a duplicate."""
    values = _block_values(lines)
    if values is None:
        items: list[_Row | _Note | CleanRow] = list(_jsonl_rows(lines, first_line))
        rows = [item for item in items if isinstance(item, _Row)]
        for start in range(0, len(rows), checker.options.batch_rows):
            checker.check(rows[start:start + checker.options.batch_rows])
    else:
        items, rows = [], []
        for line, value, clean, raw in zip(range(first_line, first_line + len(lines)), values,
                                           checker.fast(values), lines):
            if type(clean) is tuple:
                items.append((line, *clean, raw))
            else:
                rows.append(_Row(line, None, value, tokens=clean))
                items.append(rows[-1])
        checker.slow(rows)
    for row in rows:
        if not row.problems:
            row.raw, row.messages = lines[row.line - first_line].removeprefix(BOM), None
    return items


def _check_block_in_worker(first_line: int, lines: list[bytes]) -> tuple[list[_Row | _Note | CleanRow],
                                                                         dict[str, Any] | None]:
    """_check_block in a worker process; also returns the worker's token-count stats."""
    checker = _worker_checker
    items = _check_block(checker, first_line, lines)
    counter = checker.counter
    return items, ({"pid": os.getpid(), **counter.stats, "slow_reason": counter.slow_reason} if counter else None)


def _rows_of(gate: _Gate, items: list[_Row | _Note | CleanRow]) -> list[_Row | CleanRow]:
    """The rows of a block; its notes go straight to the gate."""
    rows = []
    for item in items:
        if isinstance(item, _Note):
            gate.note(item)
        else:
            rows.append(item)
    return rows


def _serial_blocks(gate: _Gate, checker: _Checker, stream: io.BufferedReader) -> Iterator[list[_Row | CleanRow]]:
    next_line = 1
    while lines := stream.readlines(BLOCK_BYTES):
        yield _rows_of(gate, _check_block(checker, next_line, lines))
        next_line += len(lines)


def _workers(options: Options, size: int) -> int:
    """Worker processes for a JSONL file: options.workers, or by default one per usable CPU (at
    most 4) for files of PARALLEL_MIN_BYTES and more; 1 means check in this process."""
    if options.workers:
        return options.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 4) if size >= PARALLEL_MIN_BYTES else 1


def _parallel_batches(gate: _Gate, checker: _Checker, stream: io.BufferedReader,
                      workers: int) -> Iterator[list[_Row | CleanRow]]:
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, and no fork warning from tokenizers
    stats: dict[int, dict[str, Any]] = {}
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_start_worker, initargs=(checker,)) as pool:
            pending: collections.deque[Future] = collections.deque()
            next_line = 1
            while True:
                while len(pending) <= workers and (lines := stream.readlines(BLOCK_BYTES)):
                    pending.append(pool.submit(_check_block_in_worker, next_line, lines))
                    next_line += len(lines)
                if not pending:
                    break
                items, worker_stats = pending.popleft().result()
                if worker_stats:
                    stats[worker_stats.pop("pid")] = worker_stats
                yield _rows_of(gate, items)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    if checker.counter:
        checker.counter.absorb(list(stats.values()))


def _run(gate: _Gate, checker: _Checker, path: Path, options: Options) -> tuple[str, str]:
    """Stream the file through the checker and the gate, batch by batch; returns (sha256, format)."""
    with _open(path) as (stream, reader, data_format):
        size = path.stat().st_size
        bar = _progress(size, options.progress)
        workers = _workers(options, size) if data_format == "jsonl" else 1
        if workers > 1:
            batches = _parallel_batches(gate, checker, stream, workers)
        elif data_format == "jsonl":
            batches = _serial_blocks(gate, checker, stream)
        else:
            batches = (checker.check(batch) for batch in _batches(gate, _rows(stream, data_format)))
        for batch in batches:
            gate.add(batch)
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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "report.json").is_file():
        raise KftuneError(f"--out {out_dir} exists and is not an earlier validate-data output; "
                          "pick another folder or empty it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def validate(source: str | os.PathLike, out_dir: str | os.PathLike, options: Options | None = None) -> Report:
    """Validate `source` (a local file or s3:// URI) and write every output to `out_dir`.

    Usage errors (no such file, a tokenizer that won't load, an `out_dir` that isn't ours to
    replace) raise KftuneError; a failed gate is a Report with `passed` False.
    """
    options = options or Options()
    started = time.perf_counter()
    name, out_dir = str(source), Path(out_dir)
    path = _fetch(name)
    _prepare_out_dir(out_dir)
    counter = load_counter(options.tokenizer, options.max_seq_length) if options.tokenizer else None
    external, unusable = _external_questions(options.eval_data) if options.eval_data else (None, 0)
    with building(out_dir) as tmp:
        gate = _Gate(options, name, tmp)
        try:
            with _without_cycle_collection():
                sha256, data_format = _run(gate, _Checker(options, counter, external), path, options)
                train_rows, eval_rows, split_failures = gate.split()
        finally:
            gate.close()
        rules = {rule: {"action": options.action(rule), "rows": gate.rule_rows[rule]} for rule in RULES}
        if counter is None:
            for rule in ("length.too_long", "roles.template_error"):
                rules[rule]["action"] = "skipped (no --base_model or --tokenizer)"
        if external is None:
            rules["leakage.external_eval"]["action"] = "skipped (no --eval-data)"
        failures = _failures(gate, options) + split_failures
        report = Report(
            passed=not failures, failures=failures, out_dir=str(out_dir), source=name, dataset_sha256=sha256,
            data_format=data_format, rows_in=gate.rows_in, accepted=gate.accepted, rejected=gate.rejected,
            rows_with_warnings=gate.warned, train_rows=train_rows, eval_rows=eval_rows, rules=rules,
            token_lengths=_token_stats(gate.lengths, options.max_seq_length),
            token_counting=counter.describe() if counter else None,
            options=asdict(options) | ({"eval_data_unusable_rows": unusable} if external is not None else {}),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", "utf-8")
        (tmp / "report.html").write_text(render_html(report, gate.examples), "utf-8")
    return report


# ---------------------------------------------------------------------------------------------
# report.html


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
    parser = argparse.ArgumentParser(prog="kftune validate-data", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="JSONL or JSON array file (alpaca or messages), or an s3:// URI")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--base_model", "--base-model", metavar="M", help="base model whose tokenizer and chat "
                                                                          "template count the tokens")
    model.add_argument("--tokenizer", metavar="T", help="a tokenizer folder or hub id instead of the base model")
    parser.add_argument("--max_seq_length", "--max-seq-length", metavar="N", type=int, default=defaults.max_seq_length,
                        help="tokens per row after the chat template, as in training")
    parser.add_argument("--eval-fraction", "--eval_fraction", metavar="F", type=float, default=defaults.eval_fraction,
                        help="share of distinct prompts held out as eval.jsonl (0: none)")
    parser.add_argument("--eval-data", "--eval_data", metavar="E", help="external eval set; train rows that share a "
                                                                        "question with it are rejected")
    parser.add_argument("--out", metavar="DIR", default="validation", help="output folder (replaced atomically)")
    parser.add_argument("--policy", action="append", default=[], metavar="KIND=VALUE",
                        help="length=reject|truncate|keep (default reject), pii=flag|reject|redact (default flag); "
                             "repeat or comma-separate")
    parser.add_argument("--max-reject-fraction", "--max_reject_fraction", metavar="F", type=float,
                        default=defaults.max_reject_fraction, help="the gate fails above this share of rejected rows")
    parser.add_argument("--min-rows", "--min_rows", metavar="N", type=int, default=defaults.min_rows,
                        help="the gate fails with fewer accepted rows")
    parser.add_argument("--min-response-chars", "--min_response_chars", metavar="N", type=int,
                        default=defaults.min_response_chars, help="shorter final answers are rejected")
    parser.add_argument("--workers", metavar="N", type=int, default=defaults.workers,
                        help="processes checking rows of a JSONL file (0: one per CPU, at most 4, for files "
                             "over 8 MiB; 1: none)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    policies = _policies(args.policy)
    options = Options(
        tokenizer=args.base_model or args.tokenizer, max_seq_length=args.max_seq_length,
        length_policy=policies.get("length", "reject"), pii_policy=policies.get("pii", "flag"),
        min_response_chars=args.min_response_chars, eval_fraction=args.eval_fraction, eval_data=args.eval_data,
        max_reject_fraction=args.max_reject_fraction, min_rows=args.min_rows, workers=args.workers, progress=True,
    )
    report = validate(args.data, args.out, options)
    print(report.summary())
    return 0 if report.passed else 1
