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


def one_line(exc: KftuneError) -> str:
    """The error on one line: a ConfigError's list of problems joined by '; '."""
    first, *rest = str(exc).splitlines()
    problems = "; ".join(line.strip().removeprefix("- ") for line in rest if line.strip())
    return f"{first} {problems}" if problems else first
