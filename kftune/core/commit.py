"""Which commit of the code made an artifact: tagged on registered models and keyed into submitted runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def head_commit(folder: Path | None = None) -> str:
    """HEAD of the git checkout kftune runs from, else $GITHUB_SHA, else "" (a pipeline pod has no .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder or Path.cwd(), capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("GITHUB_SHA", "")
