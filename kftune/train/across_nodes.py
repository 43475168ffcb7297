"""Training on more than one node: the train step's path when `train_nodes > 1`.

The step writes the training config to S3, then starts `torchrun -m kftune.cli train --config_file <s3 uri>`
on every node: on a cluster as a Kubeflow Trainer TrainJob (kftune.train.trainjob), locally on network-namespace
hosts (kftune.dev.hosts). The world's rank 0 uploads the output and a result file; the step reads the result
back, so what it returns is the same contract as one node's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kftune.train.config import TrainConfig


@dataclass(frozen=True)
class Published:
    """What rank 0 uploaded: the output folder's artifact and its train_metrics.json."""

    uri: str
    sha256: str
    metrics: dict[str, Any]


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
    raise NotImplementedError("in progress (issue 23)")
