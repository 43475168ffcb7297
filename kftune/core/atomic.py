"""Output folders that are complete or absent: build beside the target, then rename into place."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_dir(out: Path) -> Path:
    """Where a folder is built; a killed process leaves this, never a half-written `out`."""
    return out.parent / f".{out.name}.partial"


def publish(staging: Path, out: Path) -> None:
    """Move a finished folder into place, replacing an old one only once the new one is complete."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; publish it as `out` on success, delete it on any failure."""
    out = Path(out)
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
