"""The pipeline and the sweep end to end on the formats beyond alpaca/messages, against the session's real
SeaweedFS and MLflow server: a ShareGPT tool-calling data set (LLaMA-Factory's glaive shape) and a text corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kftune.dev.tool_data import BAD_TOOL_ROWS, text_rows, tool_rows, write_jsonl
from pipelines.local import RunSummary, run, run_sweep

from .conftest import stage_inputs
from .test_pipeline_run import QUICK as PIPELINE_QUICK

pytestmark = [pytest.mark.integration, pytest.mark.slow]
QUICK = {**PIPELINE_QUICK, "method": "lora", "eval_fraction": 0.1, "train_processes": 1}
GOOD_TOOL_ROWS = 60  # with the three bad rows, 4.8% rejected: under the gate's 5%


@pytest.fixture(scope="module")
def tool_inputs(stack, s3, tool_model, tmp_path_factory) -> dict[str, str]:
    rows = tool_rows(GOOD_TOOL_ROWS, seed=11) + list(BAD_TOOL_ROWS.values())
    data = write_jsonl(tmp_path_factory.mktemp("tools") / "glaive_toolcall.jsonl", rows)
    return stage_inputs(stack, s3, tool_model, data, "tools-")


@pytest.fixture(scope="module")
def tool_run(tool_inputs, task_env, tmp_path_factory) -> RunSummary:
    arguments = {
        **tool_inputs,
        **QUICK,
        "max_seq_length": 1024,
        "data_format": "sharegpt",
        "primary_metric": "tool_call_name_match",
        "registered_model_name": "test-tools",
    }
    return run(arguments, task_env, tmp_path_factory.mktemp("root-tools"), progress=None)


def test_a_tool_calling_data_set_runs_end_to_end(tool_run, stack, s3, tmp_path):
    from mlflow import MlflowClient

    from kftune.core.storage import download_dir

    assert list(tool_run.seconds) == ["validate-data", "train", "evaluate", "merge-adapter", "register-model"]
    report = json.loads((download_dir(tool_run.data.uri, tmp_path / "data", s3) / "report.json").read_text())
    assert report["row_format"] == "sharegpt" and report["rejected"] == 3
    assert {r for r, v in report["rules"].items() if v["rows"] and v["action"] == "reject"} == set(BAD_TOOL_ROWS)
    evaluation = tool_run.evaluation
    assert evaluation.tool_call_name_match is not None and 0 <= evaluation.tool_call_args_match <= 1
    decision = tool_run.registration.decision()
    assert "tool_call_name_match" in decision
    metrics = MlflowClient(stack.mlflow_url).get_run(tool_run.registration.run_id).data.metrics
    assert {"tool_call_name_match", "base_tool_call_name_match", "tool_call_args_match"} <= set(metrics)


def test_a_text_corpus_runs_end_to_end(stack, s3, tiny_model, task_env, tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", text_rows(40, seed=3))
    arguments = {
        **stage_inputs(stack, s3, tiny_model, data, "text-"),
        **QUICK,
        "max_seq_length": 128,
        "registered_model_name": "test-text",
    }
    summary = run(arguments, task_env, tmp_path / "root", progress=None)
    assert list(summary.seconds)[-1] == "register-model"
    assert math.isfinite(summary.evaluation.perplexity) and summary.evaluation.rougeL is None
    assert summary.trained.metrics["train_tokens"] > 0


def test_the_sweep_runs_on_the_tool_calling_data_set(tool_inputs, task_env, tmp_path):
    arguments = {
        **tool_inputs,
        **{k: v for k, v in QUICK.items() if k not in ("method", "lora_r")},
        "methods": ["lora"],
        "ranks": [4],
        "target_presets": ["attention"],
        "max_seq_length": 1024,
        "primary_metric": "tool_call_args_match",
        "registered_model_name": "test-tools-sweep",
        "experiment_name": "test-tools-sweep",
    }
    swept = run_sweep(arguments, task_env, Path(tmp_path / "sweep"), parallelism=1, progress=None)
    assert swept.winner.method == "lora"
    assert "tool_call_args_match" in swept.registration.decision()
