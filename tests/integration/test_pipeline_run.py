"""The whole DAG through kfp.local against the session's real SeaweedFS and MLflow server, per method."""

from __future__ import annotations

import json

import pytest
import torch

from kftune.core.errors import KftuneError
from kftune.core.storage import MANIFEST, download_dir, sha256_file, upload_file
from kftune.dev.stack import free_ports
from pipelines.local import RunSummary, run

from ..conftest import assert_generates, run_cli

pytestmark = pytest.mark.integration
# A few steps on the tiny model: enough to move the weights, small enough for ~1 minute a method.
QUICK = {
    "max_steps": 3,
    "learning_rate": 1e-2,
    "lora_r": 8,
    "lora_alpha": 16,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 256,
    "eval_fraction": 0.25,
    "sample_tokens": 8,
    "eval_samples": 2,
}


# LoRA trains in two processes (train_processes=2 on a CPU machine stands in for two GPUs: two gloo
# processes, one published model), so one run covers both the method and accelerate launch.
PROCESSES = {"full": 1, "lora": 2, "qlora": 1}


@pytest.fixture(scope="module", params=list(PROCESSES))
def finished(request, inputs, task_env, tmp_path_factory) -> tuple[str, RunSummary]:
    method = request.param
    arguments = {
        **inputs,
        **QUICK,
        "method": method,
        "quantization_bit": 4,
        "registered_model_name": f"test-{method}",
        "train_processes": PROCESSES[method],
    }
    return method, run(arguments, task_env, tmp_path_factory.mktemp(f"root-{method}"), progress=None)


def test_every_step_ran_and_the_adapter_methods_merged(finished):
    method, summary = finished
    expected = (
        ["validate-data", "train", "evaluate"] + (["merge-adapter"] if method != "full" else []) + ["register-model"]
    )
    assert list(summary.seconds) == expected
    assert all(s > 0 for s in summary.seconds.values())
    assert summary.trained.method == method and (summary.merged is None) == (method == "full")
    rendered = summary.render()
    for step in expected:
        assert step in rendered
    assert summary.registration.run_url in rendered


def test_artifacts_are_in_the_bucket_and_verify(finished, s3, small_data, tmp_path):
    _, summary = finished
    assert summary.data.dataset_sha256 == sha256_file(small_data)
    for name, result in {
        "data": summary.data,
        "trained": summary.trained,
        "evaluation": summary.evaluation,
        "merged": summary.merged,
    }.items():
        if result is None:
            continue
        folder = result.uri
        bucket, key = folder[5:].split("/", 1)
        assert key.rsplit("/", 1)[1] == result.sha256
        s3.client.head_object(Bucket=bucket, Key=f"{key}/{MANIFEST}")
        local = download_dir(folder, tmp_path / name, s3)  # checks every file against the manifest
        assert len(list(local.iterdir())) > 1
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["tuned"]["eval_loss"] == pytest.approx(summary.evaluation.eval_loss)
    assert summary.evaluation.eval_rows == summary.data.eval_rows > 0 and summary.evaluation.eval_tokens > 0
    samples = (tmp_path / "evaluation" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == QUICK["eval_samples"] and summary.evaluation.rougeL is not None


def test_the_evaluate_task_emits_the_report_as_its_html_output(finished):
    _, summary = finished
    page = summary.report.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 2  # loss curve, scores
    assert 'aria-label="token-length histogram"' in page  # inline SVG, drawn once for both reports
    assert str(summary.report) in summary.render()


def test_the_mlflow_run_holds_params_and_metrics(finished, stack):
    from mlflow import MlflowClient

    method, summary = finished
    reg = summary.registration
    run_data = MlflowClient(stack.mlflow_url).get_run(reg.run_id).data
    params, metrics = run_data.params, run_data.metrics
    assert params["method"] == method
    assert params["dataset_sha256"] == summary.data.dataset_sha256
    assert params.get("lora_r") == (None if method == "full" else "8")
    assert params.get("quantization_bit") == ("4" if method == "qlora" else None)
    assert params["base_model"].startswith("s3://")
    for name in ("train_loss", "eval_loss", "base_eval_loss", "perplexity", "base_perplexity"):
        assert name in metrics
    assert metrics["eval_loss"] == pytest.approx(summary.evaluation.eval_loss)
    assert ("max_abs_logit_diff" in metrics) == (method != "full")
    assert reg.run_url.startswith(stack.mlflow_url) and reg.run_id in reg.run_url


def test_the_registered_version_is_an_mlflow_model_which_loads_and_generates(
    finished, stack, s3, tiny_model, tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kftune.registry.mlflow_model import HF_SUBDIR, download

    method, summary = finished
    reg = summary.registration
    version = MlflowClient(stack.mlflow_url).get_model_version(reg.name, reg.version)
    expected = summary.merged or summary.trained
    assert version.source == reg.source and version.source.startswith("models:/m-")
    assert version.tags["candidate_uri"] == expected.uri and version.run_id == reg.run_id
    assert version.tags["method"] == method and version.tags["artifact_sha256"] == expected.sha256
    assert version.tags["pipeline_run"].startswith("kftune-finetune") and len(version.tags.get("git_commit", "")) in (
        0,
        40,
    )
    assert version.tags["gate.decision"] == ("champion" if reg.promoted else "challenger")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    folder = download(version, tmp_path / "registered")  # MLflow's download, checked against MANIFEST.json
    assert "## How to load it" in (folder / HF_SUBDIR / "README.md").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder / HF_SUBDIR)
    model = AutoModelForCausalLM.from_pretrained(folder / HF_SUBDIR, dtype=torch.float32)
    assert_generates(model, tokenizer)
    if method != "full":  # the adapter itself loads with peft on the base, too
        from peft import PeftModel

        adapter = download_dir(summary.trained.uri, tmp_path / "adapter", s3)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        assert_generates(PeftModel.from_pretrained(base, adapter), tokenizer)


def test_a_wrong_s3_secret_fails_once_naming_s3(inputs, task_env, stack, tmp_path):
    env = {**task_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    with pytest.raises(KftuneError) as caught:
        run({**inputs, **QUICK, "method": "lora"}, env, tmp_path, progress=None)
    message = str(caught.value)
    assert f"S3 at {stack.s3_endpoint} rejected the credentials" in message
    assert "validate-data" in message and "Traceback" not in message and "not-the-secret" not in message
    (log,) = tmp_path.glob("run-*/tasks.log")
    assert stack.secret_key not in log.read_text()


def test_a_stopped_mlflow_server_fails_early_naming_mlflow(inputs, task_env, tmp_path):
    (port,) = free_ports(1)  # nothing listens there: a stopped server
    env = {**task_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    with pytest.raises(KftuneError) as caught:
        run({**inputs, **QUICK, "method": "lora"}, env, tmp_path, progress=None)
    message = str(caught.value)
    assert f"cannot reach MLflow at http://127.0.0.1:{port}" in message
    assert "validate-data" in message and "Traceback" not in message
    assert not list(tmp_path.glob("run-*/*/train"))  # it stopped before training


def test_a_failing_data_gate_stops_the_run_before_training_with_the_report_in_s3(
    inputs, task_env, stack, s3, small_data, tmp_path
):
    lines = small_data.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"  # every third row broken: far above the 5% reject limit
    bad.write_text("\n".join(line if i % 3 else line[:-5] for i, line in enumerate(lines)) + "\n", encoding="utf-8")
    data_uri = upload_file(bad, f"s3://{stack.bucket}/inputs/bad", s3).uri
    with pytest.raises(KftuneError) as caught:
        run({**inputs, **QUICK, "data_uri": data_uri, "method": "lora"}, task_env, tmp_path / "root", progress=None)
    message = str(caught.value)
    assert "data validation gate failed" in message and "validate-data" in message, message
    assert "\n" not in message and "Traceback" not in message and "top rules: parse.invalid_json" in message, message
    assert not list((tmp_path / "root").glob("run-*/*/train"))  # no training task started
    report_uri = message.split("report: ", 1)[1].split(" ", 1)[0].removesuffix("/report.html")
    report = download_dir(report_uri, tmp_path / "report", s3)
    rejected = [json.loads(line) for line in (report / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejected) == len(lines[::3]) and json.loads((report / "report.json").read_text())["passed"] is False


def test_a_gate_stop_through_the_cli_is_one_line_naming_the_rule_and_the_fix(stack, tiny_model, tmp_path, alpaca_array):
    """An alpaca file as LLaMA-Factory ships one (its demo data where present) at 96 tokens: the run stops at the
    gate, and the user reads why and what to do in one line, not a traceback."""
    proc = run_cli(
        "-m",
        "kftune.cli",
        "pipeline",
        "run",
        "--state-dir",
        str(stack.state_dir),
        "--base-model",
        str(tiny_model),
        "--data-uri",
        str(alpaca_array),
        "--max-seq-length",
        "96",
        "--pipeline-root",
        str(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "pipeline step validate-data failed: data validation gate failed for s3://" in line
    assert (
        "% of rows rejected (" in line
        and f"of {len(json.loads(alpaca_array.read_text(encoding='utf-8')))}, above max_reject_fraction 0.05)" in line
    )
    assert "top rules: length.too_long " in line
    assert "to fix: length.too_long: raise --max-seq-length (now 96) or shorten the rows" in line
    assert "/rejected.jsonl, report: s3://" in line and "/report.html" in line
    assert not list(tmp_path.glob("run-*/*/train"))


def test_the_cli_reports_bad_settings_in_one_line_before_starting_anything(stack, tmp_path):
    proc = run_cli(
        "-m",
        "kftune.cli",
        "pipeline",
        "run",
        "--state-dir",
        str(stack.state_dir),
        "--lora-r",
        "0",
        "--learning-rate",
        "2",
        "--pipeline-root",
        str(tmp_path),
    )
    assert proc.returncode == 2
    assert "lora_r: must be >= 1" in proc.stderr and "learning_rate: must be in (0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_the_training_step_runs_one_process_per_device_under_accelerate_launch(finished, s3, tmp_path):
    method, summary = finished
    model = download_dir(summary.trained.uri, tmp_path / "model", s3)
    metrics = json.loads((model / "train_metrics.json").read_text())
    assert metrics["processes"] == PROCESSES[method] and metrics["global_steps"] == QUICK["max_steps"]
    if method != "full":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in model.iterdir()}
    assert summary.registration.version
