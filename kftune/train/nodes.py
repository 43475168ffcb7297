"""What changes when training spans several nodes: who downloads, who writes, what a lost node looks like.

torchrun (started by the Kubeflow Trainer, by `kftune launch` or by the rehearsal in kftune.dev.hosts) sets
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and GROUP_RANK (the node's rank), and numbers ranks node by
node. Each node has its own disk, so a checkpoint is downloaded once per node (by its local rank 0) and shared
with that node's other ranks; and the files a node's ranks write into their copy of a checkpoint (each rank's
RNG state) are sent to the world's rank 0 before it publishes that checkpoint, so a resume on any node finds
every rank's state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kftune.core.errors import KftuneError

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig

# what torch raises when a peer is gone or silent (its class names, so nothing heavy is imported to check)
LOST_PEER_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError")
LOST_PEER_WORDS = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe", "peer")


@dataclass(frozen=True)
class Place:
    """This process's place in the world, from torchrun's variables (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    host: str = ""

    @classmethod
    def from_env(cls) -> Place:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("GROUP_RANK", env.get("PET_NODE_RANK", 0))),
            env.get("KFTUNE_NODE_NAME") or socket.gethostname(),
        )

    @property
    def node_leader(self) -> int:
        """The world rank of this node's local rank 0."""
        return self.rank - self.local_rank

    def describe(self) -> str:
        return f"node {self.node_rank} ({self.host}, rank {self.rank} of {self.world_size})"


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def once_per_node(fetch: Callable[[], Path | None]) -> Path | None:
    """Run `fetch` on each node's local rank 0 only; every rank gets its node's result (a local path or None).

    A failure on the leader is raised on every rank of the world, so no rank waits for a download that
    will never come.
    """
    dist, place = _group(), Place.from_env()
    if dist is None:
        return fetch()
    mine: tuple[str, str | None] = ("ok", None)
    if place.local_rank == 0:
        try:
            found = fetch()
            mine = ("ok", str(found) if found else None)
        except KftuneError as exc:
            mine = ("error", str(exc))
    everyone: list = [None] * place.world_size
    dist.all_gather_object(everyone, mine)
    for rank, (status, value) in enumerate(everyone):
        if status == "error":
            raise KftuneError(f"rank {rank}: {value}")
    path = everyone[place.node_leader][1]
    return Path(path) if path else None


def gather_to_rank_zero(folder: Path) -> list[str]:
    """Copy into rank 0's `folder` the files other nodes hold in theirs and rank 0 lacks; return their names.

    Called by every rank after each has written its part of a checkpoint: the RNG state of each rank (and
    any other per-rank file) then survives into what rank 0 publishes. Ranks on one node share the folder,
    so only each node's leader sends.
    """
    dist, place = _group(), Place.from_env()
    if dist is None:
        return []
    names: list = [sorted(_files(folder)) if place.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    extra: dict[str, bytes] = {}
    if place.rank != 0 and place.local_rank == 0:
        extra = {rel: (folder / rel).read_bytes() for rel in _files(folder) if rel not in set(names[0])}
    received: list | None = [None] * place.world_size if place.rank == 0 else None
    dist.gather_object(extra, received, dst=0)
    written: list[str] = []
    for files in received or []:
        for rel, body in (files or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(body)
            written.append(rel)
    return sorted(written)


def _files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def lost_peer(exc: BaseException, ddp_timeout: int) -> KftuneError | None:
    """One line naming this node when `exc` says another process stopped answering; None for anything else."""
    place = Place.from_env()
    if place.world_size < 2:
        return None
    text = str(exc).strip()
    if type(exc).__name__ not in LOST_PEER_ERRORS and not any(w in text.lower() for w in LOST_PEER_WORDS):
        return None
    first = text.splitlines()[0][:240] if text else type(exc).__name__
    return KftuneError(
        f"{place.describe()}: lost contact with the other training processes (a collective failed or "
        f"waited past ddp_timeout={ddp_timeout}s: {first}); the job fails so that it restarts from the last checkpoint"
    )


def local_data(cfg: TrainConfig) -> TrainConfig:
    """The config with s3:// data artifacts (a multi-node run's config names the split's) downloaded and named
    by path: verified, into this node's kftune cache."""
    from kftune.core.storage import resolve_path

    evaluation = resolve_path(cfg.eval_data_path) if cfg.eval_data_path else None
    return dataclasses.replace(cfg, data_path=resolve_path(cfg.data_path), eval_data_path=evaluation)


def count_tokens(model) -> Callable[[], int]:
    """Count the input tokens this process trains on (each node logs its own); returns the reader."""
    seen = [0]

    def hook(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and ids is not None:
            seen[0] += int(kwargs["attention_mask"].sum()) if kwargs.get("attention_mask") is not None else ids.numel()

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return lambda: seen[0]


def parallelism(method: str, device: str) -> str | None:
    """How several processes share the work: full fine-tuning shards weights, gradients and optimizer state
    (FSDP) on GPUs; LoRA and QLoRA keep a replica each (DDP), their trainable part being small. None: one process.

    accelerate shards only on accelerators: on CPU processes (gloo), full fine-tuning runs as replicas.
    """
    if Place.from_env().world_size < 2:
        return None
    if method != "full":
        return "ddp"
    if device == "cpu":
        logging.getLogger("kftune").info("full fine-tuning on CPU processes: replicas (DDP); FSDP shards on GPUs only")
        return "ddp"
    return "fsdp"


def join_cpu_group(ddp_timeout: int, device: str) -> None:
    """Join the process group over gloo with `ddp_timeout`, for CPU processes: transformers hands ddp_timeout
    to accelerate for GPUs only, so CPU processes would wait torch's default 30 minutes on a lost node."""
    import datetime

    import torch.distributed as dist

    if device == "cpu" and Place.from_env().world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=ddp_timeout))
