"""Training on more than one node: the train step's path when `train_nodes > 1`.

The step writes the training config to S3 as an artifact, then starts `torchrun -m kftune.cli train
--config_file <its s3 uri>` on every node: on a cluster as a Kubeflow Trainer TrainJob (kftune.train.trainjob,
which sets torchrun's PET_* variables), here on two network-namespace hosts (kftune.dev.hosts, restarted
together as the TrainJob's JobSet would). The world's rank 0 uploads the output and names it in
`<artifact_root>/trainjobs/<job>/published.json`; the step reads that back, so what it returns is the same
contract as one node's. Checkpoints go where one node's go, so a retried step resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kftune.core.cluster import SECRETS, in_cluster
from kftune.core.errors import KftuneError
from kftune.core.storage import upload_file
from kftune.train.config import FIELDS
from kftune.train.handback import Published, read_published

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig

REHEARSAL_RESTARTS = 3  # as the runtime's failurePolicy.maxRestarts (k8s/base/trainingruntime.yaml)
REHEARSAL_TIMEOUT_S = 3 * 3600


def job_config(cfg: TrainConfig, prefix: str) -> TrainConfig:
    """The config every node reads: output in the node's own working folder, handed back under `prefix`."""
    return dataclasses.replace(cfg, output_dir="model", overwrite_output_dir=True, publish_to=prefix)


def upload_config(cfg: TrainConfig, prefix: str) -> str:
    """The config as a one-file artifact (only keys that differ from the defaults); its s3:// URI."""
    values = {k: v for k, v in cfg.to_dict().items() if v != FIELDS[k].default}
    with tempfile.TemporaryDirectory(prefix="kftune-job-") as tmp:
        path = Path(tmp, "train_config.json")
        path.write_text(json.dumps(values, ensure_ascii=False, indent=2), encoding="utf-8")
        return upload_file(path, f"{prefix}/config").uri


def train_across_nodes(
    cfg: TrainConfig,
    nodes: int,
    gpus_per_node: int,
    artifact_root: str,
    job_name: str,
    placement: Mapping[str, Any],
    image: str,
) -> Published:
    """Train `cfg` on `nodes` nodes x `gpus_per_node` processes and return what rank 0 published.

    placement: the step's dsl.TaskConfig as a dict (affinity, tolerations, node_selector, env, volumes,
    volume_mounts, resources; Kubernetes JSON), empty under kfp.local. image: the TrainJob's image.
    """
    prefix = f"{artifact_root.rstrip('/')}/trainjobs/{job_name}"
    config_uri = upload_config(job_config(cfg, prefix), prefix)
    argv = ["-m", "kftune.cli", "train", "--config_file", config_uri]
    if in_cluster():
        from kftune.train import trainjob, trainjob_api

        spec = job_spec(argv, nodes, gpus_per_node, job_name, placement, image, trainjob_api.own_namespace())
        trainjob_api.run(trainjob.render(spec))
    else:
        rehearse(argv, nodes, gpus_per_node, prefix)
    return read_published(prefix)


def job_spec(
    argv: list[str],
    nodes: int,
    gpus_per_node: int,
    job_name: str,
    placement: Mapping[str, Any],
    image: str,
    namespace: str,
):
    """The TrainJob of this training: torchrun on every node (it reads the PET_* variables the Trainer sets)."""
    from kftune.train.trainjob import TrainJobSpec

    return TrainJobSpec(
        name=job_name,
        namespace=namespace,
        image=image,
        command=["torchrun", *argv],
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        placement=placement,
        secrets=SECRETS,
    )


def rehearse(argv: list[str], nodes: int, gpus_per_node: int, prefix: str) -> None:
    """Run the job's nodes here: two network-namespace hosts when root can make them, else one node (said once)."""
    import torch

    from kftune.dev import hosts
    from kftune.dev.gang import Gang
    from kftune.train.handback import forget

    if nodes > 2:
        raise KftuneError(
            f"train_nodes {nodes}: a local run rehearses at most 2 nodes (two network-namespace hosts); "
            "submit to a cluster with the Kubeflow Trainer for more"
        )
    procs = gpus_per_node if torch.cuda.is_available() else 1
    forget(prefix)  # a pointer left by an earlier run of this job name must not be read as this one's
    why = hosts.unavailable()
    with tempfile.TemporaryDirectory(prefix="kftune-nodes-") as tmp, contextlib.ExitStack() as held:
        if why:
            print(f"[kftune] train_nodes {nodes}: {why}, so this local run trains on one node", flush=True)
            members, env = [hosts.Host(0, None, "127.0.0.1", "lo")], None
        else:
            members = list(held.enter_context(hosts.two_hosts()))
            env = held.enter_context(hosts.s3_relay(members[0]))
            print(f"[kftune] train_nodes 2: on two hosts, {members[0].address} and {members[1].address}", flush=True)
        gang = Gang(members, argv, Path(tmp), procs, REHEARSAL_RESTARTS, env=env)
        attempt = gang.run(REHEARSAL_TIMEOUT_S)
        if attempt.failed_node is not None:
            tail = attempt.logs[max(attempt.failed_node, 0)].read_text(errors="replace").strip().splitlines()[-1:]
            raise KftuneError(
                f"multi-node training failed after {len(gang.attempts)} attempt(s): node {attempt.failed_node} "
                f"exited with {attempt.codes}; its last line: {tail[0] if tail else '(none)'}"
            )
