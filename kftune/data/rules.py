"""Every rule of the data gate by its stable name, the options that set how strict the gate is,
and the row the rules annotate on its way through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kftune.core.errors import ConfigError
from kftune.data.formats import FORMATS, Message
from kftune.train.config import FIELDS as TRAIN_FIELDS

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
    "content.empty_text": "a text row whose text is empty or whitespace only",
    "tools.arguments_not_json": "a tool call's arguments (or a function_call value) are not a JSON object",
    "tools.undeclared_function": "a tool call names a function the row's tools do not declare",
    "tools.bad_schema": "a tool schema without a function name or a parameters object",
    "tools.result_without_call": "a tool result (tool message, observation) that follows no tool call",
}
WARNING_RULES = {"parse.bom", "parse.blank_line", "schema.unknown_field", "duplicate.conflicting_answer"}
LENGTH_POLICIES = ("reject", "truncate", "keep")
PII_POLICIES = ("flag", "reject", "redact")
POLICY_KINDS = {"length": LENGTH_POLICIES, "pii": PII_POLICIES}
DEFAULT_MAX_SEQ_LENGTH: int = TRAIN_FIELDS["max_seq_length"].default
Issue = tuple[str, str]  # (rule, message)


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
    data_format: str = "auto"  # auto (the first row's) or one of FORMATS: every row must be in it

    def __post_init__(self) -> None:
        problems = []
        if self.max_seq_length < 1:
            problems.append(f"--max_seq_length must be at least 1, got {self.max_seq_length}")
        for name, kind in (("length_policy", "length"), ("pii_policy", "pii")):
            if getattr(self, name) not in POLICY_KINDS[kind]:
                problems.append(
                    f"--policy {kind}={getattr(self, name)}: expected one of {', '.join(POLICY_KINDS[kind])}"
                )
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
        if self.data_format not in ("auto", *FORMATS):
            problems.append(f"--format {self.data_format}: expected auto or one of {', '.join(FORMATS)}")
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


@dataclass(slots=True)
class Row:
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
    format: str | None = None  # the row's format (formats.detect), once its schema is read
    tools: list[dict] | None = None  # the functions a tool-calling row declares
    extended: bool = False  # tools, tool calls or a text row: rules beyond alpaca/messages apply


@dataclass(frozen=True, slots=True)
class Note:
    """A warning about a line that is not a row (a blank line, a byte-order mark)."""

    line: int
    rule: str
    message: str
