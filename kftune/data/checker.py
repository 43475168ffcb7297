"""Everything the gate does to one row at a time: the row rules (the slow way), the fast lane for
rows that break none, token counts, and the keys the duplicate, leakage and split rules compare."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
import unicodedata
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.formats import (
    ALPACA_FIELDS,
    PLAIN_ROLES,
    SYSTEM_ROLES,
    Message,
    alpaca_prompt,
    detect,
    messages_line,
    sample_json,
    turn_text,
)
from kftune.data.pii import EIGHT_DIGITS
from kftune.data.row_rules import SUSPECT_OR_AT, alternates, check_row, label
from kftune.data.rules import Options, Row
from kftune.data.token_counting import TokenCounter

# Full-width punctuation NFKC maps to one ASCII character each, as it does on its own in any
# context, so replacing it first gives the same NFKC text; most Chinese text then passes the
# quick check, and normalising (20x slower) is left to what remains.
_FULL_WIDTH = tuple((c, unicodedata.normalize("NFKC", c)) for c in "，！？：；（）\u3000")


def norm(text: str) -> str:
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


def hash64(text: str) -> int:
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
        return (tuple(roles), contents) if alternates(roles) else None
    if not obj.keys() <= ALPACA_FIELDS:
        return None
    instruction, output, extra = obj.get("instruction"), obj.get("output"), obj.get("input")
    system, history = obj.get("system"), obj.get("history")
    if (
        type(instruction) is not str
        or type(output) is not str
        or (extra is not None and type(extra) is not str)
        or (system is not None and type(system) is not str)
        or not (history is None or history == [])
    ):
        return None
    prompt = alpaca_prompt(instruction, extra)
    return (SYSTEM_ROLES, [system, prompt, output]) if system else (PLAIN_ROLES, [prompt, output])


# A row that broke no rule, as the fast lane hands it to the gate: (line, tokens, keys, accepted
# line, the line's bytes). Far cheaper to build and to pickle back from a worker than a Row.
CleanRow = tuple[int, int | None, tuple[int, int, int], str, bytes]


class Checker:
    """Everything that looks at one row at a time, ending with its keys and its accepted line.

    It holds no state across rows that matters for the result, so rows can be checked in
    worker processes (see `check_block`) and come back in order to the gate."""

    def __init__(self, options: Options, counter: TokenCounter | None, external: set[int] | None) -> None:
        self.options, self.counter, self.external = options, counter, external

    def check(self, batch: list[Row]) -> list[Row]:
        """The fast lane for clean rows, the slow way for the rest."""
        slow = []
        for row, clean in zip(batch, self.fast([None if row.problems else row.raw for row in batch])):
            if type(clean) is tuple:
                row.tokens, row.keys, row.text = clean
                row.format = detect(row.raw)
            else:
                row.tokens = clean  # counted already when it is too long for the lane
                slow.append(row)
        self.slow(slow)
        return batch

    def slow(self, batch: list[Row]) -> list[Row]:
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
        found = itertools.chain(SUSPECT_OR_AT.finditer(joined), EIGHT_DIGITS.finditer(joined))
        suspect = {bisect.bisect_right(starts, m.start()) - 1 for m in found}
        norms = _AROUND_SEP.split(norm(joined)) if contents else []
        minimum, offset, rows = self.options.min_response_chars, 0, []
        for i in live:
            roles, texts = shapes[i]
            n = len(texts)
            first, offset = offset, offset + n
            if (
                not suspect.isdisjoint(range(first, offset))
                or not all(t.strip() for t in texts)
                or len(texts[-1].strip()) < minimum
            ):
                continue
            row_norms = norms[first:offset]
            if row_norms[-1] == row_norms[-2]:  # the answer repeats the prompt
                continue
            question = hash64(row_norms[-2])  # a clean row alternates: its last user turn is the prompt
            if self.external is not None and question in self.external:
                continue
            rows.append((i, roles, texts, (prompt_key(row_norms, roles), hash64(row_norms[-1]), question)))
        results: list[Clean | int | None] = [None] * len(objs)
        counter = self.counter
        if counter:
            rows = [r for r in rows if counter.template_problem(r[1]) is None]
            tokens = counter.count_texts([r[2] for r in rows], [r[1] for r in rows])
        else:
            tokens = [None] * len(rows)
        limit = self.options.max_seq_length
        for (i, roles, texts, keys), n in zip(rows, tokens):
            results[i] = (n, keys, messages_line(roles, texts)) if n is None or n <= limit else n
        return results

    def _lengths(self, rows: list[Row]) -> None:
        counter, limit = self.counter, self.options.max_seq_length
        live, roles = [], []
        for row in rows:
            if row.extended:
                self._extended_length(row)
                continue
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

    def _extended_length(self, row: Row) -> None:
        """Tokens of a text row (never too long: training packs documents into blocks) or of a tool-calling
        conversation rendered with its tools, as training renders it; such a row is never cut, only rejected."""
        if row.format == "text":
            row.tokens = self.counter.count_documents([row.messages[0]["content"]])[0]
            return
        try:
            row.tokens = self.counter.count_samples([(row.messages, row.tools)])[0]
        except KftuneError:
            raise
        except Exception as exc:  # the template's raise_exception, a TemplateError
            row.problems.append(("roles.template_error", f"the chat template refuses this row ({exc})"))
            return
        limit = self.options.max_seq_length
        if row.tokens > limit:
            message = f"{row.tokens} tokens under the chat template with its tools, above max_seq_length={limit}"
            if self.options.length_policy == "keep":
                row.notes.append(("length.too_long", f"{message}; kept (training truncates it)"))
            else:
                row.problems.append(("length.too_long", f"{message}; shorten it (a tool-calling row is never cut)"))

    def _keys(self, row: Row) -> None:
        """Rules on the final, normalised text (the response repeating the prompt, overlap with the
        external eval set), then the hashes the duplicate and split rules compare, and the line."""
        messages = row.messages
        norms = [norm(turn_text(m)) for m in messages]
        roles = [m["role"] for m in messages]
        if row.format == "text":  # a document is its own prompt, answer and question
            key = prompt_key(norms * 2, roles * 2)
            row.keys, row.text = (key, hash64(norms[0]), hash64(norms[0])), sample_json(messages)
            return
        if roles[-2] == "user" and norms[-1] == norms[-2]:
            row.problems.append(
                (
                    "content.response_equals_prompt",
                    f"{label(row, -1)} repeats the prompt {label(row, -2)}; write a real answer",
                )
            )
            return
        question = hash64(question_of(messages, norms))
        if self.external is not None and question in self.external:
            row.problems.append(
                (
                    "leakage.external_eval",
                    "the question also appears in the external eval set (--eval-data); drop it from one of them",
                )
            )
            return
        row.keys = prompt_key(norms, roles), hash64(norms[-1]), question
        row.text = sample_json(messages, row.tools)
