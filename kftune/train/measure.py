"""Peak memory of a training run, measured where it lives: the GPU's allocator or this process's RSS.

A sweep compares methods by what they need, so the number must be the run's own peak, not the
process's since start-up: the CUDA allocator's peak counter and Linux's RSS high-water mark
(VmHWM, reset by writing 5 to /proc/self/clear_refs) are both reset when the run begins.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    source: str  # cuda_max_allocated | rss_high_water_mark | rss_max_since_start (no reset possible)


def reset_peak_memory(device: str) -> None:
    """Start counting the peak from now (best effort on CPU: without /proc it stays the process's peak)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory(device: str) -> PeakMemory:
    """The peak since `reset_peak_memory`: bytes the CUDA allocator held, or the process's peak RSS on CPU."""
    if device == "cuda":
        import torch

        return PeakMemory(int(torch.cuda.max_memory_allocated()), "cuda_max_allocated")
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return PeakMemory(int(line.split()[1]) * 1024, "rss_high_water_mark")
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit, "rss_max_since_start")
