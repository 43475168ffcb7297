"""The accepted row formats, defined once, and the one internal shape every one of them becomes.

Formats (detected per row; one per file): alpaca, messages (OpenAI's shape, with `tools`,
`tool_calls` and `tool` messages), sharegpt (`conversations` of `{from, value}`, LLaMA-Factory's
function_call/observation and `tools` column), prompt_completion (TRL's standard form, strings or
message lists) and text (`{"text": ...}` for continued pretraining).

The internal shape is a sample: `{"messages": [...], "tools": [...]}` (tools only when the row has
them) or `{"text": ...}`. A message is `{"role", "content"}`; an assistant message that calls tools
adds `tool_calls: [{"type": "function", "function": {"name", "arguments": {...}}}]` (arguments as
an object, as chat templates render them); a tool result is `{"role": "tool", "content"}`. The gate
(row_rules.py, checker.py), training and evaluation (reading.py), serving and the tiny model's
tokenizer all read rows through here; the accepted line the gate writes is the sample as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]
Sample = dict[str, Any]
Issue = tuple[str, str]  # (rule, message)
Rows = Sequence[list[Message]] | Sequence[Sample]  # conversations, or samples of any format
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
CHAT_FAMILY = frozenset(("alpaca", "messages"))  # kftune always took these two side by side in one file
ALPACA_FIELDS = frozenset(("instruction", "input", "output", "system", "history"))  # alpaca form: these keys
MESSAGE_FIELDS = frozenset(("role", "content"))  # messages form: {"messages": [{role, content}, ...]}
PLAIN_ROLES = ("user", "assistant")  # the two shapes of a single-turn conversation
SYSTEM_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant"}
SHAREGPT_ROLES |= {"observation": "tool", "user": "user", "assistant": "assistant", "tool": "tool"}

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


def sample_json(messages: list[Message], tools: list[dict] | None = None) -> str:
    """The accepted line of a sample: `messages_json` for a plain conversation, else the sample as JSON."""
    if messages and messages[0]["role"] == "text":
        return to_json({"text": messages[0]["content"]})
    if tools or any(len(m) != 2 for m in messages):
        return to_json({"messages": messages, **({"tools": tools} if tools else {})})
    return messages_json(messages)


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


def detect(obj: Any) -> str | None:
    """The format of one parsed row by its keys, or None when it is in none of them."""
    if not isinstance(obj, dict):
        return None
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj:
        first = obj["messages"][0] if isinstance(obj["messages"], list) and obj["messages"] else None
        return "sharegpt" if isinstance(first, dict) and "from" in first and "role" not in first else "messages"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def is_extended(obj: dict) -> bool:
    """True for a row that needs more than the alpaca/messages rules: any other format, or tools."""
    fmt = detect(obj)
    if fmt not in CHAT_FAMILY:
        return fmt is not None
    return fmt == "messages" and (
        "tools" in obj
        or any(isinstance(m, dict) and ("tool_calls" in m or m.get("role") == "tool") for m in obj["messages"])
    )


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_arguments(value: Any, where: str, issues: list[Issue]) -> dict | None:
    """A tool call's arguments as an object: a JSON object as text, or an object already."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            issues.append(("tools.arguments_not_json", f"{where} is not JSON ({exc.msg}); write a JSON object"))
            return None
    if not isinstance(value, dict):
        issues.append(("tools.arguments_not_json", f"{where} is a JSON {_type(value)}; expected a JSON object"))
        return None
    return value


def tool_call(name: Any, arguments: Any, where: str, issues: list[Issue]) -> dict | None:
    """One call in the internal shape; the issue when its name or arguments are wrong."""
    if not isinstance(name, str) or not name.strip():
        issues.append(("schema.missing_field", f"{where} has no function name"))
        return None
    args = parse_arguments(arguments, f"{where}.arguments", issues)
    return None if args is None else {"type": "function", "function": {"name": name, "arguments": args}}


def tools_list(value: Any, where: str, issues: list[Issue]) -> list[dict] | None:
    """A row's tools (a list, or a JSON string of one, as LLaMA-Factory ships them) as OpenAI function tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            issues.append(("schema.wrong_type", f"{where} is not JSON ({exc.msg}); give a list of function schemas"))
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        issues.append(("schema.wrong_type", f"{where} is a {_type(value)}; expected a list of function schemas"))
        return None
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            issues.append(("tools.bad_schema", f"{where}[{i}] has no function name; give name and parameters"))
        elif not isinstance(function.get("parameters"), dict):
            issues.append(("tools.bad_schema", f"{where}[{i}] ({function['name']}) has no parameters object; add one"))
        else:
            tools.append({"type": "function", "function": function})
    return tools


def _sharegpt(obj: dict, issues: list[Issue]) -> Sample | None:
    key = "conversations" if "conversations" in obj else "messages"
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        issues.append(("schema.wrong_type", f"{key!r} is {_type(turns)}; expected a non-empty list of {{from, value}}"))
        return None
    messages: list[Message] = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            issues.append(("schema.wrong_type", f"{where} is not a {{from, value}} object with a string value"))
            continue
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            issues.append(
                (
                    "roles.unknown_role",
                    f"{where}.from is {turn.get('from')!r}; expected one of {', '.join(SHAREGPT_ROLES)}",
                )
            )
            continue
        if turn["from"] != "function_call":
            messages.append({"role": role, "content": turn["value"]})
            continue
        try:
            value = json.loads(turn["value"])
        except json.JSONDecodeError as exc:
            issues.append(
                ("tools.arguments_not_json", f"{where}.value is not JSON ({exc.msg}); write the call as JSON")
            )
            continue
        calls = [
            tool_call(c.get("name"), c.get("arguments"), where, issues) if isinstance(c, dict) else None
            for c in (value if isinstance(value, list) else [value])
        ]
        if all(calls):
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif not issues:
            issues.append(("schema.wrong_type", f"{where}.value is not a {{name, arguments}} object"))
    return _chat_sample(messages, obj.get("tools"), issues)


def _openai_message(m: Any, where: str, issues: list[Issue]) -> Message | None:
    if not isinstance(m, dict):
        issues.append(("schema.wrong_type", f"{where} is {_type(m)}; expected an object with 'role' and 'content'"))
        return None
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if not isinstance(role, str):
        issues.append(
            ("schema.missing_field" if role is None else "schema.wrong_type", f"{where} has no string 'role'")
        )
        return None
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        issues.append(("schema.wrong_type", f"{where}.content is {_type(content)}; expected a string"))
        return None
    message: Message = {"role": role, "content": content}
    if calls:
        if not isinstance(calls, list):
            issues.append(("schema.wrong_type", f"{where}.tool_calls is {_type(calls)}; expected a list"))
            return None
        parsed = []
        for j, c in enumerate(calls):
            function = c.get("function", c) if isinstance(c, dict) else {}
            parsed.append(
                tool_call(function.get("name"), function.get("arguments"), f"{where}.tool_calls[{j}]", issues)
            )
        if not all(parsed):
            return None
        message["tool_calls"] = parsed
    return message


def _chat_sample(messages: list[Message], tools: Any, issues: list[Issue]) -> Sample | None:
    declared = tools_list(tools, "'tools'", issues)
    if issues:
        return None
    return {"messages": messages, **({"tools": declared} if declared else {})}


def _message_list(value: Any, key: str, issues: list[Issue]) -> list[Message] | None:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        issues.append(("schema.wrong_type", f"{key!r} is {_type(value)}; expected a string or a list of messages"))
        return None
    messages = [_openai_message(m, f"{key}[{i}]", issues) for i, m in enumerate(value)]
    return None if issues else messages


def read_extended(obj: dict, fmt: str) -> tuple[Sample | None, list[Issue]]:
    """(sample, []) for a row in an extended format (see `is_extended`), or (None, the schema issues)."""
    issues: list[Issue] = []
    sample: Sample | None = None
    if fmt == "sharegpt":
        sample = _sharegpt(obj, issues)
    elif fmt == "text":
        if not isinstance(obj["text"], str):
            issues.append(("schema.wrong_type", f"'text' is {_type(obj['text'])}; expected a string"))
        else:
            sample = {"text": obj["text"]}
    elif fmt == "prompt_completion":
        prompt = _message_list(obj["prompt"], "prompt", issues)
        completion = _message_list(obj["completion"], "completion", issues) if not issues else None
        if not issues:
            sample = _chat_sample(prompt + completion, obj.get("tools"), issues)
    else:  # messages with tools
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            issues.append(("schema.wrong_type", f"'messages' is {_type(turns)}; expected a non-empty list"))
        else:
            messages = [_openai_message(m, f"messages[{i}]", issues) for i, m in enumerate(turns)]
            if not issues:
                sample = _chat_sample(messages, obj.get("tools"), issues)
    return sample, issues


def split_sample(sample: Sample | list[Message]) -> tuple[list[Message], list[dict] | None]:
    """(messages, tools) of a chat sample; a bare message list is a sample without tools."""
    if isinstance(sample, list):
        return sample, None
    return sample["messages"], sample.get("tools")


def to_messages(row: dict[str, Any]) -> list[Message]:
    """The chat messages of a row in any chat form (checked already: see row_rules.schema)."""
    fmt = detect(row)
    if fmt not in CHAT_FAMILY or is_extended(row):
        sample, issues = read_extended(row, fmt or "messages")
        if sample is None or "text" in sample:
            raise ValueError(issues[0][1] if issues else "a text row has no chat messages")
        return sample["messages"]
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return alpaca_to_messages(row)


def turn_text(message: Message) -> str:
    """What a turn says, for duplicate keys and content rules: its content, then its calls as JSON."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    return message["content"] + "".join("\n" + to_json(c["function"]) for c in calls)
