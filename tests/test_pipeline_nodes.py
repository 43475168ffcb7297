"""`train_nodes` and `gpus_per_node`: run-time parameters of both pipelines, read back from the compiled packages
as a cluster reads them, and checked before anything runs (kftune/train/node_count.py, pipelines/parameters.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from components.images import TRAINER_IMAGE
from kftune.core.errors import ConfigError, KftuneError
from kftune.train.node_count import (
    MAX_GPUS_PER_NODE,
    MAX_TRAIN_NODES,
    check_node_counts,
    check_nodes_against_data,
)
from pipelines.finetune import SECRETS
from pipelines.parameters import check, resolve_parameters

from .conftest import run_cli

GPUS = "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"  # the run's gpus_per_node, read at run time
S3_DATA = "s3://kftune/inputs/data/" + "0" * 64 + "/data.jsonl"


def compiled(path, *flags: str) -> tuple[dict, dict]:
    proc = run_cli("-m", "kftune.cli", "pipeline", "compile", *flags, "-o", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module", params=["finetune", "sweep"])
def package(request, tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes executor configs) of `kftune pipeline compile --pipeline <finetune|sweep>`."""
    return compiled(tmp_path_factory.mktemp("nodes") / "p.yaml", "--pipeline", request.param)


def _dags(spec: dict) -> list[dict]:
    return [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]


def _task(spec: dict, name: str) -> tuple[dict, dict]:
    """(the component holding task `name` in its DAG, the task)."""
    (found,) = [
        (c, c["dag"]["tasks"][name]) for c in spec["components"].values() if name in c.get("dag", {}).get("tasks", {})
    ]
    return found


def test_both_pipelines_take_the_node_counts_as_run_parameters_defaulting_to_one(package):
    """gpus_per_node is a string: KFP 2.17's driver reads a resource limit placeholder with GetStringValue, so
    an integer parameter would resolve to "" and the pod would run without a GPU limit, silently."""
    spec, _ = package
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert (params["train_nodes"]["parameterType"], params["train_nodes"]["defaultValue"]) == ("NUMBER_INTEGER", 1)
    assert (params["gpus_per_node"]["parameterType"], params["gpus_per_node"]["defaultValue"]) == ("STRING", "1")


def test_one_node_trains_in_its_own_pod_on_the_runs_gpu_count(package):
    """The train task asks for `gpus_per_node` GPUs at run time, and its If group passes that parameter in
    (KFP 2.17 leaves it out unless the task registers it: the cluster would fail to resolve the limit)."""
    spec, k8s = package
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == GPUS
    holder, task = _task(spec, "train")
    assert task["inputs"]["parameters"]["pipelinechannel--gpus_per_node"] == {
        "componentInputParameter": "pipelinechannel--gpus_per_node"
    }
    assert "pipelinechannel--gpus_per_node" in holder["inputDefinitions"]["parameters"]
    assert k8s["exec-train"]["emptyDirMounts"][0]["mountPath"] == "/cache"


def test_the_branch_is_chosen_by_train_nodes_and_both_feed_one_model(package):
    spec, _ = package
    (branches,) = [c for c in spec["components"].values() if {"one-node", "across-nodes"} == _branch_names(c)]
    by_name = {t["taskInfo"]["name"]: t for t in branches["dag"]["tasks"].values()}
    one_node = "int(inputs.parameter_values['pipelinechannel--train_nodes']) == 1"
    assert by_name["one-node"]["triggerPolicy"]["condition"] == one_node
    assert by_name["across-nodes"]["triggerPolicy"]["condition"] == f"!({one_node})"
    for name, task in (("one-node", "train"), ("across-nodes", "train-across-nodes")):
        body = spec["components"][by_name[name]["componentRef"]["name"]]["dag"]["tasks"]
        assert set(body) == {task}
    (output,) = branches["dag"]["outputs"]["artifacts"].values()  # the dsl.OneOf evaluate and the rest read
    assert [s["outputArtifactKey"] for s in output["artifactSelectors"]] == [
        "pipelinechannel--train-model",
        "pipelinechannel--train-across-nodes-model",
    ]


def _branch_names(component: dict) -> set[str]:
    return {t["taskInfo"]["name"] for t in component.get("dag", {}).get("tasks", {}).values()}


def test_the_launcher_hands_its_pod_settings_to_the_trainjob(package):
    """Resources (with the run's GPU count), tolerations, node selector and affinity go to the TrainJob only;
    the Secrets' environment to both, so the launcher can reach S3."""
    spec, k8s = package
    component = spec["components"]["comp-train-across-nodes"]
    assert component["taskConfigPassthroughs"] == [
        {"field": "RESOURCES"},
        {"field": "KUBERNETES_TOLERATIONS"},
        {"field": "KUBERNETES_NODE_SELECTOR"},
        {"field": "KUBERNETES_AFFINITY"},
        {"field": "ENV", "applyToTask": True},
    ]
    assert component["inputDefinitions"]["parameters"]["task_config"]["parameterType"] == "TASK_CONFIG"
    resources = spec["deploymentSpec"]["executors"]["exec-train-across-nodes"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == GPUS
    assert resources["resourceCpuRequest"] and resources["resourceMemoryLimit"]
    config = k8s["exec-train-across-nodes"]
    assert config["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert config["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {
        s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]} for s in config["secretAsEnv"]
    } == SECRETS
    assert "emptyDirMounts" not in config  # KFP would mount it on the launcher, never pass it on
    _, task = _task(spec, "train-across-nodes")
    params = task["inputs"]["parameters"]
    assert params["nodes"] == {"componentInputParameter": "pipelinechannel--train_nodes"}
    assert params["gpus_per_node"] == {"componentInputParameter": "pipelinechannel--gpus_per_node"}
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["task_name"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}"
    assert params["image"]["runtimeValue"]["constant"] == TRAINER_IMAGE
    assert task["retryPolicy"]["maxRetryCount"] >= 1  # a retry adopts the TrainJob by its name


def test_compile_flags_set_the_compiled_defaults_and_refuse_bad_counts(tmp_path):
    spec, _ = compiled(tmp_path / "f.yaml", "--train-nodes", "4", "--gpus-per-node", "8")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert (params["train_nodes"]["defaultValue"], params["gpus_per_node"]["defaultValue"]) == (4, "8")
    assert params["method"]["defaultValue"] == "lora"  # the rest as declared
    proc = run_cli("-m", "kftune.cli", "pipeline", "compile", "--train-nodes", "0", "-o", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --train-nodes 0: give 1 or more (1 trains on one node, in the task's own pod)"
    ]
    assert not (tmp_path / "bad.yaml").exists()


@pytest.mark.parametrize(
    ("nodes", "gpus", "flag"),
    [
        (0, 1, "--train-nodes 0"),
        (-1, 1, "--train-nodes -1"),
        (MAX_TRAIN_NODES + 1, 1, f"--train-nodes {MAX_TRAIN_NODES + 1}: at most {MAX_TRAIN_NODES}"),
        (1, 0, "--gpus-per-node 0"),
        (1, -1, "--gpus-per-node -1"),
        (1, MAX_GPUS_PER_NODE + 1, f"--gpus-per-node {MAX_GPUS_PER_NODE + 1}: at most {MAX_GPUS_PER_NODE}"),
    ],
)
def test_a_bad_count_is_one_line_naming_its_flag(nodes, gpus, flag):
    with pytest.raises(KftuneError) as caught:
        check_node_counts(nodes, gpus)
    assert str(caught.value).startswith(flag) and "\n" not in str(caught.value)
    with pytest.raises(KftuneError, match=flag):  # the same check guards run, sweep and submit
        resolve_parameters({"data_uri": S3_DATA, "train_nodes": nodes, "gpus_per_node": gpus})


@pytest.mark.parametrize("gpus", ["two", "1.5", ""])
def test_gpus_per_node_must_be_a_whole_number(gpus):
    with pytest.raises(KftuneError) as caught:
        resolve_parameters({"data_uri": S3_DATA, "gpus_per_node": gpus})
    assert str(caught.value) == f"--gpus-per-node {gpus}: give a whole number of GPUs, e.g. 8"
    assert resolve_parameters({"data_uri": S3_DATA, "gpus_per_node": 4})["gpus_per_node"] == "4"  # as the DAG takes it


def test_the_limits_themselves_are_accepted_and_both_flags_are_named_at_once():
    check_node_counts(MAX_TRAIN_NODES, MAX_GPUS_PER_NODE)
    check_node_counts(1, 1)
    with pytest.raises(KftuneError) as caught:
        check_node_counts(0, 0)
    message = str(caught.value)
    assert "--train-nodes 0" in message and "--gpus-per-node 0" in message and "\n" not in message


def test_bad_counts_join_the_other_settings_problems(tmp_path):
    """A bad count alongside a bad training setting: every problem at once, each naming its flag."""
    for pipeline in ("finetune", "sweep"):
        with pytest.raises(ConfigError) as caught:
            resolve_parameters({"data_uri": S3_DATA, "train_nodes": 0, "max_seq_length": 0}, pipeline)
        problems = caught.value.problems
        assert any("max_seq_length" in p for p in problems) and any(p.startswith("--train-nodes 0") for p in problems)


def test_more_processes_than_full_batches_is_refused_naming_the_flag():
    # 18 train rows, batches of 4: 4 full batches, so at most 4 processes across the nodes
    check_nodes_against_data(18, 4, 4, 1)
    check_nodes_against_data(18, 4, 2, 2)
    check_nodes_against_data(3, 4, 1, 8)  # one node trains as it always has
    with pytest.raises(KftuneError) as caught:
        check_nodes_against_data(18, 4, 5, 1)
    message = str(caught.value)
    assert message.startswith("--train-nodes 5: 5 nodes x 1 processes need 5 full batches") and "\n" not in message
    assert "18 train rows (4 batches); use --train-nodes 4 or fewer" in message
    with pytest.raises(KftuneError, match=r"need 6 full batches .* use --train-nodes 2 or fewer"):
        check_nodes_against_data(18, 4, 3, 2)
    with pytest.raises(KftuneError, match=r"train on one node \(--train-nodes 1\)"):
        check_nodes_against_data(5, 4, 2, 1)


@pytest.fixture
def twenty_rows(tmp_path):
    """20 rows: the gate's split holds out round(0.1 * 20) = 2, so 18 train rows, 4 full batches of 4."""
    path = tmp_path / "twenty.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_local_data_file_is_checked_against_the_node_count_before_anything_runs(twenty_rows):
    base = {"data_uri": str(twenty_rows), "per_device_train_batch_size": 4, "eval_fraction": 0.1}
    check({**base, "train_nodes": 4})
    check({**base, "train_nodes": 2, "gpus_per_node": 2})
    check({**base, "train_nodes": 3, "gpus_per_node": 2, "train_processes": 1})  # processes per node: 1
    for pipeline, extra in (("finetune", {"train_nodes": 5}), ("sweep", {"train_nodes": 3, "gpus_per_node": 2})):
        with pytest.raises(KftuneError, match=r"^--train-nodes \d: .* the data has 18 train rows \(4 batches\)"):
            check({**base, **extra}, pipeline)
    check({**base, "train_nodes": 5, "data_mix": '[{"uri": "g.jsonl", "weight": 0.5}]'})  # a mix: the train step checks
    check({**base, "data_uri": S3_DATA, "train_nodes": 5})  # data not here: the train step checks


def test_pipeline_run_refuses_too_many_nodes_for_its_data_before_starting_the_stack(twenty_rows, tmp_path):
    state = tmp_path / "stack"
    proc = run_cli(
        "-m", "kftune.cli", "pipeline", "run", "--data-uri", str(twenty_rows), "--per-device-train-batch-size", "4",
        "--train-nodes", "5", "--state-dir", str(state),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --train-nodes 5: 5 nodes x 1 processes need 5 full batches"), line
    assert not state.exists()  # nothing started


def test_the_sweep_collects_the_train_steps_model_as_it_was_made(tmp_path):
    """forward_model re-exports the OneOf'd model for the loop to collect: metadata and pointer file unchanged."""
    from kfp import dsl

    from components.forward_model import forward_model
    from kftune import steps

    made = steps.TrainedModel(
        "s3://b/models/" + "1" * 64, "1" * 64, "lora", {"lora_r": 8}, {"loss_history": [[1, 2.0]]}
    )
    model = dsl.Model(uri="", metadata=steps.write_pointer(str(tmp_path / "in" / "model"), made))
    model.path = str(tmp_path / "in" / "model")
    trained = dsl.Model(uri="")
    trained.path = str(tmp_path / "out" / "trained")
    forward_model.python_func(model=model, trained=trained)
    assert steps.from_metadata(steps.TrainedModel, trained.metadata) == made
    assert json.loads((tmp_path / "out" / "trained").read_text()) == json.loads((tmp_path / "in" / "model").read_text())
