"""Weighted data mixing: each source drawn at its share (fixed seed), the task data drawn whole, the
held-out split the task's own, every source through the gate, and bad input stopped in one line."""

from __future__ import annotations

import json
import math

import pytest

from kftune.core.errors import ConfigError, KftuneError
from kftune.data.mixing import Source, mix, parse
from kftune.data.rules import Options
from kftune.train.config import resolve
from kftune.train.mixed_rows import mixed_training_rows

from .conftest import run_cli


def _rows(tag: str, n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"{tag} question {i}"}, {"role": "assistant", "content": f"{tag} {i}"}]
        for i in range(n)
    ]


def _write(path, tag: str, n: int):
    path.write_text(
        "".join(
            json.dumps(
                {"instruction": f"{tag} 问题 {i} 是什么？", "output": f"{tag} 的回答 {i}，写得清楚一些。"},
                ensure_ascii=False,
            )
            + "\n"
            for i in range(n)
        ),
        encoding="utf-8",
    )
    return path


def test_each_source_is_drawn_at_its_share_and_the_task_data_whole():
    task = _rows("task", 600)
    small, large = _rows("small", 40), _rows("large", 2000)  # a small source is repeated, a large one sampled
    rows, drawn = mix(task, [(Source("small", 0.2), small), (Source("large", 0.1), large)], seed=7)
    assert drawn[0] == 600 and sum(drawn) == len(rows)
    n = len(rows)
    for weight, count in zip((0.7, 0.2, 0.1), drawn):
        sigma = math.sqrt(weight * (1 - weight) / n)
        assert abs(count / n - weight) < 4 * sigma, (weight, count, n)  # within sampling error
    assert sorted(r[0]["content"] for r in rows if r[0]["content"].startswith("task")) == sorted(
        r[0]["content"] for r in task
    )  # every task row exactly once
    again, drawn_again = mix(task, [(Source("small", 0.2), small), (Source("large", 0.1), large)], seed=7)
    assert again == rows and drawn_again == drawn  # the seed fixes the draw
    other, _ = mix(task, [(Source("small", 0.2), small), (Source("large", 0.1), large)], seed=8)
    assert other != rows
    assert mix(task, [], seed=7) == (task, [600])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            '[{"uri": "g.jsonl", "weight": 0}]',
            "data_mix[0].weight (g.jsonl): must be between 0 and 1 (exclusive), got 0",
        ),
        ('[{"uri": "g.jsonl", "weight": 1}]', "must be between 0 and 1 (exclusive), got 1"),
        ('[{"uri": "g.jsonl", "weight": -0.2}]', "got -0.2"),
        ('[{"uri": "g.jsonl", "weight": NaN}]', "data_mix[0].weight (g.jsonl): expected a finite number, got NaN"),
        ('[{"uri": "g.jsonl", "weight": "0.2"}]', 'expected a finite number, got "0.2"'),
        (
            '[{"uri": "a", "weight": 0.6}, {"uri": "b", "weight": 0.4}]',
            "data_mix: the weights sum to 1; they must sum to less than 1",
        ),
        ('[{"url": "g.jsonl", "weight": 0.2}]', 'data_mix[0]: expected an object with exactly "uri" and "weight"'),
        ('[{"uri": "", "weight": 0.2}]', "data_mix[0].uri: expected a data file path or s3:// URI"),
        ("{oops", "data_mix: not JSON"),
        ("{}", "data_mix: expected a non-empty JSON list"),
    ],
)
def test_bad_weights_and_sources_are_one_line_naming_the_key(value, expected):
    with pytest.raises(KftuneError) as caught:
        parse(value)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError) as config:  # the config checks it with every other key, before anything runs
        resolve({"data_mix": json.loads(value) if value.startswith("[") and "NaN" not in value else value}, {})
    assert any("data_mix" in p for p in config.value.problems)


def test_a_json_config_may_hold_the_list_itself():
    cfg = resolve({"data_mix": [{"uri": "general.jsonl", "weight": 0.25}]}, {})
    assert parse(cfg.data_mix) == [Source("general.jsonl", 0.25)]


def test_a_bad_mix_trains_nothing(tmp_path):
    proc = run_cli(
        "fine_tune_qwen.py", "--output_dir", str(tmp_path / "out"), "--data_mix", '[{"uri": "g.jsonl", "weight": 1.5}]'
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data_mix[0].weight (g.jsonl): must be between 0 and 1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_source_passes_the_gate_and_a_bad_one_stops_in_one_line(tmp_path):
    task = _rows("task", 30)
    options = Options(eval_fraction=0.0)
    missing = json.dumps([{"uri": str(tmp_path / "missing.jsonl"), "weight": 0.2}])
    with pytest.raises(KftuneError, match=r"data_mix source .*missing.jsonl: .*data file not found"):
        mixed_training_rows(task, missing, 42, options, tmp_path / "r1")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"instruction": f"q{i}"}) + "\n" for i in range(12)), encoding="utf-8")
    with pytest.raises(KftuneError) as caught:
        mixed_training_rows(task, json.dumps([{"uri": str(broken), "weight": 0.2}]), 42, options, tmp_path / "r2")
    assert str(caught.value).startswith(f"data_mix source {broken}: no accepted rows (12 of 12 rejected")
    general = _write(tmp_path / "general.jsonl", "general", 40)
    rows, record = mixed_training_rows(
        task, json.dumps([{"uri": str(general), "weight": 0.25}]), 42, options, tmp_path / "r3"
    )
    assert record[0] == {"uri": "data_path", "weight": 0.75, "drawn": 30}
    assert record[1]["uri"] == str(general) and record[1]["rows_in"] == 40 and record[1]["accepted"] == 40
    assert record[1]["sha256"] == __import__("hashlib").sha256(general.read_bytes()).hexdigest()
    assert record[1]["drawn"] == len(rows) - 30 > 0
    report = json.loads((tmp_path / "r3" / "source-0" / "report.json").read_text())
    assert report["source"] == str(general) and report["accepted"] == 40  # the source's own gate report


@pytest.mark.slow
def test_a_mixed_run_records_the_mix_and_the_split_holds_no_mixed_row(tiny_model, tmp_path):
    """The task data is split by the gate; the mix is drawn into training only, so eval.jsonl is the task's."""
    from kftune.data.validate import validate
    from kftune.train.training import run

    task = _write(tmp_path / "task.jsonl", "任务", 40)
    general = _write(tmp_path / "general.jsonl", "通用", 30)
    split = validate(
        task, tmp_path / "split", Options(tokenizer=str(tiny_model), max_seq_length=256, eval_fraction=0.2, min_rows=1)
    )
    mix_value = [{"uri": str(general), "weight": 0.3}]
    result = run(
        resolve(
            {
                "base_model": str(tiny_model),
                "data_path": str(split.train_path),
                "eval_data_path": str(split.eval_path),
                "output_dir": str(tmp_path / "out"),
                "data_mix": mix_value,
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 256,
                "precision": "fp32",
            },
            {},
        )
    )
    drawn = result.metrics["data_mix"]
    assert drawn[0]["drawn"] == split.train_rows and drawn[1]["drawn"] > 0
    assert result.metrics["train_rows"] == split.train_rows + drawn[1]["drawn"]
    assert "通用" not in split.eval_path.read_text(encoding="utf-8")  # no mixed-in row is held out
    assert "通用" in (tmp_path / "general.jsonl").read_text(encoding="utf-8")
    out = result.output_dir
    assert json.loads((out / "kftune_fingerprint.json").read_text())["data_mix"] == drawn
    assert json.loads((out / "train_metrics.json").read_text())["data_mix"] == drawn
    assert json.loads((out / "data_mix" / "source-0" / "report.json").read_text())["accepted"] == 30
    assert json.loads(json.loads((out / "kftune_config.json").read_text())["data_mix"]) == mix_value


def test_the_model_card_shows_the_mix_and_the_benchmarks():
    from kftune.registry.modelcard import render

    mix = [
        {"uri": "data_path", "weight": 0.9, "drawn": 540},
        {"uri": "s3://b/general.jsonl", "sha256": "ab" * 32, "weight": 0.1, "drawn": 54, "accepted": 24},
    ]
    evaluation = {
        "base": {"eval_loss": 8.6},
        "tuned": {"eval_loss": 5.5},
        "benchmarks": {"kftune_smoke": {"metric": "acc", "base": 0.25, "tuned": 0.5, "examples": 24}},
    }
    card = render(
        name="m", base_model="b", lineage={}, evaluation=evaluation, data={"train_rows": 594, "data_mix": mix}
    )
    assert "| data_path | 0.9 | 540 | `` |" in card and f"| s3://b/general.jsonl | 0.1 | 54 | `{'ab' * 8}` |" in card
    assert "| kftune_smoke acc | 0.25 | 0.5 | 24 |" in card
    assert "data mix" not in card  # the mix is its own table, not a row of the statistics
