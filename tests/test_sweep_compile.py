"""The compiled sweep package (`kftune pipeline compile --pipeline sweep`), read back as a cluster would read it."""

import pytest
import yaml

from pipelines.finetune import SECRETS
from pipelines.sweep import PARALLELISM

from .conftest import run_cli


def compiled(tmp_path, *flags: str) -> tuple[dict, dict]:
    out = tmp_path / "sweep.yaml"
    proc = run_cli("-m", "kftune.cli", "pipeline", "compile", "--pipeline", "sweep", *flags, "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[dict, dict]:
    return compiled(tmp_path_factory.mktemp("sweep"), "--parallelism", "3")


def _loop(spec: dict) -> tuple[dict, dict]:
    """(the ParallelFor task in the root DAG, its body's tasks)."""
    (task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    return task, spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


def _train_step(spec: dict, body: dict) -> dict[str, dict]:
    """The loop body's train step: its If/Else's leaf tasks by name (train on one node, train-across-nodes)."""
    (branches,) = [t for name, t in body.items() if name.startswith("condition-branches")]
    tasks = {}
    for branch in spec["components"][branches["componentRef"]["name"]]["dag"]["tasks"].values():
        tasks |= spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    return tasks


def test_each_branch_trains_on_its_own_gpus_and_the_loop_runs_at_most_parallelism_branches(package):
    spec, k8s = package
    loop, body = _loop(spec)
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--plan-sweep-Output"}
    # one train step per iteration (one node, or a TrainJob), so one GPU request per branch
    assert {name for name in body if not name.startswith("condition-branches")} == {"evaluate", "forward-model"}
    steps = _train_step(spec, body)
    assert set(steps) == {"train", "train-across-nodes"}
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = {name for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert with_gpu == {"exec-train", "exec-train-across-nodes"}
    for name in with_gpu:
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    for task in steps.values():
        assert task["retryPolicy"]["maxRetryCount"] >= 1
        # the branch's settings come from its loop item, on either branch
        params = task["inputs"]["parameters"]
        assert {
            name: params[name]["parameterExpressionSelector"]
            for name in ("method", "lora_r", "quantization_bit", "lora_target_modules")
        } == {
            "method": 'parseJson(string_value)["method"]',
            "lora_r": 'parseJson(string_value)["rank"]',
            "quantization_bit": 'parseJson(string_value)["bits"]',
            "lora_target_modules": 'parseJson(string_value)["targets"]',
        }
    assert steps["train-across-nodes"]["inputs"]["parameters"]["nodes"] == {
        "componentInputParameter": "pipelinechannel--train_nodes"
    }


def test_parallelism_defaults_to_the_modules_limit(tmp_path):
    spec, _ = compiled(tmp_path)
    assert _loop(spec)[0]["iteratorPolicy"] == {"parallelismLimit": PARALLELISM}


def test_compare_collects_every_branch_and_the_winner_alone_is_merged_and_registered(package):
    spec, _ = package
    root = spec["root"]["dag"]["tasks"]
    loop_name = next(name for name, t in root.items() if "parameterIterator" in t)
    inputs = root["compare-candidates"]["inputs"]
    assert inputs["artifacts"]["trained"]["taskOutputArtifact"] == {
        "producerTask": loop_name,
        "outputArtifactKey": "pipelinechannel--forward-model-trained",  # the train step's model, forwarded
    }
    assert inputs["artifacts"]["evaluations"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert inputs["parameters"]["candidates"]["taskOutputParameter"]["producerTask"] == "plan-sweep"
    (branches,) = [name for name in root if name.startswith("condition-branches")]
    assert "compare-candidates" in root[branches]["dependentTasks"]
    conditions = {}
    for task in spec["components"][root[branches]["componentRef"]["name"]]["dag"]["tasks"].values():
        body = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
        conditions[task["triggerPolicy"]["condition"]] = set(body)
    winner_is_full = "inputs.parameter_values['pipelinechannel--compare-candidates-Output'] == 'full'"
    assert conditions == {
        winner_is_full: {"register-model"},
        f"!({winner_is_full})": {"merge-adapter", "register-model-2"},
    }


def test_every_task_gets_the_credentials_from_secrets_and_no_task_but_training_targets_gpu_nodes(package):
    spec, k8s = package
    assert set(spec["deploymentSpec"]["executors"]) == set(k8s)
    for name, config in k8s.items():
        got = {s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]} for s in config["secretAsEnv"]}
        assert got == SECRETS, name
        assert ("nodeSelector" in config) == (name in {"exec-train", "exec-train-across-nodes"})
    assert not [p for p in spec["root"]["inputDefinitions"]["parameters"] if "secret" in p or "password" in p]
