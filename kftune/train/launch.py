"""`kftune launch [--num-processes N] [--fsdp] TRAIN ARGS...`: the training command, one process per GPU.

Re-executes `kftune train` under `accelerate launch`: data-parallel (DDP) by default, FSDP (full
shard, one wrap per transformer block) with --fsdp. Each process trains on its share of every
batch; only the world's process zero writes and publishes the output folder (see train.run).
With one GPU (or --num-processes 1) it is plain `kftune train` in this process. Without a GPU,
--num-processes N > 1 runs N CPU processes over gloo: what the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kftune.core import artifacts
from kftune.core.errors import KftuneError
from kftune.dev.processes import free_ports
from kftune.train.config import FIELDS
from kftune.train.training import TrainResult, run
from kftune.train.training import main as train_main

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig
    from kftune.train.training import TrainResult


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def command(train_argv: list[str], num_processes: int, fsdp: bool = False) -> list[str]:
    """The `accelerate launch` command line for `num_processes` processes on this node."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_ports(1)[0]),
    ]
    # accelerate's own --cpu launches one process (several need mpirun): its multi-GPU launcher (torchrun)
    # also starts N CPU processes, which the Trainer joins over gloo when it trains on the CPU
    cmd += ["--multi_gpu"]
    if fsdp:
        cmd += [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
        ]
    return cmd + ["--module", "kftune.cli", "train", *train_argv]


def _env(num_processes: int, gpus: int) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def train_on_node(cfg: TrainConfig, num_processes: int = 0, fsdp: bool = False) -> TrainResult:
    """Train `cfg` with one process per GPU of this node (`num_processes` 0), or as many as asked.

    The pipeline's training step calls this: with one process it trains in this process, with more
    it re-executes the training command under `accelerate launch` and reads back what it wrote.
    """
    gpus = gpu_count()
    n = num_processes or max(gpus, 1)
    if n == 1 and not fsdp:
        return run(cfg)
    out = Path(cfg.output_dir)
    config_file = out.parent / f".{out.name}.launch-{artifacts.CONFIG}"
    # only the keys that differ from the defaults, so a full run does not read as "LoRA keys without LoRA"
    values = {k: v for k, v in cfg.to_dict().items() if v != FIELDS[k].default}
    config_file.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")
    try:
        code = subprocess.run(command(["--config_file", str(config_file)], n, fsdp), env=_env(n, gpus)).returncode
    finally:
        config_file.unlink(missing_ok=True)
    if code:
        raise KftuneError(
            f"training with {n} processes under accelerate launch failed (exit code {code}); see the log above"
        )
    return TrainResult(out, json.loads((out / artifacts.TRAIN_METRICS).read_text(encoding="utf-8")))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kftune launch", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-processes",
        "--num_processes",
        type=int,
        default=None,
        help="processes on this node (default: one per GPU, else 1)",
    )
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP)")
    args, train_argv = parser.parse_known_args(argv)
    gpus = gpu_count()
    n = max(gpus, 1) if args.num_processes is None else args.num_processes
    if n < 1:
        raise KftuneError(f"--num-processes {n}: give 1 or more")
    if gpus and n > gpus:
        raise KftuneError(f"--num-processes {n}: this node has {gpus} GPU(s); give at most {gpus}")
    if n == 1 and not args.fsdp:
        return train_main(train_argv)
    return subprocess.run(command(train_argv, n, args.fsdp), env=_env(n, gpus)).returncode
