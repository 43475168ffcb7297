"""One exception type for user-facing problems, so the CLI can print them without a traceback."""

from __future__ import annotations


class KftuneError(Exception):
    """A problem the user can fix: the message says what, where and what to do."""


class ConfigError(KftuneError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")
