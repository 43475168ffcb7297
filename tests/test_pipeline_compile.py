"""The compiled pipeline package (`kftune pipeline compile`), read back as the cluster would read it."""

import re

import pytest
import yaml

from components.images import IMAGE_UID
from pipelines.finetune import SECRETS

from .conftest import run_cli

# Planted in the compiling process's environment: none may leak into the package.
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY0001",
    "AWS_SECRET_ACCESS_KEY": "planted-secret-0f3a9c",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-77",
}
TRAIN = "exec-train"
LAUNCHER = "exec-train-across-nodes"  # the train step on several nodes: its pod settings go to the TrainJob
GPUS = "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"  # the run's gpus_per_node


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[str, dict, dict]:
    """(YAML text, pipeline spec, Kubernetes executor configs) of `kftune pipeline compile -o`."""
    out = tmp_path_factory.mktemp("compiled") / "finetune.yaml"
    proc = run_cli("-m", "kftune.cli", "pipeline", "compile", "-o", str(out), env=PLANTED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_only_the_train_step_asks_for_gpus_as_many_as_the_run_says(package):
    _, spec, _ = package
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = {name for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert with_gpu == {TRAIN, LAUNCHER}
    for name in with_gpu:
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"] == {
            "resourceType": "nvidia.com/gpu",
            "type": "nvidia.com/gpu",
            "resourceCount": GPUS,
        }
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(
            resources
        )
    for task in ("train", "train-across-nodes"):
        (dag,) = [c["dag"] for c in spec["components"].values() if task in c.get("dag", {}).get("tasks", {})]
        assert dag["tasks"][task]["retryPolicy"]["maxRetryCount"] >= 1


def test_only_the_train_step_targets_gpu_nodes_and_only_its_own_pod_mounts_the_cache(package):
    _, _, k8s = package
    assert {name for name, c in k8s.items() if "nodeSelector" in c} == {TRAIN, LAUNCHER}
    assert {name for name, c in k8s.items() if "tolerations" in c} == {TRAIN, LAUNCHER}
    for name in (TRAIN, LAUNCHER):
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {name for name, c in k8s.items() if "emptyDirMounts" in c} == {TRAIN}
    assert k8s[TRAIN]["emptyDirMounts"][0]["mountPath"] == "/cache"


def test_every_task_gets_s3_and_mlflow_credentials_from_secrets_and_runs_as_non_root(package):
    _, spec, k8s = package
    executors = set(spec["deploymentSpec"]["executors"])
    assert executors == set(k8s)  # no task without a Kubernetes config, so none without secrets
    for name in executors:
        got = {s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]} for s in k8s[name]["secretAsEnv"]}
        assert got == SECRETS, name
        assert (
            "AWS_SECRET_ACCESS_KEY" in got["kftune-s3"].values()
            and "MLFLOW_TRACKING_URI" in got["kftune-mlflow"].values()
        )
        assert k8s[name]["securityContext"]["runAsNonRoot"] is True
        assert int(k8s[name]["securityContext"]["runAsUser"]) == IMAGE_UID


def test_no_credential_in_the_package(package):
    text, spec, _ = package
    for value in PLANTED.values():
        assert value not in text
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if re.search(r"secret|password|access_key|credential|session_token", p, re.I)]
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "env" not in executor["container"]  # no plain environment values baked into a task


def _tasks_that_run(spec: dict, method: str, train_nodes: int = 1) -> dict[str, dict]:
    """Leaf tasks a run with `method` on `train_nodes` nodes executes: conditions evaluated, sub-DAGs entered."""

    def holds(condition: str) -> bool:
        # every condition in this DAG compares the method or the node count with a literal, maybe negated
        match = re.fullmatch(
            r"(!\()?(?:inputs\.parameter_values\['pipelinechannel--method'\] == '(\w+)'"
            r"|int\(inputs\.parameter_values\['pipelinechannel--train_nodes'\]\) == (\d+))\)?",
            condition,
        )
        assert match, f"unexpected condition {condition!r}"
        equal = method == match[2] if match[2] else train_nodes == int(match[3])
        return equal != bool(match[1])

    def walk(dag: dict) -> dict[str, dict]:
        found = {}
        for name, task in dag["tasks"].items():
            condition = task.get("triggerPolicy", {}).get("condition")
            if condition and not holds(condition):
                continue
            component = spec["components"][task["componentRef"]["name"]]
            found |= walk(component["dag"]) if "dag" in component else {name: task}
        return found

    return walk(spec["root"]["dag"])


@pytest.mark.parametrize(
    ("train_nodes", "train_task"), [(1, "train"), (2, "train-across-nodes"), (8, "train-across-nodes")]
)
def test_full_skips_the_merge_and_registers_the_trained_model(package, train_nodes, train_task):
    tasks = _tasks_that_run(package[1], "full", train_nodes)
    assert set(tasks) == {"validate-data", train_task, "evaluate", "register-model"}
    assert "merged" not in tasks["register-model"]["inputs"]["artifacts"]
    assert tasks["register-model"]["inputs"]["artifacts"]["trained"]["componentInputArtifact"].endswith("-oneof-1")


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize(("train_nodes", "train_task"), [(1, "train"), (2, "train-across-nodes")])
def test_adapter_methods_merge_and_register_the_merged_model(package, method, train_nodes, train_task):
    tasks = _tasks_that_run(package[1], method, train_nodes)
    assert set(tasks) == {"validate-data", train_task, "evaluate", "merge-adapter", "register-model-2"}
    merged = tasks["register-model-2"]["inputs"]["artifacts"]["merged"]
    assert merged["taskOutputArtifact"] == {"outputArtifactKey": "merged", "producerTask": "merge-adapter"}


def test_the_branches_start_after_evaluation(package):
    """Merge and register sit in the If/Else group, which waits for evaluate (register reads its metrics) and
    for the train step's If/Else group, whose model evaluate reads too."""
    root = package[1]["root"]["dag"]["tasks"]
    train_step = root["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"]
    branches = {name for name in root if name.startswith("condition-branches")}
    assert train_step in branches
    (registration,) = branches - {train_step}
    assert {train_step, "evaluate"} <= set(root[registration]["dependentTasks"])
