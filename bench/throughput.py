"""kftune's training path against the script a user would write, same model, data and steps, in one run.

The baseline is the plain recipe: transformers `Trainer` + peft LoRA, every sample padded to
max_length with the tokenizer, the default `DataCollatorForLanguageModeling(mlm=False)`. kftune
runs `kftune.train.run` twice: padded (trl's dynamic padding, `padding_free: false`) and its
default (padding-free). All three train LoRA r=64 on every linear layer (the guide's config)
for the same steps and batch. Reported: real (non-padding) tokens per second, the ratio to the
baseline, and MFU = model FLOPs per real token x real tokens/s over the peak of a big matmul
measured in this run. Model FLOPs per token (attention's s^2 term left out):
full 6N, LoRA 4N + 6T (N: parameters of every matmul, LM head included; T: adapter parameters;
a frozen weight needs the forward and the input gradient, not its own gradient).

    python bench/throughput.py [--steps 20] [--batch 4] [--max-seq-length 512] [--shape demo|qwen2.5-0.5b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure
from measure import QWEN2_5_0_5B, build_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "data" / "store_xhs_sft_samples.jsonl"
DEMO = {"hidden_size": 512, "num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1024}
TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
SHAPES = {"demo": DEMO, "qwen2.5-0.5b": QWEN2_5_0_5B, "tiny": TINY}
TARGET_RATIO = 1.3
LORA = {"r": 64, "alpha": 16, "dropout": 0.1}


@dataclass
class Run:
    label: str
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)  # real tokens per step
    losses: list[float] = field(default_factory=list)
    trainable: int = 0

    def timed(self, warmup: int) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds, real tokens) of the timed steps."""
        # the dataloader may build a batch ahead of the last step: count the tokens of timed steps only
        return (
            sum(self.step_seconds[warmup:]),
            sum(self.step_cpu_seconds[warmup:]),
            sum(self.step_tokens[warmup : len(self.step_seconds)]),
        )

    def tokens_per_second(self, warmup: int) -> tuple[float, float]:
        """Real tokens per wall second and per CPU second."""
        seconds, cpu, tokens = self.timed(warmup)
        return tokens / seconds, tokens / cpu


def step_timer(run: Run):
    """Step times into `run`, and from trl's logs the loss and the real tokens of each step."""

    class Timer(measure.step_timer()):
        seen = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                run.losses.append(float(logs["loss"]))
            if logs and "num_tokens" in logs:  # trl's running count of real tokens (attention mask or packed row)
                seen = int(float(logs["num_tokens"]))
                run.step_tokens.append(seen - self.seen)
                self.seen = seen

    return Timer(run.step_seconds, run.step_cpu_seconds)


def baseline(model_dir: str, data: Path, args, precision: str, out: str) -> Run:
    """What a user writes from the transformers + peft docs: pad everything to max_length, default collator."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from kftune.data.reading import load_conversations

    run = Run("baseline: Trainer + peft, padded to max_length")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in load_conversations(data)]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_seq_length, padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    run.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting(features):
        batch = collate(features)
        run.step_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    training = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    Trainer(
        model=model, args=training, train_dataset=dataset, data_collator=counting, callbacks=[step_timer(run)]
    ).train()
    return run


def kftune_run(model_dir: str, data: Path, args, precision: str, out: str, padding_free: bool) -> Run:
    from kftune.train.config import resolve
    from kftune.train.training import run as train

    run = Run("kftune, padding-free (default)" if padding_free else "kftune, padded (padding_free: false)")
    cfg = resolve(
        {
            "base_model": model_dir,
            "data_path": str(data),
            "output_dir": out,
            "use_lora": True,
            "lora_r": LORA["r"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": LORA["dropout"],
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch,
            "gradient_accumulation_steps": 1,
            "max_seq_length": args.max_seq_length,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 10_000,
            "precision": precision,
            "padding_free": padding_free,
            "seed": 42,
        },
        {},
    )
    result = train(cfg, callbacks=[step_timer(run)])
    run.trainable = result.metrics["trainable_params"]
    return run


def matmul_peak(cuda: bool) -> float:
    """GFLOP/s of a big matmul in the dtype training computes in (fp32 on CPU, bf16 on CUDA)."""
    import torch

    if cuda:
        n, dtype, device = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, device = 1024, torch.float32, "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def flops_per_token(model_dir: str, trainable: int) -> float:
    """LoRA: 4N + 6T (see the module docstring)."""
    from kftune.train.preflight import model_shape

    shape = model_shape(model_dir)
    matmul = shape.linear_params + shape.vocab * shape.hidden
    return 4 * matmul + 6 * trainable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4, the guide's)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="the guide's max_seq_length (default 512)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--shape", choices=SHAPES, default="demo", help="model shape (default: the demo model)")
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA, help="training data (default: the sample data)")
    parser.add_argument("--precision", help="default: bf16 on CUDA, kftune's auto on CPU")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 6 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.warmup = "tiny", 6, 1
    import torch

    from kftune.models.loading import pick_runtime

    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16" if cuda else "auto")
    runtime = pick_runtime(precision)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="kftune-bench-throughput-") as tmp:
        model_dir = str(
            build_model(
                Path(tmp) / "model",
                {**SHAPES[args.shape], "data_path": str(args.data)},
                dtype="bfloat16" if args.shape == "qwen2.5-0.5b" else "float32",
            )
        )
        peak = matmul_peak(cuda)
        runs = [baseline(model_dir, args.data, args, runtime.precision, f"{tmp}/baseline")]
        for padding_free in (False, True):
            runs.append(
                kftune_run(model_dir, args.data, args, runtime.precision, f"{tmp}/kftune-{padding_free}", padding_free)
            )
        per_token = flops_per_token(model_dir, runs[-1].trainable)
        peak_after = matmul_peak(cuda)
    peak = max(peak, peak_after)
    return report(runs, args, runtime, peak, per_token, cuda)


def report(runs: list[Run], args, runtime, peak: float, per_token: float, cuda: bool) -> int:
    import torch

    where = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    print(
        f"{args.shape} model, LoRA r={LORA['r']} on every linear layer, batch {args.batch}, max_seq_length "
        f"{args.max_seq_length}, {args.steps} steps ({args.warmup} untimed), {runtime.device} {runtime.precision}, "
        f"{where}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"matmul peak measured in this run: {peak:,.1f} GFLOP/s; model FLOPs per real token {per_token / 1e6:,.1f} M")
    base, base_cpu = runs[0].tokens_per_second(args.warmup)
    print(
        f"{'run':44s} {'real tok/step':>13s} {'s/step':>7s} {'real tok/s':>10s} {'vs baseline':>11s} {'MFU':>6s} "
        f"{'tok/CPU-s':>9s} {'vs baseline':>11s}"
    )
    rows = []
    for run in runs:
        seconds, cpu, tokens = run.timed(args.warmup)
        steps = max(1, len(run.step_seconds) - args.warmup)
        rate, cpu_rate = tokens / seconds, tokens / cpu
        mfu = per_token * rate / (peak * 1e9)
        rows.append(
            {
                "run": run.label,
                "tokens_per_step": tokens / steps,
                "seconds_per_step": seconds / steps,
                "real_tokens_per_second": rate,
                "ratio": rate / base,
                "mfu": mfu,
                "real_tokens_per_cpu_second": cpu_rate,
                "cpu_ratio": cpu_rate / base_cpu,
                "losses": run.losses,
                "trainable_params": run.trainable,
            }
        )
        print(
            f"{run.label:44s} {tokens / steps:13.0f} {seconds / steps:7.2f} {rate:10.1f} {rate / base:10.2f}x "
            f"{mfu:6.2%} {cpu_rate:9.1f} {cpu_rate / base_cpu:10.2f}x"
        )
    print("CPU seconds count every thread of this process: other jobs on a shared machine inflate wall time, not these")
    padded, free = runs[1].losses, runs[2].losses
    diffs = [abs(a - b) for a, b in zip(padded, free, strict=False)]
    print("loss per step (kftune padded | padding-free | baseline, whose loss covers prompt tokens too):")
    for i, (a, b) in enumerate(zip(padded, free, strict=False)):
        base_loss = runs[0].losses[i] if i < len(runs[0].losses) else float("nan")
        print(f"  step {i + 1:3d}  {a:8.4f}  {b:8.4f}  {base_loss:8.4f}")
    print(
        f"padded vs padding-free: max |loss diff| {max(diffs, default=0):.4f} over {len(diffs)} steps "
        "(LoRA dropout draws differ between the two layouts; the same batch gives the same loss)"
    )
    ratio = rows[2]["ratio"]
    print(
        f"target {TARGET_RATIO}x the baseline's real-token throughput: {'met' if ratio >= TARGET_RATIO else 'NOT met'} "
        f"({ratio:.2f}x)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throughput-{args.shape}-{runtime.device}.json"
    path.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": where,
                "shape": args.shape,
                "steps": args.steps,
                "batch": args.batch,
                "max_seq_length": args.max_seq_length,
                "precision": runtime.precision,
                "peak_gflops": peak,
                "flops_per_token": per_token,
                "runs": rows,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
