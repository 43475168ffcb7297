"""Checkpoints that outlive the process: each one is published as it is saved; a restart resumes from the newest complete one.

A run's checkpoints live under `<checkpoint_uri>/<run key>/checkpoint-<step>/<sha256>/`, in the
content-addressed form of every kftune artifact (see kftune.core.storage): MANIFEST.json is written last
and names the folder by its own sha256. "Complete" means the same in S3 and in a local folder: the
manifest exists, hashes to its folder name, and every file matches it. A folder cut short or
altered is skipped, with a warning, for the next older one.

The run key hashes every training setting and the data's bytes (not where they are), so a restart
of the same run (a KFP retry, the same command again) finds its checkpoints without being told,
and a run with other settings never resumes from them.

Before the Trainer unpickles anything (optimizer, scheduler, RNG states), every pickle in the
checkpoint must load with `torch.load(weights_only=True)`: a crafted file is refused before any of
its code can run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from kftune.core.atomic import building
from kftune.core.errors import KftuneError
from kftune.core.storage import (
    MANIFEST,
    S3,
    canonical_json,
    connect_s3,
    delete_tree,
    download_dir,
    list_artifacts,
    resolve_path,
    sha256_file,
    tree_manifest,
    upload_dir,
)
from kftune.train.nodes import gather_to_rank_zero

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig

log = logging.getLogger("kftune")

KEEP = 2  # complete checkpoints kept in the store, as the Trainer keeps locally (save_total_limit)
# settings that say where things are or how memory is managed, not what is trained: they may change between
# a run and its restart (the memory pre-flight turns checkpointing on where a retry lands on a smaller GPU)
NOT_IN_RUN_KEY = (
    "data_path",
    "eval_data_path",
    "output_dir",
    "overwrite_output_dir",
    "checkpoint_uri",
    "force",
    "gradient_checkpointing",
    "ddp_timeout",
    "publish_to",
)
NOT_PUBLISHED = ("training_args.bin",)  # a pickled TrainingArguments object: never read on resume
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLED_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")  # the Trainer's fallback when safetensors are absent
_LOCATION = re.compile(r"checkpoint-(\d+)(/[0-9a-f]{64})?$")  # a store folder, or its download


def run_key(cfg: TrainConfig) -> str:
    """16 hex digits naming one training run: its settings but NOT_IN_RUN_KEY, and its data's sha256."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_RUN_KEY}
    values["data_sha256"] = sha256_file(resolve_path(cfg.data_path))
    if cfg.eval_data_path:
        values["eval_data_sha256"] = sha256_file(resolve_path(cfg.eval_data_path))
    if cfg.data_mix:  # the mixed-in sources' bytes too, not only their uris
        from kftune.data.mixing import parse
        from kftune.data.streaming import fetch

        values["data_mix_sha256"] = [sha256_file(fetch(s.uri)) for s in parse(cfg.data_mix)]
    return hashlib.sha256(canonical_json(values)).hexdigest()[:16]


def step_of(location: str | Path) -> int | None:
    match = _LOCATION.search(str(location).replace("\\", "/"))
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Store:
    """One run's checkpoints: an s3:// prefix (with its client) or a local folder, same layout."""

    root: str
    s3: S3 | None = None

    @classmethod
    def for_run(cls, cfg: TrainConfig) -> Store:
        uri = cfg.checkpoint_uri
        if uri.startswith("s3://"):
            return cls(f"{uri.rstrip('/')}/{run_key(cfg)}", connect_s3())
        return cls(str(Path(uri).expanduser() / run_key(cfg)))

    def listed(self) -> list[tuple[int, str]]:
        """(step, location) of every checkpoint with a manifest, newest first; not yet verified."""
        if self.s3:
            locations = list_artifacts(self.root, self.s3)
        else:
            locations = [str(m.parent) for m in Path(self.root).glob(f"checkpoint-*/*/{MANIFEST}")]
        found = [(step, loc) for loc in locations if (step := step_of(loc)) is not None]
        return sorted(found, reverse=True)

    def publish(self, folder: Path) -> str:
        """Copy a saved checkpoint-N folder into the store, manifest last; return its location."""
        if self.s3:
            return upload_dir(folder, f"{self.root}/{folder.name}", self.s3).uri
        body = canonical_json(tree_manifest(folder))
        target = Path(self.root, folder.name, hashlib.sha256(body).hexdigest())
        if not verified_copy(target):
            with building(target) as staging:
                shutil.copytree(folder, staging, dirs_exist_ok=True)
                (staging / MANIFEST).write_bytes(body)
        return str(target)

    def fetch(self, location: str, into: Path) -> Path:
        """A verified local folder for `location`; KftuneError if it is incomplete or altered."""
        if self.s3:
            return download_dir(location, into / f"checkpoint-{step_of(location)}", self.s3)
        if not verified_copy(Path(location)):
            raise KftuneError(f"{location}: its files do not match {MANIFEST}")
        return Path(location)

    def remove(self, step: int) -> None:
        """Delete every copy of checkpoint-`step`, manifests first."""
        where = f"{self.root}/checkpoint-{step}"
        if self.s3:
            delete_tree(where, self.s3)
            return
        for manifest in Path(where).glob(f"*/{MANIFEST}"):
            manifest.unlink()
        shutil.rmtree(where, ignore_errors=True)

    def prune(self, keep: int = KEEP) -> None:
        for step in sorted({step for step, _ in self.listed()}, reverse=True)[keep:]:
            self.remove(step)

    def clear(self) -> None:
        """Drop the run's checkpoints once its output is safely written."""
        if self.s3:
            delete_tree(self.root, self.s3)
        else:
            for manifest in Path(self.root).glob(f"checkpoint-*/*/{MANIFEST}"):
                manifest.unlink()
            shutil.rmtree(self.root, ignore_errors=True)

    def latest(self, into: Path) -> Path | None:
        """The newest complete checkpoint as a local folder (downloaded into `into` from S3), or None."""
        for step, location in self.listed():
            try:
                local = self.fetch(location, into)
            except KftuneError as exc:
                log.warning("checkpoint at step %d is incomplete or altered, skipped: %s", step, exc)
                continue
            check_safe_to_load(local)
            log.info("resuming from checkpoint %s (step %d)", location, step)
            return local
        log.info("no complete checkpoint under %s: training from step 0", self.root)
        return None


def verified_copy(folder: Path) -> bool:
    """True when `folder` holds exactly the files its manifest lists, and the manifest hashes to the folder's name."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    body = manifest.read_bytes()
    if hashlib.sha256(body).hexdigest() != folder.name:
        return False
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p != manifest}
    listed = canonical_json({rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()})
    return listed == canonical_json(json.loads(body))


def check_safe_to_load(folder: Path) -> None:
    """Refuse a checkpoint holding pickled weights or a pickle that would run code, before the Trainer reads any.

    `torch.load(weights_only=True)` allows tensors, containers and plain values (plus the numpy
    types the Trainer's RNG state needs), and refuses any other global before calling it.
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(folder.rglob("*")):
        if path.name in PICKLED_WEIGHTS:
            raise KftuneError(
                f"{path}: the checkpoint's weights are a pickle; kftune resumes only from safetensors "
                "weights. Remove this checkpoint from checkpoint_uri or use another checkpoint_uri"
            )
        if path.suffix not in PICKLE_SUFFIXES or not path.is_file():
            continue
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError for a refused global; anything else that cannot load safely
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise KftuneError(
                f"{path}: refusing to resume: this checkpoint file is not plain tensors and values ({reason}); "
                "it may have been crafted to run code. Remove the checkpoint from checkpoint_uri or use another one"
            ) from None


class PublishCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N, process zero publishes it to the store and drops the oldest.

    Every rank's files reach rank 0's copy first (kftune.train.nodes.gather_to_rank_zero: on several nodes
    each holds its own). The upload runs beside training, from a hard-linked snapshot the Trainer's rotation
    cannot delete, one upload at a time and in order: the other ranks never wait on it inside a collective,
    where a slow upload would run into ddp_timeout. What the store holds is always a state the run reached.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: threading.Thread | None = None
        self.failure: BaseException | None = None

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its RNG state into its node's folder
            gather_to_rank_zero(folder)
        # the last step's checkpoint would be cleared as soon as the output is written: not worth an upload
        if state.is_world_process_zero and state.global_step < state.max_steps:
            for name in NOT_PUBLISHED:
                (folder / name).unlink(missing_ok=True)
            self.wait()
            snapshot = folder.parent / f".publishing-{folder.name}" / folder.name
            shutil.rmtree(snapshot.parent, ignore_errors=True)
            shutil.copytree(folder, snapshot, copy_function=os.link)
            self.pending = threading.Thread(target=self._publish, args=(snapshot, state.global_step), daemon=True)
            self.pending.start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()
        return control

    def wait(self) -> None:
        """Block until the upload in flight is done; raise its failure here, in the training thread."""
        if self.pending:
            self.pending.join()
            self.pending = None
        if self.failure:
            failure, self.failure = self.failure, None
            raise KftuneError(f"publishing a checkpoint to {self.store.root} failed: {failure}") from failure

    def _publish(self, snapshot: Path, step: int) -> None:
        try:
            location = self.store.publish(snapshot)
            self.store.prune()
            log.info("checkpoint %d published to %s", step, location)
        except BaseException as exc:  # handed to the training thread by wait()
            self.failure = exc
        finally:
            shutil.rmtree(snapshot.parent, ignore_errors=True)
