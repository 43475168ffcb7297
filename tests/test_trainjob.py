"""The multi-node train step's TrainJob: what render() makes of a TrainJobSpec, and how run() drives it.

run() is tested against tests/kube_standin.py, a local HTTP stand-in for the few Kubernetes API endpoints it calls:
no API server can run here. The stand-in keeps the API's paths, codes and shapes, JobSet's pod labels and the
Trainer's condition types, so a wrong label, path or condition name fails these tests as it would fail in a cluster.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kftune.core.errors import KftuneError
from kftune.train.trainjob import MAX_NAME, TrainJobSpec, job_name, render
from kftune.train.trainjob_api import run
from tests.kube_standin import JOBS, NAMESPACE, Cluster, StandIn, api_client, condition, node_pod

SECRETS = {"kftune-s3": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"}, "kftune-mlflow": {"PASSWORD": "MLFLOW_PASSWORD"}}
COMMAND = ["torchrun", "-m", "kftune.cli", "train", "--config_file", "s3://kftune/runs/r/train_config.json"]
EMPTY = dict.fromkeys(("affinity", "tolerations", "node_selector", "env", "volumes", "volume_mounts", "resources"))
REPO = Path(__file__).resolve().parents[1]
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def spec(nodes: int = 2, gpus: int = 1, placement: dict | None = None, **kw) -> TrainJobSpec:
    return TrainJobSpec(job_name("run-1", "train"), NAMESPACE, "registry.example/kftune-trainer:1", COMMAND, nodes,
                        gpus, EMPTY if placement is None else placement, SECRETS, **kw)  # fmt: skip


def pod_patch(job: dict) -> dict:
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


# --- names


def test_job_name_is_deterministic_and_tells_runs_and_tasks_apart():
    name = job_name("3c1d8b2e-5e7a-4f7e-9c55-0c0d3f6b8a21", "train")
    assert name == job_name("3c1d8b2e-5e7a-4f7e-9c55-0c0d3f6b8a21", "train")  # a retried step finds its job
    assert name.startswith("kftune-train-3c1d8b2e-")
    others = {job_name("3c1d8b2e-5e7a-4f7e-9c55-0c0d3f6b8a22", "train"), job_name(name, "train-2"),
              job_name("3c1d8b2e-5e7a-4f7e-9c55-0c0d3f6b8a21", "train-2")}  # fmt: skip
    assert name not in others and len(others) == 3
    with pytest.raises(KftuneError, match="run id and a task name"):
        job_name("", "train")


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_job_name_is_a_valid_name_for_any_run_and_task(run_id, task):
    name = job_name(run_id, task)
    # DNS-1035 as the TrainJob CRD asks; short enough that JobSet's pod names (<name>-node-0-<i>-xxxxx) fit in 63
    assert DNS1035.match(name) and len(name) <= MAX_NAME, name
    assert len(f"{name}-node-0-99999-abcde") <= 63


# --- render


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_render_on_gpu_nodes(nodes):
    job = render(spec(nodes=nodes, gpus=4))
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == job_name("run-1", "train") and job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": "kftune-torch"}  # fmt: skip
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "registry.example/kftune-trainer:1" and trainer["command"] == COMMAND
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"cpu", "memory"} <= set(trainer["resourcesPerNode"]["requests"])
    assert job["spec"]["activeDeadlineSeconds"] > 0
    pod = pod_patch(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_render_on_cpu_nodes_asks_for_no_gpu(nodes):
    job = render(spec(nodes=nodes, gpus=0))
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, 1)
    assert "nvidia" not in json.dumps(job)
    assert pod_patch(job) == {}


def test_the_secrets_reach_the_nodes_as_references_never_as_values():
    env = {e["name"]: e for e in render(spec())["spec"]["trainer"]["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "kftune-s3", "key": "AWS_ACCESS_KEY_ID"}}
    }  # fmt: skip
    assert env["MLFLOW_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kftune-mlflow", "key": "PASSWORD"}


def test_the_placement_is_merged():
    placement = {
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}],
        "node_selector": {"pool": "a100"},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "hf", "key": "token"}}}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        "volume_mounts": [{"name": "data", "mountPath": "/data"}],
        "resources": {"requests": {"cpu": "16", "memory": "100Gi", "ephemeral-storage": "50Gi"},
                      "limits": {"cpu": "32", "memory": "200Gi", "nvidia.com/gpu": "1"}},
    }  # fmt: skip
    job = render(spec(gpus=2, placement=placement, env={"NCCL_DEBUG": "WARN"}))
    resources = job["spec"]["trainer"]["resourcesPerNode"]
    assert resources == {"requests": {"cpu": "16", "ephemeral-storage": "50Gi", "memory": "100Gi"},
                         "limits": {"cpu": "32", "memory": "200Gi", "nvidia.com/gpu": "2"}}  # fmt: skip
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}  # the explicit env wins
    assert env["TOKEN"] == placement["env"][1] and "AWS_ACCESS_KEY_ID" in env
    pod = pod_patch(job)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert pod["tolerations"] == placement["tolerations"]  # the GPU toleration once
    assert pod["affinity"] == placement["affinity"] and pod["volumes"] == placement["volumes"]
    assert pod["containers"] == [{"name": "node", "volumeMounts": placement["volume_mounts"]}]


def test_cpu_and_memory_default_where_the_placement_names_none():
    resources = render(spec(gpus=0, placement={**EMPTY, "resources": {"limits": {"memory": "8Gi"}}}))["spec"][
        "trainer"
    ]["resourcesPerNode"]
    assert resources["limits"]["memory"] == "8Gi" and "memory" not in resources["requests"]
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


@pytest.mark.parametrize("where", ["env", "placement"])
def test_torchrun_variables_are_refused(where):
    kwargs = {"env": {"PET_NNODES": "4"}} if where == "env" else {
        "placement": {**EMPTY, "env": [{"name": "PET_MASTER_PORT", "value": "1"}]}}  # fmt: skip
    with pytest.raises(KftuneError, match="PET_"):
        render(spec(**kwargs))


@pytest.mark.parametrize(
    ("change", "message"),
    [({"nodes": 0}, "nodes"), ({"gpus": -1}, "gpus_per_node"), ({"active_deadline_seconds": 0}, "active_deadline")],
)
def test_the_spec_refuses_what_the_cluster_would(change, message):
    with pytest.raises(KftuneError, match=message):
        spec(**change)
    with pytest.raises(KftuneError, match="DNS-1035"):
        TrainJobSpec("Train_Job", NAMESPACE, "image", COMMAND, 2, 1, EMPTY, SECRETS)


# --- run, against the stand-in (each bounded: a broken end condition would otherwise poll for ever)

bounded = pytest.mark.timeout(60)


def complete_after(reads: int):
    def status(cluster: Cluster, job: dict) -> dict:
        n = len(cluster.seen("GET", f"{JOBS}/{job['metadata']['name']}"))
        if n < reads:  # a condition that is not True is not the end
            return {"conditions": [condition("Failed", "Pending", "not failed", status="False")]}
        return {"conditions": [condition("Complete", "JobSetCompleted", "jobset completed")]}

    return status


def nodes_of(name: str) -> list[dict]:
    return [
        node_pod(name, 0, "rank 0: step 1 loss 2.5\nrank 0: done\n", phase="Succeeded"),
        node_pod(name, 1, "rank 1: step 1\n", phase="Succeeded"),
        node_pod("kftune-other-job", 0, "another job's node 0\n"),
    ]


@bounded
def test_run_creates_follows_node_0_and_deletes_when_complete():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    cluster = Cluster(status=complete_after(3), pods=lambda c: nodes_of(name))
    lines: list[str] = []
    handler = signal.getsignal(signal.SIGTERM)
    with StandIn(cluster) as url:
        run(manifest, api_client(url), log=lines.append, poll_seconds=0.05)
    assert cluster.created == [manifest]
    assert "rank 0: step 1 loss 2.5" in lines and "rank 0: done" in lines
    assert lines.index("rank 0: step 1 loss 2.5") < lines.index("rank 0: done")
    assert not any("rank 1" in line or "another job" in line for line in lines)
    assert f"created TrainJob {NAMESPACE}/{name}" in lines
    (delete,) = cluster.seen("DELETE", f"{JOBS}/{name}")
    assert delete["propagationPolicy"] == "Foreground"
    assert [m for m, p, _ in cluster.requests if p.startswith(JOBS)][-1] == "DELETE"  # after the last poll
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


@bounded
def test_run_adopts_the_job_of_an_earlier_try():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    earlier = {**manifest, "metadata": {**manifest["metadata"], "uid": "earlier"}}
    cluster = Cluster(jobs={name: earlier}, status=complete_after(2), pods=lambda c: nodes_of(name))
    lines: list[str] = []
    with StandIn(cluster) as url:
        run(manifest, api_client(url), log=lines.append, poll_seconds=0.05)
    assert len(cluster.created) == 1  # one try to create, answered 409
    assert sum("adopted TrainJob" in line for line in lines) == 1
    assert "rank 0: done" in lines and cluster.seen("DELETE", f"{JOBS}/{name}")


@bounded
def test_run_waits_out_a_job_being_deleted_then_creates_it_anew():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    dying = {**manifest, "metadata": {**manifest["metadata"], "deletionTimestamp": "2026-12-01T00:00:00Z"}}
    cluster = Cluster(jobs={name: dying}, status=complete_after(5), gone_after=2)
    lines: list[str] = []
    with StandIn(cluster) as url:
        run(manifest, api_client(url), log=lines.append, poll_seconds=0.05)
    assert len(cluster.created) == 2 and not any("adopted" in line for line in lines)
    assert any("is being deleted" in line for line in lines)
    assert f"created TrainJob {NAMESPACE}/{name}" in lines and f"deleted TrainJob {NAMESPACE}/{name}" in lines


@bounded
def test_run_raises_the_failed_condition_in_one_line_and_deletes():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    failed = condition("Failed", "DeadlineExceeded", "TrainJob exceeded\nits active deadline")
    cluster = Cluster(status=lambda c, job: {"conditions": [failed]}, pods=lambda c: nodes_of(name))
    handler = signal.getsignal(signal.SIGTERM)
    with StandIn(cluster) as url, pytest.raises(KftuneError) as raised:
        run(manifest, api_client(url), log=lambda line: None, poll_seconds=0.05)
    message = str(raised.value)
    assert "\n" not in message and "DeadlineExceeded" in message and "exceeded its active deadline" in message
    assert cluster.seen("DELETE", f"{JOBS}/{name}")
    assert signal.getsignal(signal.SIGTERM) is handler


@bounded
def test_run_follows_node_0_across_a_gang_restart():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    first = node_pod(name, 0, "attempt 0: step 1\n", phase="Failed")
    second = node_pod(name, 0, "attempt 1: resumed at step 1\nattempt 1: done\n", "Succeeded", restart=1, created=5)
    # the restarted pod appears once the first one's log was read; the job completes once the second's was
    cluster = Cluster(
        pods=lambda c: [first] + ([second] if c.logs_served else []),
        status=lambda c, job: {"conditions": [condition("Complete", "JobSetCompleted", "done")]}
        if second["metadata"]["name"] in c.logs_served else {},
    )  # fmt: skip
    lines: list[str] = []
    with StandIn(cluster) as url:
        run(manifest, api_client(url), log=lines.append, poll_seconds=0.05)
    marker = next(i for i, line in enumerate(lines) if "JobSet restart 1" in line)
    assert lines.index("attempt 0: step 1") < marker < lines.index("attempt 1: done")
    assert lines.count("attempt 0: step 1") == 1


@bounded
def test_a_broken_log_stream_resumes_without_repeating_lines():
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    pod = node_pod(name, 0, ["step 1\n", "step 1\nstep 2\n"], phase="Succeeded")
    cluster = Cluster(
        pods=lambda c: [pod],
        status=lambda c, job: {"conditions": [condition("Complete", "JobSetCompleted", "done")]}
        if len(c.logs_served) >= 2 else {},
    )  # fmt: skip
    lines: list[str] = []
    with StandIn(cluster) as url:
        run(manifest, api_client(url), log=lines.append, poll_seconds=0.05)
    assert [line for line in lines if line.startswith("step")] == ["step 1", "step 2"]


@bounded
def test_run_rides_out_brief_api_errors():
    cluster = Cluster(status=complete_after(4), get_errors=2)
    lines: list[str] = []
    with StandIn(cluster) as url:
        run(render(spec()), api_client(url), log=lines.append, poll_seconds=0.05)
    assert sum("status not read" in line for line in lines) == 2 and "is complete" in lines[-2]
    cluster = Cluster(status=complete_after(99), get_errors=99)
    with StandIn(cluster) as url, pytest.raises(KftuneError, match="failed 6 times in a row"):
        run(render(spec()), api_client(url), log=lambda line: None, poll_seconds=0.01)


@bounded
def test_run_fails_when_someone_else_deletes_the_job():
    cluster = Cluster(status=lambda c, job: c.jobs.clear() or {})  # gone after the first read
    with StandIn(cluster) as url, pytest.raises(KftuneError, match="deleted by someone else before it ended"):
        run(render(spec()), api_client(url), log=lambda line: None, poll_seconds=0.05)


@bounded
def test_run_reports_a_refused_create_with_the_api_servers_message():
    cluster = Cluster(create_error=(422, "admission webhook denied the request: spec.trainer.env: must not have PET_"))
    with StandIn(cluster) as url, pytest.raises(KftuneError, match="422 admission webhook denied .* PET_"):
        run(render(spec()), api_client(url), log=lambda line: None, poll_seconds=0.05)
    assert not [m for m, p, _ in cluster.requests if m == "GET" and p.startswith(JOBS)]


SIGTERM_CHILD = """
import sys
from kftune.train.trainjob_api import run
from tests.kube_standin import api_client
import json
run(json.loads(sys.argv[2]), api_client(sys.argv[1]), poll_seconds=0.05)
"""


@bounded
def test_sigterm_deletes_the_job():
    """The step cancelled (KFP sends SIGTERM): the TrainJob is deleted before the process exits, with an error."""
    manifest = render(spec())
    name = manifest["metadata"]["name"]
    running = {**node_pod(name, 0, "rank 0: step 1\n"), "streaming": True}  # its log followed when SIGTERM comes
    cluster = Cluster(status=lambda c, job: {}, pods=lambda c: [running])  # never ends
    with StandIn(cluster) as url:
        child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, url, json.dumps(manifest)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (cluster.logs_served and cluster.seen("GET", f"{JOBS}/{name}")) and child.poll() is None:
            assert time.monotonic() < deadline, "the child never polled its TrainJob and followed node 0"
            time.sleep(0.05)
        assert not cluster.seen("DELETE", f"{JOBS}/{name}")
        child.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while not cluster.seen("DELETE", f"{JOBS}/{name}") and time.monotonic() < signalled + 30:
            time.sleep(0.02)
        deleted_after = time.monotonic() - signalled
        out, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "SIGTERM" in err, (out, err)
    # at once, not after the log follower: KFP kills a cancelled pod when its grace period (30 s) ends
    assert cluster.seen("DELETE", f"{JOBS}/{name}") and deleted_after < 3, (deleted_after, out, err)
    assert "rank 0: step 1" in out
    assert f"deleted TrainJob {NAMESPACE}/{name}" in out
