"""bench/peers.py's rows and table: each tool and method run several times, medians and ranges, the targets' ratios.

Peak memory is taken two ways, and every ratio is computed on both: peak RSS (the kernel's VmHWM through
`wait4`, what `/usr/bin/time -v` prints), which also counts clean file-backed pages such as a mapped
checkpoint's, and peak anonymous memory (RssAnon of the process tree sampled every 20 ms: the heap and
the tensors, what the process cannot give back to the page cache; a spike shorter than the interval
can be missed). On CUDA the allocator's own peaks are reported as well.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from pathlib import Path

METHODS = ("lora", "qlora4")
TARGET_MEMORY, TARGET_SPEED = 0.70, 1.5  # kftune's peak <= 0.70x the lower peer's; tokens/s >= 1.5x the faster's
MEASURES = {"peak_rss_bytes": "peak RSS", "peak_anon_bytes": "peak anon", "cuda_peak_bytes": "cuda allocated"}


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in task.read_text().split()]
        except OSError:
            pass
    return kids


def rss_anon(pid: int) -> int:
    """RssAnon of `pid` and every process under it, in bytes (0 for one that has gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(current)
    return total


class AnonPeak(threading.Thread):
    """Samples `rss_anon(pid)` until stopped; `peak` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon(self.pid))
            time.sleep(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(tool: str, method: str, runs: list[dict]) -> dict:
    """One table row from a tool's runs of one method: medians and ranges; every run kept under `runs`."""
    good = [r for r in runs if "error" not in r]
    row = {"tool": tool, "method": method, "runs": runs}
    if not good:
        return row | {"error": runs[-1]["error"] if runs else "not run yet"}
    first = good[0]
    for key in ("peak_rss_bytes", "peak_anon_bytes", "cuda_peak_bytes", "cuda_reserved_peak_bytes", "mfu"):
        if all(key in r for r in good):
            row[key] = spread([r[key] for r in good])
    row["real_tokens_per_s"] = spread([r["real_tokens_per_s"] for r in good])
    keep = ("losses", "final_loss", "gradient_checkpointing", "trainable_params", "levers_on", "attn_implementation")
    return row | {k: first.get(k) for k in keep} | {"failed_runs": len(runs) - len(good)}


def ratios(rows: list[dict]) -> list[str]:
    """kftune against the better peer per method, on medians, on every memory measure the rows have."""
    lines = []
    for method in METHODS:
        mine = next((r for r in rows if r["tool"] == "kftune" and r["method"] == method and "error" not in r), None)
        peers = [r for r in rows if r["tool"] != "kftune" and r["method"] == method and "error" not in r]
        if not mine or not peers:
            continue
        for key, label in MEASURES.items():
            if key not in mine or not all(key in p for p in peers):
                continue
            low = min(peers, key=lambda r: r[key]["median"])
            ratio = mine[key]["median"] / low[key]["median"]
            met = "met" if ratio <= TARGET_MEMORY else "NOT met"
            lines.append(f"{method}: {label} {ratio:.2f}x {low['tool']}'s (target <= {TARGET_MEMORY}: {met})")
        fast = max(peers, key=lambda r: r["real_tokens_per_s"]["median"])
        speed = mine["real_tokens_per_s"]["median"] / fast["real_tokens_per_s"]["median"]
        met = "met" if speed >= TARGET_SPEED else "NOT met"
        lines.append(f"{method}: real tokens/s {speed:.2f}x {fast['tool']}'s (target >= {TARGET_SPEED}: {met})")
    return lines


def machine(cuda: bool) -> dict:
    import torch

    from kftune.models.loading import cpu_supports_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "bf16": cpu_supports_bf16(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _cell(value: dict | None, scale: float, fmt: str) -> str:
    if not value:
        return "-"
    return f"{value['median'] * scale:{fmt}} ({value['min'] * scale:{fmt}}-{value['max'] * scale:{fmt}})"


def render(report: dict) -> str:
    m = report["machine"]
    gib = 1 / 2**30
    cuda = m["gpu"] is not None
    lines = [
        f"shape {report['shape']} {report['shape_config']}; {report['data']}, batch {report['batch']}, cutoff "
        f"{report['cutoff']}, LoRA r={report['lora']['r']} alpha 16 dropout 0.1 on every linear layer, lr {report['lr']}, "
        f"{report['steps']} steps, seed {report['seed']}, {report['precision']}, {report['runs_per_row']} runs a row "
        "(median (min-max))",
        f"machine: {m['gpu'] or m['cpu']}, {m['cores']} cores, bf16 {'native' if m['bf16'] else 'not native'}, "
        f"{m['ram_gib']} GiB; load average {' '.join(f'{x:.1f}' for x in report['load_average'])} (1-min range over the "
        f"runs {report['load_average_1min_range'][0]:.1f}-{report['load_average_1min_range'][1]:.1f}); {report['date']}",
        f"commit {report['commit']}{' (dirty tree)' if report['dirty'] else ''}: {report['command']}",
        f"{'tool':13s} {'method':7s} {'peak RSS GiB':>18s} {'peak anon GiB':>18s} {'real tok/s':>22s} "
        + (f"{'cuda alloc GiB':>18s} {'reserved GiB':>18s} {'MFU':>6s} " if cuda else "")
        + f"{'ckpt':>4s} {'attention':>18s} {'final loss':>10s}",
    ]
    for r in report["rows"]:
        if "error" in r:
            status = "not run:" if r["error"].startswith("dry run") else "FAILED:"
            lines.append(f"{r['tool']:13s} {r['method']:7s} {status} {(r['error'] or '').splitlines()[-1]}")
            continue
        gpu_cells = ""
        if cuda:
            mfu = f"{r['mfu']['median']:.1%}" if r.get("mfu") else "-"
            gpu_cells = (
                f"{_cell(r.get('cuda_peak_bytes'), gib, '.2f'):>18s} "
                f"{_cell(r.get('cuda_reserved_peak_bytes'), gib, '.2f'):>18s} {mfu:>6s} "
            )
        lines.append(
            f"{r['tool']:13s} {r['method']:7s} {_cell(r.get('peak_rss_bytes'), gib, '.2f'):>18s} "
            f"{_cell(r.get('peak_anon_bytes'), gib, '.2f'):>18s} {_cell(r['real_tokens_per_s'], 1, '.1f'):>22s} "
            f"{gpu_cells}{'yes' if r['gradient_checkpointing'] else 'no':>4s} {str(r['attn_implementation']):>18s} "
            f"{r['final_loss']:10.4f}"
        )
    lines.append("loss per step (same seed, same row order; the first run of each row):")
    for r in report["rows"]:
        if "error" not in r:
            lines.append(f"  {r['tool']:13s} {r['method']:7s} " + " ".join(f"{x:.4f}" for x in r["losses"]))
    lines += [f"levers on in kftune's runs: {', '.join(report['kftune_levers_on'] or ['none'])}", *report["ratios"]]
    lines += [f"skipped {name}: {why}" for name, why in report.get("skipped", {}).items()]
    return "\n".join(lines)
