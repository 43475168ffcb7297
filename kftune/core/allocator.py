"""tcmalloc for training processes, where it is installed: less peak memory and more tokens/s than glibc's malloc.

A training step's tensors change size with its token count, and glibc's malloc leaves its heap fragmented by
them; tcmalloc does not (measured on the 0.5B shape: bench/README.md). An allocator is chosen when a process
starts, so `kftune train` (and `fine_tune_qwen.py`) re-executes itself once with LD_PRELOAD naming the library
when it is installed (Debian/Ubuntu: `apt install libtcmalloc-minimal4`) and the `tcmalloc` lever is on
(`KFTUNE_LEVERS_OFF=tcmalloc` keeps glibc's). Without the library nothing changes.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from kftune.core.levers import lever_on

MARK = "KFTUNE_ALLOCATOR"  # set before the re-exec, so it happens once


def tcmalloc() -> str | None:
    """The installed tcmalloc library's name (the loader finds it by name), or None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def prefer_tcmalloc() -> None:
    """Re-execute this process with tcmalloc preloaded, once, when the library is there and the lever is on."""
    if os.environ.get(MARK) or not lever_on("tcmalloc") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    library = tcmalloc()
    os.environ[MARK] = library or "none"
    if library:
        os.environ["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def in_use() -> str:
    """ "tcmalloc" when this process has it mapped, else "glibc" (what train_metrics.json records)."""
    try:
        return "tcmalloc" if "libtcmalloc" in Path("/proc/self/maps").read_text() else "glibc"
    except OSError:
        return "unknown"
