"""Peak memory and step time of kftune's own training path (`kftune.train.run`), one process per measurement.

Peak RSS only grows within a process, so every measurement runs in a fresh process. The processes
fork from one server that has already imported torch, transformers, peft and trl (the fixed
overhead every training process carries, and half a minute of imports on a loaded 2-core box), so
a child's peak is what a `kftune train` process would reach, without paying the imports per method.

The data has every row at least `seq` tokens long, truncated to `seq`: each step sees exactly
batch x seq real tokens, padded or not.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "kftune.train.training",
    "kftune.models.loading",
    "kftune.data.reading",
]
QWEN2_5_0_5B = {
    "hidden_size": 896,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "intermediate_size": 4864,
    "embedding_rows": 151_936,
}


@dataclass(frozen=True)
class Spec:
    """One training measurement: kftune's config keys plus the bench's shape."""

    label: str
    model: str
    data: str
    method: str  # full | lora | qlora
    batch: int
    seq: int
    steps: int = 2
    bits: int = 4
    lora_r: int = 64
    precision: str = "auto"
    checkpointing: bool = False
    padding_free: bool = True
    lora_dropout: float = 0.1
    learning_rate: float = 1e-4

    def config_values(self, output_dir: str) -> dict[str, Any]:
        values: dict[str, Any] = {
            "base_model": self.model,
            "data_path": self.data,
            "output_dir": output_dir,
            "max_steps": self.steps,
            "per_device_train_batch_size": self.batch,
            "gradient_accumulation_steps": 1,
            "max_seq_length": self.seq,
            "learning_rate": self.learning_rate,
            "warmup_ratio": 0.0,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_steps": 10_000,
            "precision": self.precision,
            "gradient_checkpointing": self.checkpointing,
            "padding_free": self.padding_free,
            "force": True,
        }
        if self.method != "full":
            values |= {
                "use_lora": self.method == "lora",
                "use_qlora": self.method == "qlora",
                "lora_r": self.lora_r,
                "lora_alpha": 16,
                "lora_dropout": self.lora_dropout,
            }
        if self.method == "qlora":
            values["quantization_bit"] = self.bits
        return values


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What a results JSON needs to be traced back: the commit, whether the tree had changes, the exact command."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    command = ["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    commit = git("rev-parse", "HEAD")
    return {
        # a copy without .git (a GPU machine's) names the commit it was sent from in KFTUNE_BENCH_COMMIT
        "commit": commit or os.environ.get("KFTUNE_BENCH_COMMIT") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "command": shlex.join(command),
    }


def build_model(folder: Path, shape: dict[str, int], dtype: str = "bfloat16") -> Path:
    """A random model of `shape` with the tiny tokenizer (trained on the sample data), built once per folder.

    Built in a child process, so the parent does not keep the memory of a 494M-parameter init.
    """
    if not (folder / "config.json").is_file():
        from kftune.dev.tiny_model import build_tiny_model

        proc = _context().Process(
            target=build_tiny_model, args=(folder,), kwargs={"dtype": dtype, "force": True, **shape}
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"building the model in {folder} failed (exit code {proc.exitcode})")
    return folder


def _context():
    # set before the forkserver starts: its children take the environment it started with
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def write_rows(path: Path, rows: int, seq: int, model: Path) -> Path:
    """Alpaca rows whose answers run past `seq` tokens (the sample posts, joined), so truncation makes them all `seq`.

    Checked with `model`'s tokenizer and chat template: a step must see exactly batch x seq tokens.
    """
    from kftune.data.reading import load_conversations
    from kftune.dev.sample_data import generate_samples
    from kftune.models.loading import load_tokenizer

    posts = [row["output"] for row in generate_samples(64, seed=3)]
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            answer, k = "", i
            while len(answer) < 4 * seq + 64:  # the tiny tokenizer averages ~2.5 characters a token here
                answer += posts[k % len(posts)] + "\n"
                k += 1
            f.write(
                json.dumps({"instruction": f"写一篇笔记 {i}", "input": "", "output": answer}, ensure_ascii=False) + "\n"
            )
    tokenizer = load_tokenizer(str(model))
    shortest = min(len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in load_conversations(path))
    if shortest < seq:
        raise RuntimeError(f"{path}: a row has {shortest} tokens, fewer than seq {seq}")
    return path


def step_timer():
    """A TrainerCallback class that appends each step's wall time (CUDA synchronised) to `step_seconds`."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        """Wall seconds, and CPU seconds of all this process's threads (what other jobs on the machine do not inflate)."""

        def __init__(
            self, step_seconds: list[float] | None = None, step_cpu_seconds: list[float] | None = None
        ) -> None:
            self.step_seconds = [] if step_seconds is None else step_seconds
            self.step_cpu_seconds = [] if step_cpu_seconds is None else step_cpu_seconds

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - self.started)
            self.step_cpu_seconds.append(time.process_time() - self.cpu_started)

    return StepTimer


def _child(spec: Spec, conn) -> None:
    try:
        conn.send(("ok", _train_and_measure(spec)))
    except BaseException as exc:  # report it to the parent, whatever it was
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"))
    finally:
        conn.close()


def _train_and_measure(spec: Spec) -> dict[str, Any]:
    import torch

    from kftune.train.config import resolve
    from kftune.train.preflight import estimate_for
    from kftune.train.training import run

    cuda = torch.cuda.is_available()

    class Probe(step_timer()):
        """Step times, and whether checkpointing ran (the pre-flight may have turned it on)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.checkpointing = bool(args.gradient_checkpointing)

    with tempfile.TemporaryDirectory(prefix="kftune-bench-run-") as tmp:
        cfg = resolve(spec.config_values(f"{tmp}/out"), {})
        estimate = estimate_for(cfg, spec.model, device="cuda" if cuda else "cpu")
        probe = Probe()
        result = run(cfg, callbacks=[probe])
    timed = probe.step_seconds[1:] or probe.step_seconds  # the first step also allocates the optimizer
    seconds = sum(timed) / len(timed)
    tokens = spec.batch * spec.seq
    return {
        **dataclasses.asdict(spec),
        "device": "cuda" if cuda else "cpu",
        "peak_bytes": result.metrics["peak_memory_bytes"],  # kftune's own: from loading to the end of training
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS",
        "estimate_bytes": estimate.total,
        "estimate": estimate.parts,
        "trainable_params": result.metrics["trainable_params"],
        "total_params": result.metrics["total_params"],
        "trainable_share": result.metrics["trainable_share"],
        "precision_used": result.metrics["precision"],
        "checkpointing_used": probe.checkpointing or spec.method == "qlora" and spec.checkpointing,
        "step_seconds": probe.step_seconds,
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "loss_history": result.metrics["loss_history"],
    }


def measure(specs: list[Spec], timeout_s: float = 3600, progress=print) -> list[dict[str, Any]]:
    """Each spec in its own process, one at a time; a failed or killed one gives a row with `error`."""
    ctx = _context()
    results = []
    for spec in specs:
        progress(f"[bench] {spec.label}: {spec.method}, batch {spec.batch} x {spec.seq} tokens ...")
        started = time.perf_counter()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(spec, child), name=f"bench-{spec.label}")
        proc.start()
        child.close()
        outcome: tuple[str, Any] = ("error", "the process ended without a result (killed, out of memory?)")
        if parent.poll(timeout_s):
            try:
                outcome = parent.recv()
            except EOFError:
                pass
        else:
            outcome = ("error", f"timed out after {timeout_s:.0f} s")
            proc.kill()
        proc.join()
        if outcome[0] == "ok":
            row = outcome[1]
            progress(
                f"[bench] {spec.label}: peak {row['peak_bytes'] / 2**30:.2f} GiB (estimate {row['estimate_bytes'] / 2**30:.2f}), "
                f"{row['seconds_per_step']:.2f} s/step ({time.perf_counter() - started:.0f} s in all)"
            )
        else:
            row = {**dataclasses.asdict(spec), "error": outcome[1]}
            progress(f"[bench] {spec.label}: FAILED: {outcome[1].splitlines()[0]}")
        results.append(row)
    return results
