"""kftune head to head with LLaMA-Factory and TRL's own `trl sft`: same model, data, method and settings.

Each tool runs in its own pinned venv (created on first use from `bench/peers/<tool>.txt`, under
`bench/.peers/`; kftune runs in this checkout's venv), each run in its own process, one at a time.
The same harness (`bench/peers/harness.py`) wraps every tool's own entry point: it times each
training step and counts its real (non-padding) tokens from the batch the tool built; the parent
takes the process's peak RSS from the kernel (`wait4`'s ru_maxrss, what `/usr/bin/time -v`
prints). Same for all: the model (built here: `measure.build_model`), the alpaca file, LoRA r / alpha
/ dropout on every linear layer, batch, cutoff, learning rate (constant, no warmup), steps, seed,
precision (bf16 where the CPU has it), gradient checkpointing (both peers turn it on by default, so
kftune runs with it on too; `--kftune-checkpointing preflight` leaves it to kftune's memory pre-flight),
and each tool's own defaults beyond that.

    python bench/peers.py [--shape qwen2.5-0.5b|demo|quick] [--steps 6] [--methods lora,qlora4] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import QWEN2_5_0_5B, build_model

from kftune.core.levers import LEVERS

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
ALPACA = BENCH.parent.parent / "shared" / "external" / "alpaca_zh_demo.json"
SAMPLE_DATA = BENCH.parent / "data" / "store_xhs_sft_samples.jsonl"  # the tiny tokenizer is trained on it
SHAPES = {
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "demo": {"hidden_size": 512, "num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1024},
    # Qwen2.5's full vocabulary and width, two layers: the LM head weighs what it does in the real model
    "quick": {**QWEN2_5_0_5B, "num_layers": 2},
}
TOOLS = ("kftune", "llamafactory", "trl")
METHODS = ("lora", "qlora4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "You are a helpful assistant."  # the Qwen2.5 template's default, given to LLaMA-Factory too


def python_for(tool: str, venvs: Path) -> str:
    """The tool's interpreter: this one for kftune, else a venv made from the tool's pins (remade when they change)."""
    if tool == "kftune":
        return sys.executable
    pins = PEERS / f"{tool}.txt"
    venv = venvs / tool
    stamp = venv / ".pins-sha256"
    digest = hashlib.sha256(pins.read_bytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == digest):
        print(
            f"[peers] creating {venv} from {pins.relative_to(BENCH.parent)} (pip, a few minutes the first time)",
            flush=True,
        )
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(pins)], check=True)
        # "# remove: a b" lines: packages its dependencies pull in that break it with torch 2.13
        remove = [
            name for line in pins.read_text().splitlines() if line.startswith("# remove:") for name in line.split()[2:]
        ]
        if remove:
            subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", *remove], check=True)
        stamp.write_text(digest)
    return str(venv / "bin" / "python")


def truncated_messages(data: Path, model: str, cutoff: int, out: Path) -> Path:
    """The alpaca rows as chat messages, each answer cut so the templated row fits `cutoff` tokens.

    `trl sft` refuses padding-free batches with a max_length unless it packs (which would change the
    batches), so it gets rows already within the cutoff; the others truncate the same rows themselves.
    """
    from kftune.data.reading import load_conversations
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    with out.open("w", encoding="utf-8") as f:
        for messages in load_conversations(data):
            answer = messages[-1]["content"]
            while len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]) > cutoff:
                answer = answer[: int(len(answer) * 0.9)]
                messages[-1] = {"role": "assistant", "content": answer}
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return out


def configs(tool: str, method: str, args, model: str, work: Path) -> Path:
    """The tool's own config file for this run (bench/peers/ documents each tool's keys)."""
    bf16 = args.precision == "bf16"
    out = work / f"{tool}-{method}"
    # the transformers TrainingArguments both peers take, set alike
    trainer_args = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": bf16,
        "use_cpu": not args.cuda,
        "seed": args.seed,
        "output_dir": str(out),
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    if tool == "kftune":
        cfg = {
            "base_model": model,
            "data_path": str(args.data),
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "use_lora": method == "lora",
            "use_qlora": method != "lora",
            **({"quantization_bit": 4} if method != "lora" else {}),
            "lora_r": args.rank,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "lora_target_modules": ",".join(TARGETS),
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "max_seq_length": args.cutoff,
            "learning_rate": args.lr,
            "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 100_000,
            "seed": args.seed,
            "precision": args.precision,
            "force": True,
            **({"gradient_checkpointing": True} if args.kftune_checkpointing == "on" else {}),
        }
    elif tool == "llamafactory":
        (work / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": str(args.data)}}))
        cfg = {
            "model_name_or_path": model,
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": args.rank,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "lora_target": ",".join(TARGETS),
            "dataset": "alpaca",
            "dataset_dir": str(work),
            "template": "qwen",
            "default_system": SYSTEM,
            "cutoff_len": args.cutoff,
            "overwrite_cache": True,
            "overwrite_output_dir": True,
            **trainer_args,
        }
        if method != "lora":
            cfg |= {"quantization_bit": 4, "quantization_method": "bnb", "double_quantization": True}
    else:
        cfg = {
            "model_name_or_path": model,
            "dtype": "bfloat16" if bf16 else "float32",
            "datasets": [{"path": "json", "data_files": str(work / "trl-data.jsonl")}],
            # trl's documented efficient settings: padding-free batches, loss on assistant tokens only
            "padding_free": True,
            "max_length": None,
            "assistant_only_loss": True,
            "use_peft": True,
            "lora_r": args.rank,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "lora_target_modules": TARGETS,
            **trainer_args,
        }
        if method != "lora":
            cfg |= {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True}
    path = work / f"{tool}-{method}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_one(tool: str, method: str, args, model: str, work: Path) -> dict:
    """One tool and method in its own process; peak RSS from the kernel when it ends."""
    python = python_for(tool, args.venvs)
    config = configs(tool, method, args, model, work)
    record_path = work / f"{tool}-{method}.result.json"
    env = {
        **os.environ,
        "KFTUNE_LEVERS_OFF": args.levers_off,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "PYTHONPATH": os.pathsep.join(
            [str(BENCH.parent), *([str(PEERS / "standins")] if tool == "llamafactory" else [])]
        ),
    }
    log = work / f"{tool}-{method}.log"
    print(f"[peers] {tool} {method} ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [python, str(PEERS / "harness.py"), str(record_path), tool, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if code != 0 or not record.get("step_seconds"):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"[peers] {tool} {method} FAILED (exit {code}); log tail:\n  " + "\n  ".join(tail), flush=True)
        return {"tool": tool, "method": method, "peak_bytes": usage.ru_maxrss * 1024, "error": "\n".join(tail)}
    row = row_from(tool, method, record, usage.ru_maxrss * 1024, wall, args.levers_off)
    print(
        f"[peers] {tool} {method}: peak {row['peak_bytes'] / 2**30:.2f} GiB ({row['peak_bytes']} bytes), {row['real_tokens_per_s']:.1f} real tok/s, "
        f"{wall:.0f} s in all",
        flush=True,
    )
    return row


def row_from(tool: str, method: str, record: dict, peak_rss: int, wall: float, levers_off: str = "") -> dict:
    """A table row from the harness's record and the process's peak RSS."""
    row = {
        "tool": tool,
        "method": method,
        **({"levers_off": levers_off} if tool == "kftune" and levers_off else {}),
        "peak_bytes": peak_rss,
        "process_seconds": round(wall, 1),
    }
    timed = slice(1, None) if len(record["step_seconds"]) > 1 else slice(None)  # step 1 also allocates the optimizer
    seconds = sum(record["step_seconds"][timed])
    tokens = sum(record["step_tokens"][: len(record["step_seconds"])][timed])
    if "cuda_peak_bytes" in record:
        row |= {"peak_rss_bytes": row["peak_bytes"], "peak_bytes": record["cuda_peak_bytes"]}
    return row | {
        "peak_kind": "torch.cuda.max_memory_allocated" if "cuda_peak_bytes" in record else "peak RSS (wait4 ru_maxrss)",
        "real_tokens_per_s": tokens / seconds,
        "seconds": round(record["train_seconds"], 2),
        "losses": record["losses"],
        "final_loss": record["losses"][-1] if record["losses"] else None,
        "step_seconds": record["step_seconds"],
        "step_tokens": record["step_tokens"],
        "step_label_tokens": record["step_label_tokens"],
        "step_shapes": record["step_shapes"],
        "gradient_checkpointing": record.get("gradient_checkpointing"),
        "trainable_params": record.get("trainable_params"),
    }


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


def ratios(rows: list[dict]) -> list[str]:
    """kftune against the better peer, per method: peak <= 0.75x the lower peer's, tokens/s >= 1.25x the higher's."""
    lines = []
    for method in METHODS:
        mine = next((r for r in rows if r["tool"] == "kftune" and r["method"] == method and "error" not in r), None)
        peers = [r for r in rows if r["tool"] != "kftune" and r["method"] == method and "error" not in r]
        if not mine or not peers:
            continue
        low = min(peers, key=lambda r: r["peak_bytes"])
        fast = max(peers, key=lambda r: r["real_tokens_per_s"])
        mem = mine["peak_bytes"] / low["peak_bytes"]
        speed = mine["real_tokens_per_s"] / fast["real_tokens_per_s"]
        lines.append(
            f"{method}: peak {mem:.2f}x {low['tool']}'s (target <= 0.75: {'met' if mem <= 0.75 else 'NOT met'}); "
            f"real tokens/s {speed:.2f}x {fast['tool']}'s (target >= 1.25: {'met' if speed >= 1.25 else 'NOT met'})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    parser.add_argument("--quick", action="store_true", help="the quick shape (full vocabulary, 2 layers), 4 steps")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", type=Path, default=ALPACA, help="alpaca JSON (default: LLaMA-Factory's demo file)")
    parser.add_argument("--venvs", type=Path, default=BENCH / ".peers", help="where the peers' venvs and models live")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--kftune-checkpointing",
        choices=("on", "preflight"),
        default="on",
        help="on (as both peers run by default) or left to kftune's memory pre-flight",
    )
    parser.add_argument(
        "--levers-off", default="", help=f"kftune levers to turn off ({','.join(LEVERS)}): to measure each"
    )
    parser.add_argument("--keep", type=Path, help="keep each run's config, log and outputs in this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps = "quick", 4
    args.data = args.data.resolve()
    if not args.data.is_file():
        parser.error(f"--data {args.data}: not found")
    import torch

    from kftune.models.loading import pick_runtime

    args.cuda = torch.cuda.is_available()
    args.precision = pick_runtime("auto").precision
    tools = args.tools.split(",")
    methods = args.methods.split(",")
    for tool in tools:  # every venv first: a pip failure shows before any training
        python_for(tool, args.venvs)
    model = str(build_model(args.venvs / "models" / args.shape, {**SHAPES[args.shape], "data_path": str(SAMPLE_DATA)}))
    rows: list[dict] = []
    loads = [os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peers-{args.shape}.json"
    with tempfile.TemporaryDirectory(prefix="kftune-peers-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
        truncated_messages(args.data, model, args.cutoff, work / "trl-data.jsonl")
        for method in methods:
            for tool in tools:
                rows.append(run_one(tool, method, args, model, work))
                loads.append(os.getloadavg())
                # written after every run: a run stopped halfway keeps the rows it measured
                report = make_report(args, rows, loads, complete=len(rows) == len(methods) * len(tools))
                path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(render(report))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def make_report(args, rows: list[dict], loads: list[tuple[float, float, float]], complete: bool) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": args.shape,
        "shape_config": SHAPES[args.shape],
        "machine": machine(args.cuda),
        "load_average": loads[-1],
        "load_average_1min_range": [min(x[0] for x in loads), max(x[0] for x in loads)],
        "precision": args.precision,
        "steps": args.steps,
        "batch": args.batch,
        "cutoff": args.cutoff,
        "lora": {"r": args.rank, "alpha": 16, "dropout": 0.1, "targets": TARGETS},
        "lr": args.lr,
        "seed": args.seed,
        "data": args.data.name,
        "levers_off": args.levers_off,
        "kftune_checkpointing": args.kftune_checkpointing,
        "complete": complete,
        "rows": rows,
        "ratios": ratios(rows),
    }


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"shape {report['shape']} {report['shape_config']}; {report['data']}, batch {report['batch']}, cutoff "
        f"{report['cutoff']}, LoRA r={report['lora']['r']} alpha 16 dropout 0.1 on every linear layer, lr {report['lr']}, "
        f"{report['steps']} steps, seed {report['seed']}, {report['precision']}",
        f"machine: {m['gpu'] or m['cpu']}, {m['cores']} cores, bf16 {'native' if m['bf16'] else 'not native'}, "
        f"{m['ram_gib']} GiB; load average {' '.join(f'{x:.1f}' for x in report['load_average'])} (1-min range over the "
        f"runs {report['load_average_1min_range'][0]:.1f}-{report['load_average_1min_range'][1]:.1f}); {report['date']}",
        f"{'tool':13s} {'method':7s} {'peak GiB':>8s} {'real tok/s':>10s} {'train s':>8s} {'ckpt':>5s} "
        f"{'first loss':>10s} {'final loss':>10s}",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(
                f"{r['tool']:13s} {r['method']:7s} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}"
            )
            continue
        lines.append(
            f"{r['tool']:13s} {r['method']:7s} {r['peak_bytes'] / 2**30:8.2f} {r['real_tokens_per_s']:10.1f} "
            f"{r['seconds']:8.1f} {'yes' if r['gradient_checkpointing'] else 'no':>5s} "
            f"{r['losses'][0]:10.4f} {r['final_loss']:10.4f}"
        )
    lines.append("loss per step (same seed, same row order):")
    for r in report["rows"]:
        if "error" not in r:
            lines.append(f"  {r['tool']:13s} {r['method']:7s} " + " ".join(f"{x:.4f}" for x in r["losses"]))
    lines += report["ratios"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
