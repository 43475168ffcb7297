"""Role rules for conversations with tools: calls, results and the turns around them.

A tool-calling conversation does not alternate user/assistant: an assistant turn may call
functions, `tool` results answer those calls, and the assistant speaks again. Each problem gets
its own rule, so a data set's report says how many rows call an undeclared function, how many
results follow no call, and so on.
"""

from __future__ import annotations

from collections.abc import Callable

from kftune.data.formats import TOOL_ROLES, Message
from kftune.data.rules import Row

_FOLLOWS = {"user": (None, "assistant"), "assistant": ("user", "tool")}  # role -> the roles it may follow


def tool_role_problems(row: Row, label: Callable[[Row, int], str]) -> None:
    """Every role problem of a conversation with tools (row.messages, row.tools), named by rule."""
    messages: list[Message] = row.messages
    declared = {t["function"]["name"] for t in row.tools or []}
    previous, pending = None, 0  # the last non-system role, and calls not yet answered
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in TOOL_ROLES:
            row.problems.append(
                ("roles.unknown_role", f"{label(row, i)}.role is {role!r}; expected one of {', '.join(TOOL_ROLES)}")
            )
            continue
        if role == "system":
            if i:
                row.problems.append(
                    ("roles.system_not_first", f"{label(row, i)} is a system message; only the first message may be")
                )
            continue
        if role == "tool":
            if pending:
                pending -= 1
            else:
                row.problems.append(
                    (
                        "tools.result_without_call",
                        f"{label(row, i)} is a tool result that follows no tool call; put the assistant's call first",
                    )
                )
        elif previous not in _FOLLOWS[role]:
            row.problems.append(
                (
                    "roles.not_alternating",
                    f"{label(row, i)} is {role!r} after {previous or 'nothing'!r}; a conversation goes user, "
                    "assistant (calls), tool results, assistant, user, ...",
                )
            )
        calls = m.get("tool_calls") or []
        for call in calls:
            name = call["function"]["name"]
            if name not in declared:
                known = ", ".join(sorted(declared)) or "none"
                row.problems.append(
                    (
                        "tools.undeclared_function",
                        f"{label(row, i)} calls {name!r}, which the row's tools do not declare (declared: {known})",
                    )
                )
        if role == "assistant":
            pending = len(calls)
        elif role == "user":
            pending = 0
        previous = role
        if not m["content"].strip() and not calls:
            row.problems.append(("roles.empty_content", f"{label(row, i)} ({role}) is empty or whitespace only"))
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        row.problems.append(("roles.no_assistant", "no assistant turn; add the answer the model should learn"))
    elif roles[-1] != "assistant":
        row.problems.append(
            (
                "roles.not_ending_with_assistant",
                f"the last turn ({label(row, len(roles) - 1)}) is {roles[-1]!r}; an SFT conversation ends with "
                "the assistant",
            )
        )
