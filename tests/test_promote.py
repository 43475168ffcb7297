"""Registration's plain parts: lineage tags, the config hash, the model card, registry URIs (no server needed)."""

import json

import pytest

from kftune.core.errors import KftuneError
from kftune.registry.modelcard import render
from kftune.registry.promote import config_sha256, lineage
from kftune.registry.tracking import parse_models_uri

EVALUATION = {
    "eval_rows": 60,
    "eval_sha256": "c" * 64,
    "base_model": "s3://b/base/" + "b" * 64,
    "settings": {"samples": 8, "max_new_tokens": 256},
    "base": {"eval_loss": 8.6, "perplexity": 5430.0, "rougeL": 0.05},
    "tuned": {"eval_loss": 3.6, "perplexity": 36.6, "rougeL": 0.41},
}


def _model(tmp_path, **config):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "kftune_config.json").write_text(json.dumps(config))
    return folder


def test_lineage_reads_the_models_own_config(tmp_path):
    folder = _model(tmp_path, base_model="s3://b/base/x", use_qlora=True, quantization_bit=4, lora_r=16)
    tags = lineage(folder, dataset_sha256="d" * 64, git_commit="e" * 40, pipeline_run="run-1")
    assert tags == {
        "method": "qlora",
        "lora_r": "16",
        "quantization_bit": "4",
        "base_model": "s3://b/base/x",
        "dataset_sha256": "d" * 64,
        "config_sha256": config_sha256(folder),
        "git_commit": "e" * 40,
        "pipeline_run": "run-1",
    }
    full = lineage(_model(tmp_path, base_model="m", lora_r=16, quantization_bit=4))
    assert full["method"] == "full" and "lora_r" not in full and "quantization_bit" not in full
    assert "git_commit" not in full  # an empty fact is left out, not tagged ""


def test_the_config_hash_ignores_where_files_were(tmp_path):
    first = config_sha256(_model(tmp_path, lora_r=8, output_dir="/tmp/a", data_path="/tmp/x.jsonl"))
    assert first == config_sha256(_model(tmp_path, lora_r=8, output_dir="/tmp/b", data_path="/tmp/y.jsonl"))
    assert first != config_sha256(_model(tmp_path, lora_r=16, output_dir="/tmp/a", data_path="/tmp/x.jsonl"))
    assert config_sha256(tmp_path) == ""  # no config, no hash


def test_the_model_card_has_lineage_data_metrics_and_loading(tmp_path):
    tags = {"method": "lora", "lora_r": "16", "dataset_sha256": "d" * 64}
    card = render(
        name="xhs",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        lineage=tags,
        evaluation=EVALUATION,
        data={"train_rows": 540, "tokens_p90": 230},
    )
    assert card.startswith("# xhs\n")
    for expected in (
        "| lora r | `16` |",
        "| train rows | 540 |",
        "| eval loss (assistant tokens) | 8.6 | 3.6 |",
        "| ROUGE-L (characters) | 0.05 | 0.41 |",
        'mlflow.pyfunc.load_model("models:/xhs@champion")',
        'mlflow.transformers.load_model("models:/xhs@champion")',
        "mlflow models serve -m models:/xhs@champion --env-manager local",
        'load_registered("models:/xhs@champion")',
        "kftune registry storage-uri xhs@champion",
        "AutoModelForCausalLM.from_pretrained",
    ):
        assert expected in card, expected
    assert "## Training data" not in render(name="xhs", base_model="b", lineage=tags, evaluation=EVALUATION)


def test_an_adapter_is_refused_with_how_to_merge_it(tmp_path):
    from kftune.registry.mlflow_model import refuse_adapter

    refuse_adapter(_model(tmp_path, base_model="b"), "s3://b/m")  # a full model passes
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(
        KftuneError, match=r"s3://b/m is a LoRA adapter; register a merged model instead: `kftune merge"
    ):
        refuse_adapter(tmp_path / "model", "s3://b/m")


def test_the_input_example_is_a_chat_request_ending_at_the_user(tmp_path):
    from kftune.registry.mlflow_model import input_example

    row = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert input_example(row, 64) == {"messages": row[:2], "max_tokens": 64, "temperature": 0.0}
    with pytest.raises(KftuneError, match="no user message"):
        input_example([{"role": "assistant", "content": "a"}], 8)


def test_registry_uris():
    assert parse_models_uri("models:/xhs@champion") == ("xhs", "champion", None)
    assert parse_models_uri("models:/team/xhs/3") == ("team/xhs", None, "3")
    for bad in ("runs:/abc/model", "models:/", "models:/xhs/latest"):
        with pytest.raises(KftuneError, match="models:/<name>@<alias>"):
            parse_models_uri(bad)
