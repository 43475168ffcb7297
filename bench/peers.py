"""kftune head to head with LLaMA-Factory and TRL's own `trl sft`: same model, data, method and settings.

Each tool runs in its own pinned venv (created on first use from `bench/peers/<tool>.txt`, under
`bench/.peers/`; kftune runs in this checkout's venv), each run in its own process, one at a time.
The same harness (`bench/peers/harness.py`) wraps every tool's own entry point: it times each
training step and counts its real (non-padding) tokens from the batch the tool built; the parent
takes the process's peak RSS from the kernel (`wait4`'s ru_maxrss, what `/usr/bin/time -v`
prints) and samples its peak anonymous memory (bench/peers_report.py says why both). Each row runs
`--runs` times (default 3), the rows taking turns; the table prints medians and ranges, and the JSON
keeps every run, the commit, whether the tree had changes, and the command. Same for all: the model (built here: `measure.build_model`), the alpaca file, LoRA r / alpha
/ dropout on every linear layer, batch, cutoff, learning rate (constant, no warmup), steps, seed,
precision (bf16 where the CPU has it), gradient checkpointing (both peers turn it on by default, so
kftune runs with it on too; `--kftune-checkpointing preflight` leaves it to kftune's memory pre-flight),
and each tool's own defaults beyond that.

    python bench/peers.py [--shape qwen2.5-0.5b|demo|quick] [--steps 6] [--runs 3] [--methods lora,qlora4] [--quick]
        [--out DIR] [--same-python] [--data generated] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import QWEN2_5_0_5B, build_model, provenance, write_rows
from peers_report import METHODS, AnonPeak, machine, ratios, render, summarize
from throughput import flops_per_token, matmul_peak

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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "You are a helpful assistant."  # the Qwen2.5 template's default, given to LLaMA-Factory too


def python_for(tool: str, venvs: Path, same_python: bool = False) -> str:
    """The tool's interpreter: this one for kftune, else a venv made from the tool's pins (remade when they change).

    `same_python`: this one for every tool (a machine without a registry, where trl is installed beside kftune
    at the versions bench/peers/trl.txt pins).
    """
    if tool == "kftune" or same_python:
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
            **({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}),
            **trainer_args,
        }
        if method != "lora":
            cfg |= {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True}
    path = work / f"{tool}-{method}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_one(tool: str, method: str, args, model: str, work: Path) -> dict:
    """One tool and method in its own process: peak RSS from the kernel when it ends, peak RssAnon sampled."""
    python = python_for(tool, args.venvs, args.same_python)
    config = configs(tool, method, args, model, work)
    record_path = work / f"{tool}-{method}.result.json"
    record_path.unlink(missing_ok=True)
    paths = [str(BENCH.parent), *([str(PEERS / "standins")] if tool == "llamafactory" else [])]
    env = {
        **os.environ,
        "KFTUNE_LEVERS_OFF": args.levers_off,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "PYTHONPATH": os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [python, str(PEERS / "harness.py"), str(record_path), tool, str(config)]
    if args.dry_run:
        print(f"[peers] dry run: {tool} {method}: {' '.join(command)}", flush=True)
        return {"tool": tool, "method": method, "error": "dry run: not trained"}
    log = work / f"{tool}-{method}.log"
    print(f"[peers] {tool} {method} ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        sampler = AnonPeak(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        anon = sampler.stop()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if code != 0 or not record.get("step_seconds"):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"[peers] {tool} {method} FAILED (exit {code}); log tail:\n  " + "\n  ".join(tail), flush=True)
        return {"tool": tool, "method": method, "error": "\n".join(tail)}
    row = row_from(record, usage.ru_maxrss * 1024, anon, wall)
    if args.peak_gflops:
        row["mfu"] = flops_per_token(model, row["trainable_params"]) * row["real_tokens_per_s"] / args.peak_gflops / 1e9
    print(
        f"[peers] {tool} {method}: peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, peak anon {anon / 2**30:.2f} GiB, "
        f"{row['real_tokens_per_s']:.1f} real tok/s, {wall:.0f} s in all",
        flush=True,
    )
    return row


def row_from(record: dict, peak_rss: int, peak_anon: int, wall: float) -> dict:
    """One run's measurements from the harness's record and the process's peaks."""
    timed = slice(1, None) if len(record["step_seconds"]) > 1 else slice(None)  # step 1 also allocates the optimizer
    seconds = sum(record["step_seconds"][timed])
    tokens = sum(record["step_tokens"][: len(record["step_seconds"])][timed])
    cuda = {k: record[k] for k in ("cuda_peak_bytes", "cuda_reserved_peak_bytes") if k in record}
    return {
        "peak_rss_bytes": peak_rss,
        "peak_anon_bytes": peak_anon,
        **cuda,
        "process_seconds": round(wall, 1),
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
        "levers_on": record.get("levers_on"),  # kftune's runs: the levers KFTUNE_LEVERS_OFF left on
        "attn_implementation": record.get("attn_implementation"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    parser.add_argument("--quick", action="store_true", help="the quick shape (full vocabulary, 2 layers), 4 steps")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=3, help="runs of each row (median and range printed)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--data",
        default=str(ALPACA),
        help="alpaca JSON (default: LLaMA-Factory's demo file), or 'generated': rows of at least --cutoff tokens",
    )
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
    parser.add_argument("--same-python", action="store_true", help="every tool in this interpreter (no venvs, no pip)")
    parser.add_argument("--attn-implementation", help="trl's attn_implementation (default: transformers' sdpa)")
    parser.add_argument("--skipped", type=Path, help="a JSON of {package: why} to print (bench/gpu_wheelhouse.py's)")
    parser.add_argument("--dry-run", action="store_true", help="everything but training: model, data, configs")
    parser.add_argument("--keep", type=Path, help="keep each run's config, log and outputs in this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps = "quick", 4
    if args.data != "generated":
        args.data = Path(args.data).resolve()
        if not args.data.is_file():
            parser.error(f"--data {args.data}: not found")
    import torch

    from kftune.core.levers import levers_on
    from kftune.models.loading import pick_runtime

    levers_on()  # a --levers-off that names no lever stops here
    args.provenance = provenance()  # at the start: the tree the runs were made from
    args.cuda = torch.cuda.is_available()
    args.precision = pick_runtime("auto").precision
    args.peak_gflops = matmul_peak(True) if args.cuda else None
    tools = args.tools.split(",")
    methods = args.methods.split(",")
    for tool in tools:  # every venv first: a pip failure shows before any training
        python_for(tool, args.venvs, args.same_python)
    model = str(build_model(args.venvs / "models" / args.shape, {**SHAPES[args.shape], "data_path": str(SAMPLE_DATA)}))
    runs: dict[tuple[str, str], list[dict]] = {(tool, method): [] for method in methods for tool in tools}
    loads = [os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peers-{args.shape}.json"
    with tempfile.TemporaryDirectory(prefix="kftune-peers-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.data == "generated":
            args.data = write_rows(work / "generated.jsonl", args.batch * args.steps, args.cutoff, Path(model))
        truncated_messages(args.data, model, args.cutoff, work / "trl-data.jsonl")
        for _ in range(1 if args.dry_run else args.runs):  # the rows take turns: a busy minute slows them alike
            for (tool, method), done in runs.items():
                done.append(run_one(tool, method, args, model, work))
                loads.append(os.getloadavg())
                # written after every run: a run stopped halfway keeps what it measured
                report = make_report(args, runs, loads)
                path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(render(report))
    print(f"wrote {path}")
    return 0 if args.dry_run or all("error" not in r for r in report["rows"]) else 1


def make_report(args, runs: dict[tuple[str, str], list[dict]], loads: list[tuple[float, float, float]]) -> dict:
    rows = [summarize(tool, method, done) for (tool, method), done in runs.items()]
    kftune = next((r for r in rows if r["tool"] == "kftune" and "error" not in r), {})
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **args.provenance,
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
        "data": Path(args.data).name,
        "runs_per_row": args.runs,
        "levers_off": args.levers_off,
        "kftune_levers_on": kftune.get("levers_on"),
        "kftune_checkpointing": args.kftune_checkpointing,
        "attn_implementation": args.attn_implementation,
        "peak_gflops": args.peak_gflops,
        "skipped": json.loads(args.skipped.read_text()) if args.skipped and args.skipped.is_file() else {},
        "complete": all(len(done) == args.runs for done in runs.values()),
        "rows": rows,
        "ratios": ratios(rows),
    }


if __name__ == "__main__":
    sys.exit(main())
