"""The sweep through kfp.local against the session's real SeaweedFS and MLflow server, on the tiny model.

Two ranks of QLoRA-4 on the attention projections plus full fine-tuning: three candidates (full
once), two branches at a time, compared, and the winner merged (if an adapter) and registered
through the promotion gate.
"""

from __future__ import annotations

import json
import math

import pytest

from kftune.core.storage import download_dir
from pipelines.local import SweepSummary, run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
SWEEP = {
    "methods": ["qlora4", "full"],
    "ranks": [4, 8],
    "target_presets": ["attention"],
    "max_steps": 3,
    "learning_rate": 1e-2,
    "lora_alpha": 16,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 256,
    "eval_fraction": 0.25,
    "sample_tokens": 16,
    "eval_samples": 2,
    "registered_model_name": "test-sweep",
    "experiment_name": "test-sweep",
}
NAMES = {"qlora4-r4-attention", "qlora4-r8-attention", "full"}


@pytest.fixture(scope="module")
def swept(inputs, task_env, tmp_path_factory) -> SweepSummary:
    return run_sweep({**inputs, **SWEEP}, task_env, tmp_path_factory.mktemp("sweep"), parallelism=2, progress=None)


@pytest.fixture(scope="module")
def report(swept, s3, tmp_path_factory) -> dict:
    folder = download_dir(swept.sweep.uri, tmp_path_factory.mktemp("report") / "comparison", s3)
    assert {p.name for p in folder.iterdir()} >= {
        "comparison.md",
        "comparison.json",
        "comparison.html",
        "comparison.png",
    }
    return json.loads((folder / "comparison.json").read_text())


def test_every_candidate_trained_and_evaluated_once_full_once(swept):
    assert len(list(swept.run_dir.glob("for-loop-*-iteration-*/train/executor_output.json"))) == 3
    assert len(list(swept.run_dir.glob("for-loop-*-iteration-*/evaluate/executor_output.json"))) == 3
    assert swept.sweep.candidates == 3


def test_every_column_of_the_table_is_filled_from_measurements(report, swept):
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == NAMES and report["winner"] == swept.sweep.winner
    for row in rows.values():
        assert row["trainable_params"] > 0 and 0 < row["trainable_share"] <= 1
        assert row["peak_memory_bytes"] > 100 * 2**20  # a training process's resident size, in bytes
        assert row["train_seconds"] > 0 and row["tokens_per_second"] > 0
        assert all(
            math.isfinite(row["quality"][m]) for m in ("eval_loss", "perplexity", "rougeL", "chrf", "checks_pass_rate")
        )
    assert rows["full"]["trainable_share"] == 1.0 and rows["full"]["rank"] is None
    assert rows["qlora4-r8-attention"]["trainable_params"] == 2 * rows["qlora4-r4-attention"]["trainable_params"]
    places = sorted(rows.values(), key=lambda r: r["place"])
    assert [r["quality"]["eval_loss"] for r in places] == sorted(r["quality"]["eval_loss"] for r in places)
    assert places[0]["relative_quality"] == 1.0 and all(r["relative_quality"] < 1.0 for r in places[1:])
    table = [line for line in swept.sweep.table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 3 and not any("n/a" in line for line in table)  # every column measured


def test_mlflow_holds_a_parent_run_with_a_child_per_candidate(swept, stack):
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    parent = client.get_run(swept.sweep.parent_run_id)
    assert parent.data.params["winner"] == swept.sweep.winner and parent.data.metrics["candidates"] == 3
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        f"comparison/comparison.{ext}" for ext in ("md", "json", "html", "png")
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {run.info.run_name: run.data for run in children}
    assert set(by_name) == NAMES
    for name in NAMES - {"full"}:
        assert (
            by_name[name].params["lora_target_modules"] == ATTENTION and by_name[name].params["quantization_bit"] == "4"
        )
    assert "lora_target_modules" not in by_name["full"].params
    assert {run.data.tags["winner"] for run in children} == {"true", "false"}
    assert swept.sweep.parent_run_url.startswith(stack.mlflow_url)


def test_the_winner_is_merged_when_an_adapter_and_registered(swept, stack):
    from mlflow import MlflowClient

    reg, winner = swept.registration, swept.winner
    version = MlflowClient(stack.mlflow_url).get_model_version(reg.name, reg.version)
    assert (swept.merged is None) == (winner.method == "full")
    assert version.source == reg.source  # the model-carded copy of the candidate below
    assert version.tags["candidate_uri"] == (swept.merged or winner).uri
    assert version.tags["method"] == winner.method and version.tags["trained_uri"] == winner.uri
    assert version.tags["gate.decision"] in ("champion", "challenger") and version.tags["gate.reasons"]
    rendered = swept.render()
    assert swept.sweep.table in rendered and f"{reg.name} version {reg.version}" in rendered
