"""Every pipeline task that fails on a user's mistake says why in one marked line (no traceback to read), and the
data gate's stop line names the data, the share rejected, the rules, what to do and where the files are.

The components are called through their `python_func`, as KFP calls them in a task, with real inputs that
are wrong in one way each; the runner (pipelines/local.py) shows the marked line alone.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl

from kftune import steps
from kftune.core.errors import KftuneError, one_line
from kftune.steps import ERROR_MARK, DataSplit, Evaluation, TrainedModel

from .conftest import REPO


def artifact(cls, metadata: dict) -> dsl.Artifact:
    return cls(uri="", metadata=metadata)


def data_split(root: Path) -> dict:
    return DataSplit(str(root), "0" * 64, str(root / "train.jsonl"), str(root / "eval.jsonl"), 10, 2, "0" * 64).__dict__


def trained_model(uri: str, method: str = "lora") -> dict:
    return TrainedModel(uri, "0" * 64, method, {"lora_r": 4}, {"train_loss": 1.0, "loss_history": []}).__dict__


def evaluation(uri: str) -> dict:
    fields = dict.fromkeys(Evaluation.__dataclass_fields__, 1.0)
    return fields | {"uri": uri, "sha256": "0" * 64, "eval_key": "k", "eval_rows": 2, "eval_tokens": 10}


def failing_calls(tmp: Path, small_data: Path) -> dict[str, tuple]:
    """component name -> (component, kwargs that are wrong in one way, what its one line must say)."""
    from components.compare_candidates import compare_candidates
    from components.evaluate import evaluate
    from components.merge_adapter import merge_adapter
    from components.plan_sweep import plan_sweep
    from components.register_model import register_model
    from components.train import train
    from components.train_across_nodes import train_across_nodes
    from components.validate_data import validate_data

    missing = str(tmp / "no-such-model")
    not_trained = tmp / "not-trained"
    not_trained.mkdir()
    split = artifact(dsl.Dataset, data_split(tmp))
    return {
        "validate_data": (
            validate_data,
            {
                "data_uri": str(small_data),
                "artifact_root": str(tmp),
                "eval_fraction": 2.0,
                "base_model": "",
                "max_seq_length": 512,
                "data": artifact(dsl.Dataset, {}),
            },
            "eval_fraction must be between 0 and 1",
        ),
        "train": (
            train,
            {
                "data": split,
                "base_model": missing,
                "method": "bogus",
                "artifact_root": str(tmp),
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "quantization_bit": 4,
                "learning_rate": 1e-4,
                "max_steps": 1,
                "num_train_epochs": 1.0,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 64,
                "seed": 0,
                "processes": 1,
                "model": artifact(dsl.Model, {}),
            },
            "method must be one of",
        ),
        "train_across_nodes": (
            train_across_nodes,
            {
                "data": split,
                "base_model": missing,
                "method": "bogus",
                "artifact_root": str(tmp),
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "quantization_bit": 4,
                "learning_rate": 1e-4,
                "max_steps": 1,
                "num_train_epochs": 1.0,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 64,
                "seed": 0,
                "processes": 1,
                "nodes": 2,
                "gpus_per_node": 1,
                "run_id": "run",
                "task_name": "train-across-nodes",
                "image": "trainer",
                "task_config": dsl.TaskConfig(),
                "model": artifact(dsl.Model, {}),
            },
            "method must be one of",
        ),
        "evaluate": (
            evaluate,
            {
                "data": split,
                "model": artifact(dsl.Model, trained_model(str(not_trained))),
                "artifact_root": str(tmp),
                "sample_tokens": 8,
                "eval_samples": 1,
                "metrics": artifact(dsl.Metrics, {}),
                "report": artifact(dsl.HTML, {}),
            },
            "folder has no config.json or adapter_config.json",
        ),
        "merge_adapter": (
            merge_adapter,
            {
                "model": artifact(dsl.Model, trained_model(str(not_trained))),
                "artifact_root": str(tmp),
                "merged": artifact(dsl.Model, {}),
            },
            "has no kftune_config.json; pass a model that kftune trained",
        ),
        "register_model": (
            register_model,
            {
                "data": split,
                "trained": artifact(dsl.Model, trained_model(str(not_trained))),
                "evaluation": artifact(dsl.Metrics, evaluation(str(tmp))),
                "registered_model_name": "m",
                "experiment_name": "e",
                "artifact_root": str(tmp),
                "primary_metric": "no_such_metric",
                "promotion_margin": 0.01,
                "git_commit": "",
                "pipeline_run": "",
                "registered": artifact(dsl.Model, {}),
            },
            "no_such_metric",
        ),
        "plan_sweep": (plan_sweep, {"methods": ["bogus"], "ranks": [8], "target_presets": ["all"]}, "bogus"),
        "compare_candidates": (
            compare_candidates,
            {
                "data": split,
                "candidates": [{"name": "lora-r8-all", "method": "lora", "rank": 8}],
                "trained": [],
                "evaluations": [],
                "primary_metric": "eval_loss",
                "experiment_name": "e",
                "artifact_root": str(tmp),
                "report": artifact(dsl.HTML, {}),
                "winner": artifact(dsl.Model, {}),
                "winner_evaluation": artifact(dsl.Metrics, {}),
            },
            "candidate",
        ),
    }


# re-exports the train step's own output (the sweep collects it): no user input reaches it, nothing to refuse
FORWARDS_ONLY = {"forward_model"}


def multi_node_train_exists() -> bool:
    """The lead's half of issue 23: steps.train(..., nodes=, ...) and kftune.train.trainjob, which the launcher calls."""
    return "nodes" in inspect.signature(steps.train).parameters and bool(
        importlib.util.find_spec("kftune.train.trainjob")
    )


def component_names() -> set[str]:
    """Every @dsl.component function defined in components/."""
    names = set()
    for path in (REPO / "components").glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_component_has_a_failure_case(tmp_path, small_data):
    assert set(failing_calls(tmp_path, small_data)) == component_names() - FORWARDS_ONLY


@pytest.mark.parametrize("name", sorted(component_names() - FORWARDS_ONLY))
def test_a_failing_step_prints_its_error_as_one_marked_line(name, tmp_path, small_data, capsys):
    if name == "train_across_nodes" and not multi_node_train_exists():
        pytest.skip("steps.train has no nodes= yet: the multi-node train step (issue 23) is merged separately")
    component, kwargs, expected = failing_calls(tmp_path, small_data)[name]
    with pytest.raises(KftuneError) as caught:
        component.python_func(**kwargs)
    marked = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR_MARK)]
    assert len(marked) == 1, f"{name}: {len(marked)} marked lines"
    message = json.loads(marked[0].removeprefix(ERROR_MARK))
    assert message == one_line(caught.value) and expected in message and "\n" not in message, message


def test_the_gate_stop_line_names_data_share_rules_fix_and_files(tiny_model, tmp_path, alpaca_array):
    """An alpaca file as LLaMA-Factory ships one, under the tiny model's tokenizer at 96 tokens: many rows too long."""
    from kftune.data.gate_stop import stop_message
    from kftune.data.validate import Options, validate

    data = tmp_path / alpaca_array.name
    shutil.copy(alpaca_array, data)
    report = validate(
        str(data), tmp_path / "validation", Options(tokenizer=str(tiny_model), max_seq_length=96, progress=False)
    )
    assert not report.passed
    too_long = report.rules["length.too_long"]["rows"]
    assert too_long > 0.05 * report.rows_in

    line = stop_message(report, str(data), "s3://bucket/pipeline/datasets/abc")
    assert "\n" not in line
    assert f"data validation gate failed for {data}: {report.rejected / report.rows_in:.1%} of rows rejected" in line
    assert f"({report.rejected} of {report.rows_in}, above max_reject_fraction 0.05)" in line
    assert f"top rules: length.too_long {too_long}" in line  # the rule that rejected most comes first
    assert "to fix: length.too_long: raise --max-seq-length (now 96) or shorten the rows" in line
    assert line.endswith(
        "rejected rows: s3://bucket/pipeline/datasets/abc/rejected.jsonl, "
        "report: s3://bucket/pipeline/datasets/abc/report.html"
    )
