"""Reading tool calls back out of generated text, as Qwen2.5's chat template (and the tiny model's) writes
them: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.

Standard library only: the registered MLflow Model ships this file beside its serving loader
(registry/chat_serving.py), so a serving environment without kftune reads calls the same way
evaluation scores them.
"""

from __future__ import annotations

import json
import re
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls in a generated answer as {"name", "arguments"} objects; None when a call block does not
    parse (or names no function); [] when the answer calls nothing."""
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


def content_without_calls(text: str) -> str:
    """The answer's text with its call blocks taken out (what a chat response's `content` carries)."""
    return _CALL.sub("", text).strip()
