"""The guide's memory table, measured: peak memory of each training method on a Qwen2.5-0.5B-shaped model.

A random model with Qwen2.5-0.5B's exact configuration (494M parameters, hidden 896, 24 layers,
14 heads, 2 KV heads, MLP 4864, 151,936 embedding rows, tied; built here, no hub) is trained for a
few steps by kftune's own path (`kftune.train.run`) with each method in a fresh process: full
(fp32, and bf16 autocast over fp32 master weights), LoRA r=64, QLoRA-4 r=64 and QLoRA-8 r=64 on
every linear layer. Peak is the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on
GPU. Prints measured peak, the guide's figure and kftune's pre-flight estimate, trainable
parameters, seconds per step and tokens per second; writes JSON and a PNG bar chart.

    python bench/memory_table.py [--batch 4] [--seq 256] [--steps 2] [--methods full,lora,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import QWEN2_5_0_5B, Spec, build_model, measure, write_rows

GiB = 2**30
# the user's guide's figures for Qwen2.5-0.5B, GB
GUIDE = {"full-fp32": 8, "full-bf16": 8, "lora": 6, "lora-ckpt": 6, "qlora4": 3, "qlora4-ckpt": 3, "qlora8": 4}
METHODS = {  # label -> (method, bits, precision, checkpointing)
    "full-fp32": ("full", 4, "fp32", False),
    "full-bf16": ("full", 4, "bf16", False),
    "lora": ("lora", 4, None, False),
    "lora-ckpt": ("lora", 4, None, True),
    "qlora4": ("qlora", 4, None, False),
    "qlora4-ckpt": ("qlora", 4, None, True),  # the QLoRA recipe's default (peft's prepare_model_for_kbit_training)
    "qlora8": ("qlora", 8, None, False),
}
QUICK_SHAPE = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 768,
    "embedding_rows": 8192,
}


def default_precision(cuda: bool) -> str:
    """bf16 on GPUs (the guide's setting); on CPUs kftune's own choice (fp32 without native bf16)."""
    return "bf16" if cuda else "auto"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)"
    import psutil

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM, load {os.getloadavg()[0]:.1f}"
    )


def add_estimates(rows: list[dict], shape: dict[str, int]) -> None:
    """kftune's pre-flight estimate for each measured row: a pure function of the shape and the settings."""
    from kftune.train.preflight import ModelShape, estimate

    model = ModelShape(
        hidden=shape["hidden_size"],
        layers=shape["num_layers"],
        heads=shape["num_heads"],
        kv_heads=shape["num_kv_heads"],
        intermediate=shape["intermediate_size"],
        vocab=shape["embedding_rows"],
    )
    for row in rows:
        if "error" in row:
            continue
        result = estimate(
            model,
            method=row["method"],
            batch=row["batch"],
            seq=row["seq"],
            precision=row["precision_used"],
            bits=row["bits"] if row["method"] == "qlora" else None,
            lora_r=row["lora_r"],
            checkpointing=row.get("checkpointing_used", row["checkpointing"]),
            device=row["device"],
        )
        row["estimate_bytes"], row["estimate"] = result.total, result.parts


def render(rows: list[dict], quick: bool) -> str:
    guide = "guide GB" if not quick else "guide (0.5B)"
    lines = [
        f"{'method':10s} {'peak GiB':>9s} {guide:>12s} {'estimate':>9s} {'est/peak':>8s} "
        f"{'trainable':>12s} {'share':>7s} {'s/step':>8s} {'tokens/s':>9s}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:10s} failed: {r['error'].splitlines()[0][:90]}")
            continue
        lines.append(
            f"{r['label']:10s} {r['peak_bytes'] / GiB:9.2f} {GUIDE[r['label']]:>12} {r['estimate_bytes'] / GiB:9.2f} "
            f"{r['estimate_bytes'] / r['peak_bytes']:8.2f} {r['trainable_params']:12,d} {r['trainable_share']:7.2%} "
            f"{r['seconds_per_step']:8.2f} {r['tokens_per_second']:9.1f}"
        )
    return "\n".join(lines)


def guide_ratios(rows: list[dict]) -> list[str]:
    """Each method's peak against full fp32 fine-tuning's, beside the guide's ratio (QLoRA-4 3/8, LoRA 6/8)."""
    full = next((r for r in rows if r["label"] == "full-fp32" and "error" not in r), None)
    if full is None:
        return []
    lines = []
    for r in rows:
        if r["label"].startswith("full") or "error" in r:
            continue
        ratio, target = r["peak_bytes"] / full["peak_bytes"], GUIDE[r["label"]] / GUIDE["full-fp32"]
        verdict = "met" if ratio <= target else "NOT met"
        lines.append(
            f"{r['label']}: peak {ratio:.2f}x full-fp32's (guide {GUIDE[r['label']]}/8 = {target:.3f}: {verdict})"
        )
    return lines


def chart(rows: list[dict], path: Path, title: str, guide: bool) -> Path:
    """Measured vs estimated bars, and the guide's figures beside them for the 0.5B shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = [r["label"] for r in ok]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    ax.bar([i - width for i in x], [r["peak_bytes"] / GiB for r in ok], width, label="measured peak")
    ax.bar(list(x), [r["estimate_bytes"] / GiB for r in ok], width, label="kftune pre-flight estimate")
    if guide:
        ax.bar([i + width for i in x], [GUIDE[r["label"]] for r in ok], width, label="guide (GB)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GiB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="steps per method; the first is not timed (default 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument(
        "--precision", help="compute precision for LoRA/QLoRA (default: bf16 on GPU, kftune's auto on CPU)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small model (hidden 256, 4 layers), batch 2 x 64: a smoke run"
    )
    parser.add_argument("--model", type=Path, help="reuse a model folder built by an earlier run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON and PNG")
    parser.add_argument("--from-json", type=Path, help="print a saved run again (estimates from today's kftune)")
    args = parser.parse_args(argv)
    if args.from_json:  # print a saved run again, with the estimates of the kftune checked out now
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        add_estimates(report["rows"], report["shape"])
        quick = report["shape"] == QUICK_SHAPE
        print(report["title"])
        print(render(report["rows"], quick))
        report["ratios"] = guide_ratios(report["rows"])
        print("\n".join(report["ratios"]))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / args.from_json.name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        chart(report["rows"], args.out / args.from_json.with_suffix(".png").name, report["title"], guide=not quick)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    batch, seq = (2, 64) if args.quick else (args.batch, args.seq)
    shape = QUICK_SHAPE if args.quick else QWEN2_5_0_5B
    name = "quick" if args.quick else "qwen2.5-0.5b"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kftune-bench-memory-") as tmp:
        model = args.model or build_model(Path(tmp) / "model", shape)
        data = write_rows(Path(tmp) / "rows.jsonl", rows=batch * args.steps * 2, seq=seq, model=model)
        specs = []
        for label in methods:
            method, bits, precision, checkpointing = METHODS[label]
            specs.append(
                Spec(
                    label=label,
                    model=str(model),
                    data=str(data),
                    method=method,
                    bits=bits,
                    batch=batch,
                    seq=seq,
                    steps=args.steps,
                    precision=precision or args.precision or default_precision(cuda),
                    checkpointing=checkpointing,
                )
            )
        started = time.time()
        rows = measure(specs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    add_estimates(rows, shape)
    where = machine()
    title = (
        f"{name}: batch {batch} x {seq} tokens, {rows[0].get('device', '?')}, {where}, "
        f"{time.strftime('%Y-%m-%d', time.localtime(started))}"
    )
    table = render(rows, args.quick)
    print(title)
    print(table)
    ratios = guide_ratios(rows)
    print("\n".join(ratios))
    print(
        "peak: "
        + (
            "torch.cuda.max_memory_allocated"
            if cuda
            else "peak RSS of the training process, including ~0.55 GiB of torch/transformers/trl runtime"
        )
        + "; estimate: kftune.preflight"
    )
    stem = f"memory_table-{name}-{'cuda' if cuda else 'cpu'}"
    report = {
        "title": title,
        "machine": where,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "batch": batch,
        "seq": seq,
        "shape": shape,
        "guide_gb": GUIDE,
        "rows": rows,
        "ratios": ratios,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    png = chart(rows, args.out / f"{stem}.png", title, guide=not args.quick)
    print(f"wrote {args.out / f'{stem}.json'} and {png}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
