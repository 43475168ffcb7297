"""Benchmarks (lm-evaluation-harness) in `kftune evaluate` and the guard in the promotion gate, on tiny models.

A base that knows the smoke task's 24 facts (a tiny model fully tuned on them, acc 1.0) is tuned on narrow
shop-post data twice: with a destructive learning rate (its task loss still falls, the facts are lost) and
with a normal one (the facts stay). lm-eval scores both models of each evaluation from the objects already
loaded, on the same examples with the same seed. The destructive run is registered in a real (embedded)
MLflow store and stays challenger with the guard named; the normal run passes the guard. A task folder
written by the test itself (never seen by the project) runs through the CLI; an unknown task name and an
unreachable task's data each end in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kftune.core.errors import KftuneError
from kftune.evaluate import benchmarks
from kftune.evaluate.evaluation import Settings, evaluate
from kftune.registry import gate
from kftune.train.config import resolve
from kftune.train.training import run

from .conftest import run_cli

pytestmark = pytest.mark.slow  # trains three tiny full models (about 40 s on 2 cores)
GUARD = 0.1
FULL = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 256}
FULL |= {"precision": "fp32", "warmup_ratio": 0.0, "logging_steps": 2}
# measured: lr 1e-2 x 12 steps takes the eval loss 10.1 -> 6.3 and the smoke acc 1.0 -> 0.38;
# lr 1e-3 x 6 steps takes it 10.1 -> 7.5 and leaves the smoke acc at 1.0
DESTRUCTIVE, NORMAL = {"learning_rate": 1e-2, "max_steps": 12}, {"learning_rate": 1e-3, "max_steps": 6}


def _train(base: Path, data: Path, out: Path, **settings) -> Path:
    values = {"base_model": str(base), "data_path": str(data), "output_dir": str(out), **FULL, **settings}
    return run(resolve(values, {})).output_dir


@pytest.fixture(scope="module")
def knowing_base(tiny_model, tmp_path_factory) -> Path:
    """The tiny model taught the smoke task's facts (question -> the right city), so it has a score to lose."""
    folder = tmp_path_factory.mktemp("knowing")
    facts = [json.loads(line) for line in (benchmarks.SMOKE / "kftune_smoke.jsonl").read_text("utf-8").splitlines()]
    rows = [{"instruction": f["question"], "output": f["choices"][f["answer"]]} for f in facts]
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    settings = {
        "learning_rate": 3e-3,
        "max_steps": 60,
        "per_device_train_batch_size": 8,
        "lr_scheduler_type": "constant",
    }
    return _train(tiny_model, data, folder / "model", **settings)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    from kftune.dev.sample_data import write_samples

    return write_samples(tmp_path_factory.mktemp("eval") / "eval.jsonl", rows=6, seed=7)


def _evaluated(knowing_base, small_data, eval_data, folder: Path, settings) -> tuple[Path, Path, dict]:
    model = _train(knowing_base, small_data, folder / "model", **settings)
    metrics = evaluate(
        str(model),
        str(eval_data),
        folder / "evaluation",
        settings=Settings(samples=0, precision="fp32"),
        benchmarks="kftune_smoke",
        guard_max_drop=GUARD,
    )
    return model, folder / "evaluation", metrics


def test_a_destructive_run_loses_the_smoke_score_and_stays_challenger(
    knowing_base, small_data, eval_data, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from kftune.registry.promote import lineage, register

    model, evaluation, metrics = _evaluated(knowing_base, small_data, eval_data, tmp_path, DESTRUCTIVE)
    smoke = metrics["benchmarks"]["kftune_smoke"]
    assert smoke["metric"] == "acc" and smoke["examples"] == 24 and smoke["higher_is_better"] is True
    assert smoke["base"] == 1.0 and smoke["tuned"] < 1.0 - GUARD  # the score its base had is lost
    assert smoke["stderr"] > 0 and smoke["delta"] == pytest.approx(smoke["tuned"] - 1.0)
    assert metrics["tuned"]["eval_loss"] < 0.9 * metrics["base"]["eval_loss"]  # while the task loss fell
    assert metrics["benchmark_settings"]["limit"] is None and metrics["benchmark_settings"]["guard_max_drop"] == GUARD
    saved = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    assert saved["benchmarks"] == metrics["benchmarks"]
    report = (evaluation / "report.html").read_text(encoding="utf-8")
    assert "kftune_smoke" in report and "✗ beyond the guard" in report

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # a real store, embedded: no server needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("guarded", artifact_location=(tmp_path / "artifacts").as_uri())
    result = register(
        "guarded",
        experiment="guarded",
        model_uri=str(model),
        model_sha256="a" * 64,
        evaluation_dir=evaluation,
        lineage_tags=lineage(model),
        max_drop=GUARD,
    )
    assert not result.promoted
    assert result.reasons[0].startswith("eval_loss") and "beats the base's" in result.reasons[0]
    assert result.reasons[1].startswith("guard kftune_smoke acc") and "beyond the guard" in result.reasons[1]
    version = client.get_model_version("guarded", result.version)
    assert version.tags["gate.decision"] == "challenger" and version.tags["gate.guard_max_drop"] == str(GUARD)
    assert version.tags["guard.kftune_smoke.acc"].startswith("fail: base 1.0 tuned ")
    assert float(version.tags["bench.kftune_smoke_acc"]) == smoke["tuned"]
    logged = client.get_run(result.run_id).data.metrics
    assert logged["bench_kftune_smoke_acc"] == smoke["tuned"] and logged["base_bench_kftune_smoke_acc"] == 1.0


def test_a_normal_run_passes_the_guard(knowing_base, small_data, eval_data, tmp_path):
    _, _, metrics = _evaluated(knowing_base, small_data, eval_data, tmp_path, NORMAL)
    decision = gate.decide(metrics["tuned"], metrics["base"], None, benchmarks=metrics["benchmarks"], max_drop=GUARD)
    assert decision.promote, decision.reasons
    assert decision.guards[0].passed and decision.guards[0].base == 1.0
    assert "stays within the guard" in decision.reasons[1]


def _task_folder(folder: Path) -> Path:
    """A multiple-choice task the project has never seen: lm-eval YAML with its data file beside it."""
    folder.mkdir()
    docs = [{"q": f"第{i}题：{i} 加 1 等于几？", "options": [str(i + 1), str(i + 7)], "label": 0} for i in range(10)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    (folder / "adding.yaml").write_text(
        "task: adding_test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: docs.jsonl\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{options}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc_norm\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1\n",
        encoding="utf-8",
    )
    return folder


def test_a_task_folder_never_seen_runs_from_the_cli(knowing_base, tiny_model, eval_data, tmp_path):
    folder = _task_folder(tmp_path / "my-tasks")
    proc = run_cli(
        "-m", "kftune.cli", "evaluate", "--model", str(knowing_base), "--base_model", str(tiny_model),
        "--eval_data", str(eval_data), "--output_dir", str(tmp_path / "ev"), "--samples", "0",
        "--benchmarks", str(folder), "--benchmark_limit", "6", "--precision", "fp32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((tmp_path / "ev" / "metrics.json").read_text())["benchmarks"]["adding_test"]
    assert row["metric"] == "acc_norm" and row["examples"] == 6
    assert 0 <= row["base"] <= 1 and 0 <= row["tuned"] <= 1 and row["stderr"] is not None
    assert "adding_test acc_norm" in proc.stdout  # the printed table


def test_an_unknown_task_names_the_closest_known_ones():
    with pytest.raises(KftuneError) as caught:
        benchmarks.plan("arc_easyy,kftune_smoke")
    assert str(caught.value).startswith("--benchmarks: unknown task 'arc_easyy'; closest known: arc_easy")
    with pytest.raises(KftuneError, match="--benchmarks ./nowhere/tasks: no such folder"):
        benchmarks.plan("./nowhere/tasks")
    with pytest.raises(KftuneError, match="--benchmark_limit must be >= 1"):
        benchmarks.plan("kftune_smoke", 0)


def test_a_task_whose_data_cannot_be_fetched_ends_in_one_line(tiny_model, eval_data, tmp_path):
    """No hub is reachable here: arc_easy's data (allenai/ai2_arc) cannot be downloaded."""
    proc = run_cli(
        "-m", "kftune.cli", "evaluate", "--model", str(tiny_model), "--base_model", str(tiny_model),
        "--eval_data", str(eval_data), "--output_dir", str(tmp_path / "ev"), "--benchmarks", "arc_easy",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: benchmark arc_easy: its data could not be loaded (")
    assert "give a local task folder instead (--benchmarks PATH" in line
    assert not (tmp_path / "ev").exists()
