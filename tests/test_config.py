"""The config: the guide's keys, precedence, and every problem reported at once."""

import json

import pytest

from kftune.core.errors import ConfigError
from kftune.train.config import SEVEN_PROJECTIONS, parse_args, resolve

from .conftest import REPO, run_cli


def test_guide_configs_carry_the_guides_values():
    lora = parse_args(["--config_file", "configs/train_config_lora.json"])
    assert (lora.method, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.learning_rate) == (
        "lora",
        64,
        16,
        0.1,
        1e-4,
    )
    assert lora.target_modules() == SEVEN_PROJECTIONS.split(",")
    qlora = parse_args(["--config_file", "configs/train_config_qlora.json"])
    assert (qlora.method, qlora.quantization_bit, qlora.learning_rate, qlora.target_modules()) == (
        "qlora",
        4,
        2e-4,
        None,
    )
    assert parse_args(["--config_file", "configs/train_config_qlora_8bit.json"]).quantization_bit == 8
    assert parse_args(["--config_file", "configs/train_config_full.json"]).method == "full"


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"use_lora": True, "lora_r": 32, "lora_alpha": 64}))
    cfg = parse_args(["--config_file", str(path), "--lora_r", "8", "--use_lora", "true"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 64, 0.1)


def test_guide_flag_form():
    cfg = parse_args(
        "--use_lora --lora_r 64 --lora_alpha 16 --data_path data/store_xhs_sft_samples.jsonl "
        "--output_dir ./output_lora --learning_rate 1e-4".split()
    )
    assert (cfg.use_lora, cfg.output_dir, cfg.lora_target_modules) == (True, "./output_lora", None)
    assert parse_args(["--use_lora", "--lora_target_modules", "null"]).target_modules() is None
    assert parse_args(["--use_lora", "--lora_target_modules", "q_proj, v_proj"]).target_modules() == [
        "q_proj",
        "v_proj",
    ]


def test_every_problem_at_once_naming_each_key():
    with pytest.raises(ConfigError) as err:
        resolve(
            {
                "lora_rank": 8,
                "lora_r": 0,
                "lora_dropout": 1.5,
                "quantization_bit": 3,
                "learning_rate": "fast",
                "use_lora": "yes",
                "eval_steps": 10,
            },
            {},
        )
    text = str(err.value)
    for expected in (
        "unknown key lora_rank; did you mean lora_r?",
        "lora_r: must be >= 1",
        "lora_dropout: must be in [0, 1)",
        "quantization_bit: must be 4 or 8",
        'learning_rate: got "fast"',
        'use_lora: got "yes"',
        "eval_steps is > 0 but eval_data_path is not set",
        "quantization_bit is set but use_qlora is false",
    ):
        assert expected in text, expected


def test_bools_are_not_numbers_and_ints_are_floats():
    with pytest.raises(ConfigError, match="lora_r: got true"):
        resolve({"use_lora": True, "lora_r": True}, {})
    assert resolve({"num_train_epochs": 2}, {}).num_train_epochs == 2.0


def test_lora_keys_without_lora_is_a_contradiction():
    with pytest.raises(ConfigError, match="lora_r set but neither use_lora nor use_qlora"):
        parse_args(["--config_file", "configs/train_config_full.json", "--lora_r", "8"])


def test_cli_reports_config_problems_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"use_lora": True, "lora_rr": 8, "lora_dropout": -1}))
    proc = run_cli("fine_tune_qwen.py", "--config_file", str(bad), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown key lora_rr; did you mean lora_r?" in proc.stderr and "lora_dropout" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_configs_are_all_present():
    names = sorted(p.name for p in (REPO / "configs").glob("train_config_*.json"))
    assert names == [
        "train_config_full.json",
        "train_config_lora.json",
        "train_config_qlora.json",
        "train_config_qlora_8bit.json",
    ]


def test_readme_documents_every_key_with_its_default():
    from kftune.train.config import FIELDS

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, f in FIELDS.items():
        assert f"| `{name}` | `{json.dumps(f.default)}` |" in readme, name


@pytest.mark.parametrize(
    "command",
    [
        ["fine_tune_qwen.py"],
        ["inference_lora.py"],
        ["-m", "kftune.cli", "merge"],
        ["-m", "kftune.cli", "tiny-model"],
        ["-m", "kftune.cli", "sample-data"],
    ],
)
def test_help_lists_the_flags(command):
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr
