"""Planning a sweep (which candidates, with which settings) and reading its step results into comparable rows."""

import pytest

from kftune.core.errors import ConfigError
from kftune.steps import Evaluation, TrainedModel, check_train_settings
from kftune.sweep import plan as sweep
from kftune.train.config import SEVEN_PROJECTIONS

from .conftest import run_cli


def test_methods_times_ranks_times_presets_with_full_trained_once():
    planned = sweep.plan(["lora", "qlora4", "full", "qlora8"], [8.0, 16.0], ["attention", "mlp"])
    names = [c["name"] for c in planned]
    assert names == [
        "lora-r8-attention",
        "lora-r8-mlp",
        "lora-r16-attention",
        "lora-r16-mlp",
        "qlora4-r8-attention",
        "qlora4-r8-mlp",
        "qlora4-r16-attention",
        "qlora4-r16-mlp",
        "full",
        "qlora8-r8-attention",
        "qlora8-r8-mlp",
        "qlora8-r16-attention",
        "qlora8-r16-mlp",
    ]
    by_name = {c["name"]: c for c in planned}
    assert by_name["qlora8-r16-mlp"] == {
        "name": "qlora8-r16-mlp",
        "sweep_method": "qlora8",
        "method": "qlora",
        "bits": 8,
        "rank": 16,
        "preset": "mlp",
        "targets": "gate_proj,up_proj,down_proj",
    }
    assert by_name["qlora4-r8-attention"]["bits"] == 4 and by_name["lora-r8-attention"]["method"] == "lora"
    assert by_name["full"]["method"] == "full" and by_name["full"]["targets"] == ""
    assert all(type(c["rank"]) is int for c in planned)  # KFP hands List[int] items over as floats


def test_presets_name_the_module_lists_and_auto_leaves_discovery_to_training():
    assert sweep.TARGET_PRESETS["all"] == SEVEN_PROJECTIONS
    assert set(sweep.TARGET_PRESETS["all"].split(",")) == (
        set(sweep.TARGET_PRESETS["attention"].split(",")) | set(sweep.TARGET_PRESETS["mlp"].split(","))
    )
    (auto,) = sweep.plan(["lora"], [4], ["auto"])
    assert check_train_settings("lora", sweep.candidate_settings(auto, {})).target_modules() is None
    (mlp,) = sweep.plan(["qlora4"], [4], ["mlp"])
    cfg = check_train_settings("qlora", sweep.candidate_settings(mlp, {}))
    assert (
        cfg.target_modules() == ["gate_proj", "up_proj", "down_proj"] and cfg.quantization_bit == 4 and cfg.lora_r == 4
    )


def test_repeats_are_planned_once_and_full_alone_needs_no_ranks():
    assert [c["name"] for c in sweep.plan(["lora", "lora"], [8, 8.0], ["all", "all"])] == ["lora-r8-all"]
    assert [c["name"] for c in sweep.plan(["full"], [], [])] == ["full"]


def test_every_problem_with_the_lists_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        sweep.plan(["lora", "qlora3"], [8, 2.5, 0], ["attention", "heads"])
    problems = caught.value.problems
    assert len(problems) == 3
    assert "methods: 'qlora3'" in problems[0] and "full, lora, qlora4, qlora8" in problems[0]
    assert "target_presets: 'heads'" in problems[1] and "all, attention, mlp, auto" in problems[1]
    assert "ranks: [8, 2.5, 0]" in problems[2]


def test_check_reports_list_metric_and_training_problems_together():
    with pytest.raises(ConfigError) as caught:
        sweep.check(["lora"], [0], ["all"], {"learning_rate": 3.0, "lora_alpha": 16}, primary_metric="bleu")
    text = str(caught.value)
    assert "ranks: [0]" in text and "primary_metric: 'bleu'" in text and "learning_rate: must be in (0, 1)" in text
    assert len(sweep.check(["lora", "full"], [4, 8], ["all"], {"learning_rate": 1e-3, "lora_alpha": 16})) == 3


def _trained(method: str, rank: int | None, uri: str) -> TrainedModel:
    return TrainedModel(
        uri,
        "ab" * 32,
        method,
        {"lora_r": rank, "quantization_bit": 4 if method == "qlora" else None},
        {
            "trainable_params": 2048,
            "total_params": 150_000,
            "train_seconds": 4.5,
            "tokens_per_second": 300.0,
            "peak_memory_bytes": 600 * 2**20,
            "loss_history": [[1, 7.0]],
        },
    )


def _evaluation(loss: float, rouge: float | None = None) -> Evaluation:
    return Evaluation(
        "s3://b/e/1",
        "cd" * 32,
        "ef" * 32,
        7.5,
        loss,
        1800.0,
        900.0,
        6,
        1200,
        None,
        rouge,
        None,
        None,
        None,
        None,
        "p",
        "b",
        "t",
    )


def test_a_candidate_row_is_read_from_the_steps_results():
    (candidate,) = sweep.plan(["qlora4"], [8], ["attention"])
    row = sweep.candidate_row(candidate, _trained("qlora", 8, "s3://b/m/1"), _evaluation(6.5))
    assert (row.name, row.method, row.rank, row.targets) == ("qlora4-r8-attention", "qlora4", 8, "attention")
    assert (row.trainable_params, row.total_params, row.peak_memory_bytes) == (2048, 150_000, 600 * 2**20)
    assert (row.train_seconds, row.tokens_per_second) == (4.5, 300.0)
    assert row.value("eval_loss") == 6.5 and row.value("perplexity") == 900.0
    assert row.value("rougeL") is None and row.value("chrf") is None  # no samples were scored
    assert (
        sweep.candidate_row(candidate, _trained("qlora", 8, "s3://b/m/1"), _evaluation(6.5, 0.25)).value("rougeL")
        == 0.25
    )
    (full,) = sweep.plan(["full"], [], [])
    assert sweep.candidate_row(full, _trained("full", None, "s3://b/m/2"), _evaluation(6.0)).rank is None


def test_the_cli_rejects_a_bad_sweep_in_one_message_before_starting_anything(tmp_path):
    proc = run_cli(
        "-m",
        "kftune.cli",
        "pipeline",
        "sweep",
        "--state-dir",
        str(tmp_path / "stack"),
        "--methods",
        "lora",
        "--ranks",
        "0",
        "--learning-rate",
        "2",
        "--pipeline-root",
        str(tmp_path / "runs"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "ranks: [0]" in proc.stderr and "learning_rate: must be in (0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())  # no stack, no run folder


def test_the_sweep_is_logged_to_mlflow_as_a_parent_run_with_a_child_run_per_candidate(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from kftune.steps import DataSplit
    from kftune.sweep import compare

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # a real store, embedded: no server needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    planned = sweep.plan(["lora", "full"], [4, 8], ["all"])
    results = {
        c["name"]: (_trained(c["method"], c["rank"] or None, f"s3://b/m/{i}"), _evaluation(6.0 + i / 10))
        for i, c in enumerate(planned)
    }
    comparison = compare.rank(sweep.candidate_row(c, *results[c["name"]]) for c in planned)
    compare.write_reports(comparison, tmp_path / "reports")
    data = DataSplit("s3://b/d/1", "ef" * 32, "s3://b/d/1/train.jsonl", "s3://b/d/1/eval.jsonl", 18, 6, "12" * 32)

    parent, url = sweep.log_to_mlflow("sweeps", comparison, tmp_path / "reports", data, results, "s3://b/sweeps/1")

    assert url == ""  # a file store has no web page
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert runs[parent].data.params["winner"] == comparison.winner.name == "lora-r4-all"
    assert runs[parent].data.params["dataset_sha256"] == data.dataset_sha256
    assert runs[parent].data.metrics == {"candidates": 3, "winner_eval_loss": 6.0}
    assert sorted(a.path for a in client.list_artifacts(parent, "comparison")) == [
        f"comparison/comparison.{ext}" for ext in ("html", "json", "md", "png")
    ]
    children = {r.info.run_name: r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {"lora-r4-all", "lora-r8-all", "full"} and len(runs) == 4
    lora8 = children["lora-r8-all"].data
    assert (
        lora8.params["method"] == "lora" and lora8.params["lora_r"] == "8" and lora8.tags["trained_uri"] == "s3://b/m/1"
    )
    assert lora8.metrics["eval_loss"] == 6.1 and lora8.metrics["place"] == 2
    assert lora8.metrics["relative_quality"] == pytest.approx(6.0 / 6.1)
    assert lora8.metrics["peak_memory_bytes"] == 600 * 2**20 and lora8.metrics["tokens_per_second"] == 300.0
    assert "rougeL" not in lora8.metrics  # not measured: not logged as a number
    assert children["full"].data.params["method"] == "full" and "lora_r" not in children["full"].data.params
    assert all(r.info.status == "FINISHED" for r in runs.values())
