"""Exact tokens per conversation under a base model's chat template, fast enough for the data gate.

Rendering the Jinja chat template and running the Rust tokenizer row by row costs about 100 us a
row on these CPUs, more than everything else the gate does together. `TokenCounter.count` gets
the same numbers without either, whenever two facts hold (each checked, not assumed):

1. The template inserts each message's content verbatim, between added tokens such as
   `<|im_start|>user\\n` ... `<|im_end|>` (ChatML). The tokenizer splits text on added tokens
   before anything else, so a conversation's tokens are the template's own text (rendered once
   per sequence of roles, with marker contents) plus, per message, the tokens of the one piece
   of text around its content: `prefix + content + suffix`.
2. The tokenizer is Qwen2's: an NFC normaliser, then its pre-tokenizer regex, in which `\\p{N}`
   matches one digit alone and nothing else can take a digit in. So every ASCII digit is a
   token of its own (checked: each is one token), NFC never joins across one, and a piece's
   tokens are its digits plus the tokens of the chunks between them. The only part of the
   regex that looks ahead, `\\s+(?!\\S)`, sees a digit after a chunk that is followed by one, so
   such a chunk is counted with a "0" appended, less that digit's token.

Chunks repeat far more than rows (prompts share wording, rows differ in numbers), so their
counts are cached; unseen chunks are encoded by the real tokenizer in one batched call. Any
other template or tokenizer, and any row whose text contains an added token, is counted by
rendering the template, as training does. The first `check_rows` rows of every sequence of
roles are counted both ways; one difference switches the fast path off for the rest of the run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.formats import Message

Roles = tuple[str, ...]
_DIGIT_RUNS = re.compile("[0-9]+")
_MARKER = re.compile("\ue000([0-9]+)\ue001")  # private-use characters: no template or tokenizer touches them
_DIGITS = "\ue002"  # stands for a run of digits in a cached piece (private-use too)
CACHE_LIMIT = 200_000  # cached chunks per table (~30 MB at most); the table starts over when full


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"


def _inserts_content_verbatim(template: str) -> bool:
    """True when the template only writes message contents out, joined with `+` or `~` (or tests
    whether one is empty), never filters, compares, slices or calls a method on them, as
    Qwen3's `content.split('</think>')` does."""
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template  # the env apply_chat_template uses

        tree = _compile_jinja_template(template).environment.parse(template)
    except Exception:  # an older transformers, or a template this parse can't read: count the slow way
        return False
    nodes = jinja2.nodes

    def verbatim(node: Any, parents: list[Any]) -> bool:
        if (isinstance(node, nodes.Getattr) and node.attr == "content") or (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        ):
            up = len(parents) - 1
            while up >= 0 and isinstance(parents[up], (nodes.Add, nodes.Concat)):
                up -= 1
            written = up >= 0 and isinstance(parents[up], nodes.Output)
            tested = (
                up == len(parents) - 1 and up >= 0 and isinstance(parents[up], nodes.If) and parents[up].test is node
            )
            return written or tested
        return all(verbatim(child, parents + [node]) for child in node.iter_child_nodes())

    return verbatim(tree, [])


class _Shape:
    """How one sequence of roles renders: per message the text around its content up to the
    nearest added tokens, and the tokens of everything else (the template's own text)."""

    def __init__(self, around: list[tuple[str, str]], overhead: int) -> None:
        self.around, self.overhead = around, overhead


def _qwen2_pipeline(backend: Any) -> str | None:
    """None when the tokenizer splits text the way the digit chunks assume, else why not."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    spec = json.loads(backend.to_str())
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer") or {}
    if normalizer not in (None, {"type": "NFC"}):
        return f"normaliser {normalizer.get('type')}"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split, byte_level = (steps + [{}, {}])[:2] if len(steps) == 2 else ({}, {})
    if not (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": PRETOKENIZE_REGEX}
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex")
        and not byte_level.get("add_prefix_space")
    ):
        return "pre-tokenizer is not Qwen2's"
    if spec.get("model", {}).get("dropout"):
        return "BPE dropout"
    for token in spec.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token['content']!r} strips whitespace"
    if any(len(backend.encode(d, add_special_tokens=False).ids) != 1 for d in "0123456789"):  # not batched:
        # a batch starts the Rust thread pool, and forking workers after that makes tokenizers warn
        return "a digit is not one token"
    return None


class _Chunks:
    """Token counts of the text between ASCII digits, cached; misses are encoded in one batch."""

    def __init__(self, backend: Any, stats: Counter[str]) -> None:
        self._backend, self._stats = backend, stats
        self._inner: dict[str, int] = {}  # a chunk followed by a digit
        self._last: dict[str, int] = {}  # a chunk that ends its piece
        self.pieces: dict[str, int] = {}  # a piece with its digit runs masked -> tokens of its chunks (no digits)
        self._missing: set[tuple[str, bool]] = set()

    def count(self, piece: str) -> int | None:
        """Tokens of `piece`, or None when a chunk isn't cached yet (queued for `fill`)."""
        masked, runs = _DIGIT_RUNS.subn(_DIGITS, piece)  # the piece with each run of digits as one mark
        digits = len(piece) - len(masked) + runs  # one token each
        if _DIGITS in piece:  # the mark would be ambiguous: no cache for this piece
            masked, parts = None, _DIGIT_RUNS.split(piece)
        else:
            known = self.pieces.get(masked)  # rows often differ only in their numbers
            if known is not None:
                return known + digits
            parts = masked.split(_DIGITS)
        last = parts.pop()
        self._stats["chunk_lookups"] += len(parts) + 1
        total = self._last.get(last)
        if total is None:
            self._missing.add((last, True))
        for part in parts:
            n = self._inner.get(part)
            if n is None:
                self._missing.add((part, False))
                total = None
            elif total is not None:
                total += n
        if total is None:
            return None
        if masked is not None:
            if len(self.pieces) >= CACHE_LIMIT:
                self.pieces.clear()
            self.pieces[masked] = total
        return total + digits

    def fill(self) -> None:
        if not self._missing:
            return
        missing = list(self._missing)
        self._missing.clear()
        self._stats["chunk_misses"] += len(missing)
        encoded = self._backend.encode_batch_fast(
            [c if last else c + "0" for c, last in missing], add_special_tokens=False
        )
        for table in (self._inner, self._last):
            if len(table) + len(missing) > CACHE_LIMIT:
                table.clear()
        for (chunk, last), e in zip(missing, encoded):
            if last:
                self._last[chunk] = len(e.ids)
            else:
                self._inner[chunk] = len(e.ids) - 1


def _conversation(texts: list[str], roles: Roles) -> list[Message]:
    return [{"role": r, "content": t} for r, t in zip(roles, texts)]


class TokenCounter:
    """Tokens per conversation exactly as training sees them (see the module docstring for how)."""

    def __init__(self, tokenizer: Any, limit: int, check_rows: int = 16) -> None:
        self.tokenizer, self.limit, self.check_rows = tokenizer, limit, check_rows
        self.stats: Counter[str] = Counter()  # fast_rows, checked_rows, mismatches, chunk_lookups, chunk_misses
        self._refusals: dict[Roles, str | None] = {}
        self._shapes: dict[Roles, _Shape | None] = {}
        self._checks: dict[Roles, int] = {}
        self._renders_tools: bool | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        added = list(getattr(tokenizer, "added_tokens_encoder", {}))
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True))) or "(?!)")
        if backend is None:
            self.slow_reason: str | None = "not a fast tokenizer"
        elif not _inserts_content_verbatim(tokenizer.chat_template):
            self.slow_reason = "the chat template does more with a message's content than write it out"
        else:
            self.slow_reason = _qwen2_pipeline(backend)
        self._chunks = _Chunks(backend, self.stats) if self.slow_reason is None else None

    def exact(self, conversations: list[list[Message]]) -> list[int]:
        """Tokens of each conversation rendered by the chat template (Jinja, row by row)."""
        return [len(ids) for ids in self.tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False)]

    def require_template(self) -> None:
        """Chat rows need the chat template: a base model without one serves text rows only."""
        if not self.tokenizer.chat_template:
            raise KftuneError(
                f"{self.tokenizer.name_or_path}: the tokenizer has no chat template, so chat rows can't be counted "
                'as in training; pass a base model with one, or give {"text"} rows (--format text)'
            )

    def count_documents(self, texts: list[str]) -> list[int]:
        """Tokens of each text row with the EOS that training puts after it (no chat template)."""
        return [len(ids) + 1 for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count_samples(self, samples: list[tuple[list[Message], list[dict] | None]]) -> list[int]:
        """Tokens of each (messages, tools) conversation rendered with its tools, row by row."""
        self.require_template()
        if any(tools for _, tools in samples) and not self.renders_tools():
            raise KftuneError(
                f"{self.tokenizer.name_or_path}: the chat template ignores `tools`, so tool-calling rows would "
                "train without their function schemas; use a base model whose template renders tools (Qwen2.5's does)"
            )
        return [
            len(self.tokenizer.apply_chat_template(m, tools=t or None, tokenize=True, return_dict=False))
            for m, t in samples
        ]

    def renders_tools(self) -> bool:
        """Whether the chat template writes a tool's schema into the prompt (checked once)."""
        if self._renders_tools is None:
            self._renders_tools = template_renders_tools(self.tokenizer)
        return self._renders_tools

    def template_problem(self, roles: Roles) -> str | None:
        """Why the chat template refuses this sequence of roles, or None (cached per sequence)."""
        self.require_template()
        if roles not in self._refusals:
            try:
                self.exact([[{"role": r, "content": ""} for r in roles]])
                self._refusals[roles] = None
            except Exception as exc:  # jinja raises TemplateError or whatever the template's raise_exception says
                self._refusals[roles] = f"{type(exc).__name__}: {exc}"
        return self._refusals[roles]

    def _shape(self, roles: Roles) -> _Shape | None:
        """How `roles` renders, from one rendering with marker contents; None if the contents don't
        each sit alone between added tokens (then rows of this shape are rendered one by one)."""
        if roles in self._shapes:
            return self._shapes[roles]
        problem = self.template_problem(roles)
        if problem:
            raise KftuneError(f"the chat template refuses roles {', '.join(roles)}: {problem}")
        text = self.tokenizer.apply_chat_template(
            [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)], tokenize=False
        )
        parts = _MARKER.split(text)
        literals = parts[::2]  # the template's own text before, between and after the contents
        cuts = [list(self._added.finditer(lit)) for lit in literals]
        shape = None
        if parts[1::2] == [str(i) for i in range(len(roles))] and all(cuts[1:-1]):  # one content per piece
            around = [
                (
                    literals[i][cuts[i][-1].end() :] if cuts[i] else literals[i],
                    literals[i + 1][: cuts[i + 1][0].start()] if cuts[i + 1] else literals[i + 1],
                )
                for i in range(len(roles))
            ]
            for i, (prefix, suffix) in enumerate(around):
                text = text.replace(prefix + _marker(i) + suffix, "", 1)
            shape = _Shape(around, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        self._shapes[roles] = shape
        return shape

    def count(self, conversations: list[list[Message]], roles: list[Roles] | None = None) -> list[int]:
        """Tokens of each conversation as training will see them; `roles` saves recomputing them."""
        roles = roles or [tuple(m["role"] for m in c) for c in conversations]
        return self.count_texts([[m["content"] for m in c] for c in conversations], roles)

    def count_texts(self, texts: list[list[str]], roles: list[Roles]) -> list[int]:
        """`count` for conversations given as their contents and roles (what the gate's fast lane has)."""
        counts: list[int | None] = [None] * len(texts)
        if self._chunks is not None:
            pending = self._fast_counts(texts, roles, counts)
            if pending:
                self._chunks.fill()
                self._fast_counts([texts[i] for i in pending], [roles[i] for i in pending], counts, pending)
            self._check(texts, roles, counts)
        slow = [i for i, n in enumerate(counts) if n is None]
        for i, n in zip(slow, self.exact([_conversation(texts[i], roles[i]) for i in slow]) if slow else []):
            counts[i] = n
        self.stats["fast_rows"] += len(counts) - len(slow)
        return counts  # type: ignore[return-value]

    def _fast_counts(
        self, texts: list[list[str]], roles: list[Roles], counts: list[int | None], where: list[int] | None = None
    ) -> list[int]:
        """Fill counts[...] for rows the fast path can count; returns the rows waiting on chunks."""
        pending, chunks, added, shapes = [], self._chunks, self._added.search, self._shapes
        for k, (contents, row_roles) in enumerate(zip(texts, roles)):
            i = where[k] if where else k
            shape = shapes[row_roles] if row_roles in shapes else self._shape(row_roles)
            if shape is None:
                continue
            total, waiting = shape.overhead, False
            for (prefix, suffix), content in zip(shape.around, contents):
                if not content or added(content):  # a template may test emptiness; an added token splits
                    break
                n = chunks.count(prefix + content + suffix)  # every piece, so all missing chunks get queued
                waiting = waiting or n is None
                total += n or 0
            else:
                if waiting:
                    pending.append(i)
                else:
                    counts[i] = total
        return pending

    def _check(self, texts: list[list[str]], roles: list[Roles], counts: list[int | None]) -> None:
        """Count the first rows of each role sequence with the template too; a difference ends the fast path."""
        picked = []
        for i, (r, n) in enumerate(zip(roles, counts)):
            if n is not None and self._checks.get(r, 0) < self.check_rows:
                self._checks[r] = self._checks.get(r, 0) + 1
                picked.append(i)
        if not picked:
            return
        exact = self.exact([_conversation(texts[i], roles[i]) for i in picked])
        self.stats["checked_rows"] += len(picked)
        wrong = [i for i, n in zip(picked, exact) if counts[i] != n]
        if wrong:
            self.stats["mismatches"] += len(wrong)
            self.slow_reason = f"a fast count differed from the chat template's at {len(wrong)} checked row(s)"
            self._chunks = None
            counts[:] = [None] * len(counts)

    def truncate(self, conversation: list[Message]) -> tuple[list[Message], int] | None:
        """The conversation with its final answer cut to fit the limit, or None when the prompt alone doesn't."""
        total = self.exact([conversation])[0]
        ids = self.tokenizer.encode(conversation[-1]["content"], add_special_tokens=False)
        keep = len(ids) - (total - self.limit)
        while keep > 0:
            text = self.tokenizer.decode(ids[:keep]).rstrip("\ufffd")  # a cut inside a character
            if not text.strip():
                return None
            cut = conversation[:-1] + [{"role": "assistant", "content": text}]
            n = self.exact([cut])[0]
            if n <= self.limit:
                return cut, n
            keep -= n - self.limit
        return None

    def absorb(self, worker_stats: list[dict[str, Any]]) -> None:
        """Take over the stats of counters that worked in other processes (copies of this one)."""
        for stats in worker_stats:
            self.slow_reason = stats.pop("slow_reason") or self.slow_reason
            self.stats.update(stats)

    def describe(self) -> dict[str, Any]:
        fast = self.slow_reason is None
        return {
            "method": "chat template pieces + cached digit-free chunks (exact)"
            if fast
            else f"chat template per row ({self.slow_reason})",
            **{k: self.stats[k] for k in ("fast_rows", "checked_rows", "mismatches", "chunk_lookups", "chunk_misses")},
        }


def load_counter(location: str, limit: int) -> TokenCounter:
    """A TokenCounter for a base model or tokenizer folder, hub id or s3:// URI."""
    from kftune.models.loading import load_tokenizer, resolve_model_location  # heavy: imports torch; loaded when used

    folder = Path(location).expanduser()
    if location.startswith("s3://") or not folder.is_dir():  # an artifact, a hub id, or a path that isn't there
        folder = resolve_model_location(location, flag="--base_model/--tokenizer")
    tokenizer = load_tokenizer(str(folder))  # a tokenizer folder needs no config.json
    return TokenCounter(tokenizer, limit)  # without a chat template it counts text rows only


PROBE_TOOL = {
    "type": "function",
    "function": {"name": "kftune_probe_function", "description": "", "parameters": {"type": "object"}},
}


def template_renders_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template writes the schemas given as `tools` into the prompt."""
    if not tokenizer.chat_template:
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[PROBE_TOOL], tokenize=False)
    except Exception:  # a template that refuses tools altogether
        return False
    return "kftune_probe_function" in text
