"""The Kubeflow Trainer (v2.3) TrainJob that trains on several nodes: its name and its manifest. Pure: no I/O.

The job runs on the namespaced TrainingRuntime `kftune-torch` (k8s/base/trainingruntime.yaml), which holds what
every job shares (the JobSet, restarts, /dev/shm, the security context, the cache volume). The TrainJob adds what
this run decides: image, command, node and process counts, resources, credentials, placement and a deadline. The
Trainer's torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, and
`torchrun` reads them. `make k8s-check` validates what render() makes against the vendored v2.3.0 CRD
(k8s/third-party/kubeflow-trainer-v2.3.0/); kftune.train.trainjob_api creates, follows and deletes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kftune.core.cluster import GPU_NODE_LABEL, GPU_RESOURCE
from kftune.core.errors import KftuneError

API_GROUP = "trainer.kubeflow.org"
API_VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "kftune-torch"
NODE_JOB = "node"  # the runtime's replicated job and its container: the Trainer requires both names
PATCH_MANAGER = "kftune.io/train-step"  # who owns the runtime patch (a domain-prefixed path, as the Trainer asks)
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Per node when the step's placement names none: the same as one node's training task (pipelines/finetune.py).
DEFAULT_RESOURCES = {"requests": {"cpu": "4", "memory": "32G"}, "limits": {"cpu": "8", "memory": "64G"}}
DEFAULT_DEADLINE_SECONDS = 7 * 24 * 3600
# JobSet names pods <name>-node-<job>-<index>-<5 random>, each at most 63 characters: 40 leaves room for 10^5 nodes.
MAX_NAME = 40
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035 label, as the TrainJob CRD requires


def job_name(run: str, task: str) -> str:
    """The TrainJob's name for this run's task: the same for a retry of the step, so the retry adopts the job.

    A readable part (the task and the run id's start) plus a hash of both; `task` must tell apart every training
    task of the run (a ParallelFor iteration included), else two tasks would share one job.
    """
    if not run or not task:
        raise KftuneError(f"job_name needs a pipeline run id and a task name, got run={run!r} task={task!r}")
    digest = hashlib.sha256(f"{run}\0{task}".encode("utf-8", "surrogatepass")).hexdigest()[:10]
    readable = [_slug(task)[:12], _slug(run)[:8]]
    return "-".join(["kftune", *(part for part in readable if part), digest])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class TrainJobSpec:
    """What one multi-node training run asks of the cluster.

    command: the node container's command, e.g. ["torchrun", "-m", "kftune.cli", "train", "--config_file", uri].
    gpus_per_node: GPUs and processes per node; 0 trains on CPU nodes, one process each.
    placement: the step's kfp.dsl.TaskConfig as a dict (dataclasses.asdict): affinity, tolerations, node_selector,
        env, volumes, volume_mounts, resources, as Kubernetes JSON; None or empty where unset (always under kfp.local).
    secrets: Secret name -> {key in the Secret: environment variable} (pipelines/finetune.py's SECRETS).
    env: further environment variables; they win over placement's and the Secrets' of the same name.
    """

    name: str
    namespace: str
    image: str
    command: list[str]
    nodes: int
    gpus_per_node: int
    placement: Mapping[str, Any]
    secrets: Mapping[str, Mapping[str, str]]
    env: Mapping[str, str] = field(default_factory=dict)
    active_deadline_seconds: int = DEFAULT_DEADLINE_SECONDS
    runtime: str = RUNTIME

    def __post_init__(self) -> None:
        problems = []
        if not (_NAME.match(self.name) and len(self.name) <= MAX_NAME):
            problems.append(f"name {self.name!r} must be a DNS-1035 label of at most {MAX_NAME} characters (job_name)")
        if self.nodes < 1:
            problems.append(f"nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            problems.append(f"gpus_per_node must be 0 (CPU nodes) or more, got {self.gpus_per_node}")
        if self.active_deadline_seconds < 1:
            problems.append(f"active_deadline_seconds must be positive, got {self.active_deadline_seconds}")
        if not self.command:
            problems.append("command is empty: give the node's command, e.g. torchrun -m kftune.cli train ...")
        if not self.image or not self.namespace:
            problems.append("image and namespace must be set")
        if problems:
            raise KftuneError("TrainJobSpec: " + "; ".join(problems))


def render(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob manifest (trainer.kubeflow.org/v1alpha1) for `spec`."""
    placement = {key: value for key, value in spec.placement.items() if value}
    processes = max(spec.gpus_per_node, 1)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "kftune", "app.kubernetes.io/component": "training"},
        },
        "spec": {
            "runtimeRef": {"apiGroup": API_GROUP, "kind": "TrainingRuntime", "name": spec.runtime},
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "trainer": {
                "image": spec.image,
                "command": list(spec.command),
                "numNodes": spec.nodes,
                "numProcPerNode": processes,
                "resourcesPerNode": _resources(placement.get("resources") or {}, spec.gpus_per_node),
                "env": _env(spec.secrets, placement.get("env") or [], spec.env),
            },
            "runtimePatches": [
                {"manager": PATCH_MANAGER, "trainingRuntimeSpec": _patch(placement, spec.gpus_per_node)}
            ],
        },
    }


def _resources(placed: Mapping[str, Any], gpus: int) -> dict[str, dict[str, str]]:
    """cpu and memory from the placement where it names them (request and limit together), else the defaults;
    the GPU count is gpus_per_node's alone (a GPU limit in the placement is the launching step's, not the nodes')."""
    out: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    names = {name for kind in out for name in placed.get(kind) or {}} | {"cpu", "memory"}
    for name in sorted(names - {GPU_RESOURCE}):
        source = placed if any(name in (placed.get(kind) or {}) for kind in out) else DEFAULT_RESOURCES
        for kind in out:
            if name in (source.get(kind) or {}):
                out[kind][name] = str(source[kind][name])
    if gpus:
        out["limits"][GPU_RESOURCE] = str(gpus)
    return out


def _env(secrets: Mapping[str, Mapping[str, str]], placed: list[dict[str, Any]], extra: Mapping[str, str]) -> list:
    """The Secrets' keys as variables, then the placement's, then `extra`; a later one of the same name wins."""
    merged: dict[str, dict[str, Any]] = {}
    for secret, keys in secrets.items():
        for key, var in keys.items():
            merged[var] = {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
    for var in placed:
        merged[var["name"]] = dict(var)
    for name, value in extra.items():
        merged[name] = {"name": name, "value": str(value)}
    if reserved := sorted(name for name in merged if name.startswith("PET_")):
        raise KftuneError(
            f"TrainJob env sets {', '.join(reserved)}: the Trainer sets torchrun's PET_* variables itself and refuses "
            "a TrainJob that sets them; remove them from the step's env"
        )
    return list(merged.values())


def _patch(placement: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """The node pods' placement as a runtime patch: the GPU node selector and toleration, then the step's own."""
    node_selector = dict([GPU_NODE_LABEL]) if gpus else {}
    node_selector.update(placement.get("node_selector") or {})
    tolerations = [GPU_TOLERATION] if gpus else []
    tolerations += [t for t in placement.get("tolerations") or [] if t not in tolerations]
    pod: dict[str, Any] = {}
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    if placement.get("affinity"):
        pod["affinity"] = placement["affinity"]
    if placement.get("volumes"):
        pod["volumes"] = list(placement["volumes"])
    if placement.get("volume_mounts"):
        pod["containers"] = [{"name": NODE_JOB, "volumeMounts": list(placement["volume_mounts"])}]
    job = {"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}
    return {"template": {"spec": {"replicatedJobs": [job]}}}
