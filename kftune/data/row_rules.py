"""Row rules: schema, roles, content and personal data. Each adds (rule, message) pairs to the row;
`check_row` runs every rule that needs only the row itself."""

from __future__ import annotations

import re
from typing import Any

from kftune.data.formats import (
    ALPACA_FIELDS,
    MESSAGE_FIELDS,
    PLAIN_ROLES,
    ROLES,
    SYSTEM_ROLES,
    Message,
    Sample,
    detect,
    is_extended,
    read_extended,
    to_messages,
    turn_text,
)
from kftune.data.pii import EIGHT_DIGITS, PII_MASKS, PII_OUTCOME, find_pii, masked
from kftune.data.rules import Options, Row
from kftune.data.tool_rules import tool_role_problems


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def label(row: Row, i: int) -> str:
    """Where message i came from, in the row's own terms: messages[2], 'output', history[0][1].

    Built only for a message that has a problem, so good rows never pay for it.
    """
    obj, i = row.raw, i % len(row.messages)
    if row.format == "text":
        return "'text'"
    if row.format == "sharegpt":
        key = "conversations" if "conversations" in obj else "messages"
        first = int(bool(obj.get("system")) and isinstance(obj.get("system"), str))
        return f"{key}[{i - first}]" if i >= first else "'system'"
    if row.format == "prompt_completion":
        prompt = 1 if isinstance(obj["prompt"], str) else len(obj["prompt"])
        return f"prompt[{i}]" if i < prompt else f"completion[{i - prompt}]"
    if "messages" in obj:
        return f"messages[{i}]"
    history = [f"history[{k}][{j}]" for k in range(len(obj.get("history") or [])) for j in (0, 1)]
    prompt = "'instruction'" + (" + 'input'" if obj.get("input") else "")
    return (["'system'"] * bool(obj.get("system")) + history + [prompt, "'output'"])[i]


def _messages_schema(row: Row, obj: dict) -> None:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        row.problems.append(
            (
                "schema.wrong_type",
                f"'messages' is {_type(messages)}; expected a non-empty list of {{role, content}} objects",
            )
        )
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            row.problems.append(
                ("schema.wrong_type", f"messages[{i}] is {_type(m)}; expected an object with 'role' and 'content'")
            )
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
        row.notes.append(
            ("schema.unknown_field", f"unknown field(s) {', '.join(sorted(set(obj) - {'messages'}))}; ignored")
        )


def _alpaca_schema(row: Row, obj: dict) -> None:
    for key in ("instruction", "output"):
        if key not in obj:
            row.problems.append(("schema.missing_field", f"alpaca row has no {key!r}"))
        elif not isinstance(obj[key], str):
            row.problems.append(("schema.wrong_type", f"{key!r} is {_type(obj[key])}; expected a string"))
    for key in ("input", "system"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            row.problems.append(("schema.wrong_type", f"{key!r} is {_type(obj[key])}; expected a string or null"))
    history = obj.get("history")
    if history is not None and not (
        isinstance(history, list)
        and all(isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history)
    ):
        row.problems.append(("schema.wrong_type", "'history' must be a list of [user, assistant] string pairs"))
    if not ALPACA_FIELDS.issuperset(obj):
        extra = ", ".join(sorted(set(obj) - ALPACA_FIELDS))
        row.notes.append(("schema.unknown_field", f"unknown field(s) {extra}; ignored"))


def schema(row: Row) -> None:
    """Recognise the form, check field types and normalise the row to chat messages."""
    obj = row.raw
    if not isinstance(obj, dict):
        row.problems.append(("parse.not_object", f"the row is a JSON {_type(obj)}; expected an object"))
        return
    row.format = detect(obj)
    if row.format and is_extended(obj):
        sample, issues = read_extended(obj, row.format)
        row.problems += issues
        if sample is not None:
            row.extended = True
            row.messages = [{"role": "text", "content": sample["text"]}] if "text" in sample else sample["messages"]
            row.tools = sample.get("tools")
        return
    if "messages" in obj:
        if ALPACA_FIELDS.isdisjoint(obj):
            _messages_schema(row, obj)
        else:
            mixed = ", ".join(sorted(ALPACA_FIELDS.intersection(obj)))
            row.problems.append(
                ("schema.unknown_form", f"the row mixes messages form with alpaca fields ({mixed}); keep one form")
            )
    elif "instruction" in obj or "output" in obj:
        _alpaca_schema(row, obj)
    else:
        fields = ", ".join(sorted(obj)) or "none"
        row.problems.append(
            (
                "schema.unknown_form",
                f"in none of the formats: alpaca (instruction, output), messages, sharegpt (conversations), "
                f"prompt_completion (prompt, completion) or text (text); the row's fields: {fields}",
            )
        )
    if not row.problems:
        row.messages = to_messages(obj)


_PLAIN, _WITH_SYSTEM = list(PLAIN_ROLES), list(SYSTEM_ROLES)  # lists: compared with lists of roles


def alternates(roles: list[str]) -> bool:
    """An optional system message, then user/assistant pairs: the one shape that needs no diagnosis."""
    if roles in (_PLAIN, _WITH_SYSTEM):
        return True
    body = roles[1:] if roles[0] == "system" else roles
    pairs = len(body) // 2
    return bool(body) and len(body) % 2 == 0 and body[::2] == ["user"] * pairs and body[1::2] == ["assistant"] * pairs


def _role_problems(row: Row, roles: list[str]) -> None:
    unknown = [i for i, r in enumerate(roles) if r not in ROLES]
    for i in unknown:
        row.problems.append(
            ("roles.unknown_role", f"{label(row, i)}.role is {roles[i]!r}; expected one of {', '.join(ROLES)}")
        )
    for i, r in enumerate(roles[1:], start=1):
        if r == "system":
            row.problems.append(
                ("roles.system_not_first", f"{label(row, i)} is a system message; only the first message may be")
            )
    turns = [(i, r) for i, r in enumerate(roles) if r != "system"]
    expected = ("user", "assistant")
    wrong = next(((i, r, expected[n % 2]) for n, (i, r) in enumerate(turns) if r != expected[n % 2]), None)
    if wrong and not unknown:
        i, r, should = wrong
        row.problems.append(
            (
                "roles.not_alternating",
                f"{label(row, i)} is {r!r} where {should!r} should be; turns must go user, assistant, user, ...",
            )
        )
    if "assistant" not in roles:
        row.problems.append(("roles.no_assistant", "no assistant turn; add the answer the model should learn"))
    elif roles[-1] != "assistant":
        row.problems.append(
            (
                "roles.not_ending_with_assistant",
                f"the last turn ({label(row, -1)}) is {roles[-1]!r}; end with the assistant's answer",
            )
        )


def _roles(row: Row) -> None:
    if row.extended:
        if row.format != "text":
            tool_role_problems(row, label)
        elif not row.messages[0]["content"].strip():
            row.problems.append(("content.empty_text", "'text' is empty or whitespace only; drop the row"))
        return
    roles = [m["role"] for m in row.messages]
    if not alternates(roles):
        _role_problems(row, roles)
    for i, m in enumerate(row.messages):
        if not m["content"].strip():
            row.problems.append(("roles.empty_content", f"{label(row, i)} ({m['role']}) is empty or whitespace only"))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# UTF-8 bytes decoded as cp1252/latin-1 turn into a lead letter (Â..ô) plus 1-3 continuation characters.
_CONTINUATION = re.escape("".join(sorted({bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(0x80, 0xC0)})))
_MOJIBAKE = re.compile(
    f"[\u00c2-\u00df][{_CONTINUATION}]|[\u00e0-\u00ef][{_CONTINUATION}]{{2}}"
    f"|[\u00f0-\u00f4][{_CONTINUATION}]{{3}}|锟斤拷"
)
# One scan for any character the content rules look at; clean text (nearly all of it) stops here.
SUSPECT = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00c2-\u00f4锟]")


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


def _content(row: Row, suspects: list[int]) -> None:
    for i in suspects:
        text = row.messages[i]["content"]
        if not SUSPECT.search(text):
            continue
        if "\ufffd" in text:
            row.problems.append(
                (
                    "content.replacement_char",
                    f"{label(row, i)} has {text.count(chr(0xFFFD))} U+FFFD character(s): text was lost "
                    "in a bad decode; re-export the source as UTF-8",
                )
            )
        bad = _CONTROL.search(text)
        if bad:
            row.problems.append(
                (
                    "content.control_char",
                    f"{label(row, i)} has control character "
                    f"U+{ord(bad.group()):04X} at offset {bad.start()}; remove it",
                )
            )
        pieces = [p.group() for p in _MOJIBAKE.finditer(text) if _is_mojibake(p.group())]
        if pieces:
            row.problems.append(
                (
                    "content.mojibake",
                    f"{label(row, i)} has mojibake {pieces[0]!r}: UTF-8 decoded "
                    "with the wrong codec; re-export the source as UTF-8",
                )
            )


# One scan per message for anything the content and PII rules would find; clean text stops here.
WORTH_A_LOOK = re.compile(f"{SUSPECT.pattern}|@|{EIGHT_DIGITS.pattern}")
SUSPECT_OR_AT = re.compile(SUSPECT.pattern[:-1] + "@]")  # with EIGHT_DIGITS, WORTH_A_LOOK in two faster scans


def _pii(row: Row, policy: str, suspects: list[int]) -> None:
    """One issue per kind of personal data per message, naming each value masked."""
    for i in suspects:
        m = row.messages[i]
        found = find_pii(m["content"])
        if not found:
            continue
        for kind in dict.fromkeys(k for k, _, _ in found):
            values = ", ".join(masked(m["content"][a:b]) for k, a, b in found if k == kind)
            issue = (
                f"pii.{kind}",
                f"{label(row, i)} has {kind.replace('_', ' ')} {values}" + PII_OUTCOME[policy].format(PII_MASKS[kind]),
            )
            (row.problems if policy == "reject" else row.notes).append(issue)
        if policy == "redact":
            text = m["content"]
            for kind, start, end in reversed(found):
                text = text[:start] + PII_MASKS[kind] + text[end:]
            row.messages[i] = {**m, "content": text}


def _short_response(row: Row, minimum: int) -> None:
    answer = turn_text(row.messages[-1]).strip()
    if len(answer) < minimum:
        row.problems.append(
            (
                "length.short_response",
                f"{label(row, -1)} has {len(answer)} character(s), fewer "
                f"than min_response_chars={minimum}; lengthen it or lower "
                "--min-response-chars",
            )
        )


def check_row(row: Row, options: Options) -> None:
    """Every rule that needs only the row itself; stops at the first stage that rejects it."""
    if row.problems:  # it did not parse
        return
    schema(row)
    if row.problems:
        return
    _roles(row)
    if row.problems:
        return
    suspects = [i for i, m in enumerate(row.messages) if WORTH_A_LOOK.search(m["content"])]
    if suspects:
        _content(row, suspects)
        _pii(row, options.pii_policy, suspects)
    _short_response(row, options.min_response_chars)


def structure_problem(obj: Any) -> tuple[str | None, list[Message] | None]:
    """(the first schema or role problem of a parsed row, as the gate words it, None) or (None, its messages).

    Training and evaluation read rows through this, so a row the gate accepts loads to the same messages.
    """
    problem, sample = sample_problem(obj)
    return problem, None if sample is None else sample.get(
        "messages", [{"role": "text", "content": sample.get("text")}]
    )


def sample_problem(obj: Any) -> tuple[str | None, Sample | None]:
    """`structure_problem` for any format: (problem, None) or (None, the row as a sample, formats' one shape)."""
    row = Row(0, None, obj)
    schema(row)
    if not row.problems:
        _roles(row)
    if row.problems:
        return row.problems[0][1], None
    if row.format == "text":
        return None, {"text": row.messages[0]["content"]}
    return None, {"messages": row.messages, **({"tools": row.tools} if row.tools else {})}
