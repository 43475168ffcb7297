"""`kftune launch [--num-processes N] [--nnodes N --node-rank R --master-addr A --master-port P] TRAIN ARGS...`

Re-executes `kftune train` under torchrun, one process per GPU of this node. The training picks the parallelism
itself (kftune.train.training.sft_config): DDP for LoRA and QLoRA, FSDP (full shard, one unit per transformer
block) for full fine-tuning. Only the world's process zero writes and publishes the output.

Across nodes, run it on every node with the same --nnodes, --master-addr and --master-port and each node's own
--node-rank; or let the variables the Kubeflow Trainer sets for torchrun give them (PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT; flags win). Several nodes never get a random port: every node must name the
same one (torchrun's 29500 unless given). One node with one process is plain `kftune train` in this process.
Without a GPU, --num-processes N > 1 runs N CPU processes over gloo: what the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kftune.core import artifacts
from kftune.core.errors import KftuneError
from kftune.train.config import FIELDS
from kftune.train.training import TrainResult, run
from kftune.train.training import main as train_main

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig

DEFAULT_MASTER_PORT = 29500  # torchrun's own default


@dataclass(frozen=True)
class World:
    """Where this node's processes join: node count, this node's rank, and the rank-0 node's address."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def command(train_argv: list[str], num_processes: int, world: World = World()) -> list[str]:
    """The torchrun command line for `num_processes` processes on this node of `world`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_processes)]
    if world.nnodes == 1:
        cmd += ["--standalone"]  # torchrun finds a free port on this machine itself
    else:
        cmd += [
            "--nnodes",
            str(world.nnodes),
            "--node-rank",
            str(world.node_rank),
            "--master-addr",
            str(world.master_addr),
            "--master-port",
            str(world.master_port),
        ]
    return cmd + ["-m", "kftune.cli", "train", *train_argv]


def _env(num_processes: int, gpus: int) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def train_on_node(cfg: TrainConfig, num_processes: int = 0) -> TrainResult:
    """Train `cfg` with one process per GPU of this node (`num_processes` 0), or as many as asked.

    The pipeline's one-node training step calls this: with one process it trains in this process, with more
    it re-executes the training command under torchrun and reads back what it wrote.
    """
    gpus = gpu_count()
    n = num_processes or max(gpus, 1)
    if n == 1:
        return run(cfg)
    out = Path(cfg.output_dir)
    config_file = out.parent / f".{out.name}.launch-{artifacts.CONFIG}"
    # only the keys that differ from the defaults, so a full run does not read as "LoRA keys without LoRA"
    values = {k: v for k, v in cfg.to_dict().items() if v != FIELDS[k].default}
    config_file.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")
    try:
        code = subprocess.run(command(["--config_file", str(config_file)], n), env=_env(n, gpus)).returncode
    finally:
        config_file.unlink(missing_ok=True)
    if code:
        raise KftuneError(f"training with {n} processes under torchrun failed (exit code {code}); see the log above")
    return TrainResult(out, json.loads((out / artifacts.TRAIN_METRICS).read_text(encoding="utf-8")))


def world_from(args: argparse.Namespace, env: dict[str, str]) -> World:
    """The node's world from the flags, else the PET_* variables, else one node; a clear error when incomplete."""

    def pick(flag: str, var: str) -> str | None:
        value = getattr(args, flag)
        return str(value) if value is not None else env.get(var)

    try:
        nnodes = int(pick("nnodes", "PET_NNODES") or 1)
        node_rank = int(pick("node_rank", "PET_NODE_RANK") or 0)
        port = int(pick("master_port", "PET_MASTER_PORT") or DEFAULT_MASTER_PORT)
    except ValueError as exc:
        raise KftuneError(f"--nnodes, --node-rank and --master-port (or PET_*) take whole numbers: {exc}") from None
    addr = pick("master_addr", "PET_MASTER_ADDR")
    if nnodes < 1:
        raise KftuneError(f"--nnodes {nnodes}: give 1 or more")
    if not 0 <= node_rank < nnodes:
        raise KftuneError(
            f"--node-rank {node_rank}: give 0 to {nnodes - 1} (one per node; node 0 hosts the rendezvous)"
        )
    if nnodes > 1 and not addr:
        raise KftuneError(
            f"--nnodes {nnodes}: give --master-addr (or PET_MASTER_ADDR), the address of node 0 that every node reaches"
        )
    return World(nnodes, node_rank, addr, port)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kftune launch", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-processes",
        "--num_processes",
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes on this node (default: PET_NPROC_PER_NODE, else one per GPU, else 1)",
    )
    parser.add_argument("--nnodes", type=int, help="nodes in the job (default: PET_NNODES, else 1)")
    parser.add_argument("--node-rank", type=int, help="this node's rank, 0 to nnodes-1 (default: PET_NODE_RANK)")
    parser.add_argument("--master-addr", help="node 0's address, reachable from every node (default: PET_MASTER_ADDR)")
    parser.add_argument(
        "--master-port", type=int, help="node 0's rendezvous port (default: PET_MASTER_PORT, else 29500)"
    )
    args, train_argv = parser.parse_known_args(argv)
    world = world_from(args, dict(os.environ))
    gpus = gpu_count()
    from_env = os.environ.get("PET_NPROC_PER_NODE", "")
    n = args.num_processes if args.num_processes is not None else int(from_env) if from_env.isdigit() else max(gpus, 1)
    if n < 1:
        raise KftuneError(f"--num-processes {n}: give 1 or more")
    if gpus and n > gpus:
        raise KftuneError(f"--num-processes {n}: this node has {gpus} GPU(s); give at most {gpus}")
    if n == 1 and world.nnodes == 1:
        return train_main(train_argv)
    return subprocess.run(command(train_argv, n, world), env=_env(n, gpus)).returncode
