"""Soak test of resume: kill -9 training at random moments, restart it, compare with an uninterrupted run bit for bit.

    python scripts/resume_soak.py [--trials 20] [--seed 0] [--methods lora,full] [--s3]

Each trial runs `fine_tune_qwen.py` on the tiny Qwen2 model in a subprocess, saving a checkpoint
every step to a checkpoint_uri (a local folder, or S3 with --s3: a private stack on free ports). It sends SIGKILL
a random fraction of a step after a random number of published checkpoints, so the kill lands
mid-step, mid-save or mid-publish; then it runs the same command again, which must resume from the
newest complete checkpoint, and compares every tensor of the final adapter or model with
`torch.equal` against an uninterrupted run. Prints one row per trial. Every process computes on
one CPU thread, so all runs do the same arithmetic (and a loaded machine is not oversubscribed).
tests/test_resume.py runs a few such trials with the same helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MAX_STEPS = 8  # 24 rows, 2 x 2 per step: one epoch is 6 steps, so runs cross into a second one
SHORT_RUN = [
    "--max_steps",
    str(MAX_STEPS),
    "--save_steps",
    "1",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "2",
    "--max_seq_length",
    "128",
    "--logging_steps",
    "1",
    "--warmup_ratio",
    "0",
    "--lr_scheduler_type",
    "cosine",
]
# lora_dropout > 0: the restored RNG state decides which activations drop, so a wrong restore shows
METHOD_FLAGS = {
    "lora": ["--use_lora", "--lora_r", "4", "--lora_dropout", "0.1", "--learning_rate", "1e-2"],
    "full": ["--learning_rate", "1e-3"],
}
LAST_KILL = MAX_STEPS - 3  # kill after at most this many checkpoints: two steps and the final save remain
PUBLISHED = "published to"  # kftune's log line after each checkpoint reaches the store
TRAINING_STARTS = re.compile(r"\| 0/\d+ \[")  # the progress bar at step 0, after data preparation


def train_argv(
    method: str, model: Path, data: Path, out: Path, checkpoint_uri: str | None = None, precision: str = "auto"
) -> list[str]:
    argv = [
        "--base_model",
        str(model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        *SHORT_RUN,
        *METHOD_FLAGS[method],
        "--precision",
        precision,
    ]
    return argv + (["--checkpoint_uri", checkpoint_uri] if checkpoint_uri else [])


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, **ONE_THREAD, **(extra or {})}


def train_to_end(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 900) -> None:
    proc = subprocess.run(
        [sys.executable, "fine_tune_qwen.py", *argv],
        cwd=REPO,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def kill_during_training(
    argv: list[str], after_published: int, fraction: float, env: dict[str, str] | None = None, timeout_s: float = 900
) -> int:
    """SIGKILL the training `fraction` of a step after its `after_published`-th published checkpoint.

    Returns how many checkpoints it had published. Raises if the process ended by itself.
    """
    proc = subprocess.Popen(
        [sys.executable, "fine_tune_qwen.py", *argv],
        cwd=REPO,
        env=_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    published, stamps, tail = 0, [], []
    try:
        for line in proc.stderr:
            tail = (tail + [line])[-40:]
            if not stamps and TRAINING_STARTS.search(line):
                stamps.append(time.perf_counter())
            if PUBLISHED not in line:
                continue
            published += 1
            stamps.append(time.perf_counter())
            if published >= after_published:
                time.sleep(fraction * (stamps[-1] - stamps[-2]))  # a share of the last step (and its publish)
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stderr.close()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"training was not killed (exit {proc.returncode}, {published} checkpoints):\n{''.join(tail)}"
        )
    return published


def final_tensors(out: Path) -> dict:
    """Every tensor of the saved adapter or model, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise RuntimeError(f"{out} holds no safetensors")
    return tensors


def differing(a: dict, b: dict) -> list[str]:
    """Names of tensors that are missing on one side or not bit-identical."""
    import torch

    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


@dataclass
class Trial:
    index: int
    method: str
    store: str
    killed_after: int  # checkpoints published before the kill
    fraction: float
    resumed_from: int | str | None  # "finished": the kill came after the output was written (not a resume)
    differing: int  # tensors not bit-identical to the uninterrupted run
    seconds: float


def run_trial(
    index: int,
    method: str,
    rng: random.Random,
    workdir: Path,
    model: Path,
    data: Path,
    reference: dict,
    store_root: str,
    env: dict[str, str] | None = None,
) -> Trial:
    started = time.perf_counter()
    out = workdir / f"trial-{index}"
    argv = train_argv(method, model, data, out, f"{store_root.rstrip('/')}/trial-{index}")
    after, fraction = rng.randint(1, LAST_KILL), rng.random()
    published = kill_during_training(argv, after, fraction, env)
    finished = out.exists()  # on a loaded machine the kill can land after the output was written
    if not finished:
        train_to_end(argv, env)
    resumed = json.loads((out / "train_metrics.json").read_text())["resumed_from_step"]
    diff = differing(reference, final_tensors(out))
    return Trial(
        index,
        method,
        "s3" if store_root.startswith("s3://") else "local",
        published,
        round(fraction, 2),
        "finished" if finished else resumed,
        len(diff),
        round(time.perf_counter() - started, 1),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seeds where each kill lands")
    p.add_argument("--methods", default="lora,full", help="comma list of lora, full; trials cycle through them")
    p.add_argument(
        "--s3", action="store_true", help="checkpoints to S3 (a private SeaweedFS + MLflow stack) instead of a folder"
    )
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    sys.path.insert(0, str(REPO))
    from kftune.dev.sample_data import write_samples
    from kftune.dev.tiny_model import build_tiny_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kftune-soak-") as tmp, contextlib.ExitStack() as cleanup:
        work = Path(tmp)
        env, store_root = None, str(work / "checkpoints")
        if args.s3:  # a private stack on free ports, stopped at the end
            from kftune.dev.stack import StackConfig, down, free_ports, up

            s3_port, mlflow_port = free_ports(2)
            info = up(StackConfig(work / "stack", s3_port, mlflow_port, bucket="kftune-soak"))
            cleanup.callback(down, info.state_dir)
            env, store_root = info.env(), f"s3://{info.bucket}/checkpoints"
        model = build_tiny_model(
            work / "model",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=1024,
        )
        data = write_samples(work / "train.jsonl", rows=24, seed=1)
        references = {}
        for method in methods:
            train_to_end(train_argv(method, model, data, work / f"reference-{method}"))
            references[method] = final_tensors(work / f"reference-{method}")
        print(
            f"{'trial':>5}  {'method':<6} {'store':<5} {'killed after':>12} {'at':>5} {'resumed from':>12} "
            f"{'bit-identical':>13} {'seconds':>8}",
            flush=True,
        )
        trials = []
        for i in range(args.trials):
            method = methods[i % len(methods)]
            t = run_trial(i, method, rng, work, model, data, references[method], store_root, env)
            trials.append(t)
            print(
                f"{t.index:>5}  {t.method:<6} {t.store:<5} {t.killed_after:>12} {t.fraction:>5} {t.resumed_from!s:>12} "
                f"{'yes' if not t.differing else f'NO ({t.differing})':>13} {t.seconds:>8}",
                flush=True,
            )
    resumed = [t for t in trials if isinstance(t.resumed_from, int)]
    good = [t for t in resumed if not t.differing]
    bad = [t for t in trials if t.differing or t.resumed_from is None]
    print(
        f"{len(good)}/{len(resumed)} resumed trials ended bit-identical to the uninterrupted run"
        f" ({len(trials) - len(resumed)} kills came after the output was written)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
