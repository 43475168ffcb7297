"""`kftune launch [--num-processes N] [--fsdp] TRAIN ARGS...`: the training command, one process per GPU.

Re-executes `kftune train` under `accelerate launch`: data-parallel (DDP) by default, FSDP (full
shard, one wrap per transformer block) with --fsdp. Each process trains on its share of every
batch; only the world's process zero writes and publishes the output folder (see train.run).
With one GPU (or --num-processes 1) it is plain `kftune train` in this process. Without a GPU,
--num-processes N > 1 runs N CPU processes over gloo: what the tests use.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from kftune.errors import KftuneError


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(train_argv: list[str], num_processes: int, fsdp: bool = False) -> list[str]:
    """The `accelerate launch` command line for `num_processes` processes on this node."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    # accelerate's own --cpu launches one process (several need mpirun): its multi-GPU launcher (torchrun)
    # also starts N CPU processes, which the Trainer joins over gloo when it trains on the CPU
    cmd += ["--multi_gpu"]
    if fsdp:
        cmd += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    return cmd + ["--module", "kftune.cli", "train", *train_argv]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kftune launch", description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", "--num_processes", type=int, default=None,
                        help="processes on this node (default: one per GPU, else 1)")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP)")
    args, train_argv = parser.parse_known_args(argv)
    gpus = gpu_count()
    n = max(gpus, 1) if args.num_processes is None else args.num_processes
    if n < 1:
        raise KftuneError(f"--num-processes {n}: give 1 or more")
    if gpus and n > gpus:
        raise KftuneError(f"--num-processes {n}: this node has {gpus} GPU(s); give at most {gpus}")
    if n == 1 and not args.fsdp:
        from kftune.train import main as train_main

        return train_main(train_argv)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return subprocess.run(command(train_argv, n, args.fsdp), env=env).returncode
