"""Training through the guide's own commands, for all four configs, on the tiny Qwen2 model."""

import json

import pytest
import torch

from kftune.core.levers import LEVERS
from kftune.train import packed_attention

from .conftest import run_cli

# A short run that shows learning: high learning rate, small rank, many passes over 24 rows.
SHORT_RUN = [
    "--max_steps",
    "12",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "1",
    "--logging_steps",
    "1",
    "--warmup_ratio",
    "0",
    "--lr_scheduler_type",
    "constant",
    "--max_seq_length",
    "256",
]
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "kftune_config.json",
    "kftune_fingerprint.json",
    "train_metrics.json",
}
FULL_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "kftune_config.json",
    "kftune_fingerprint.json",
    "train_metrics.json",
}


def train_with_guide_command(config: str, tiny_model, small_data, out, *extra: str):
    proc = run_cli(
        "fine_tune_qwen.py",
        "--config_file",
        f"configs/train_config_{config}.json",
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(out),
        *SHORT_RUN,
        *extra,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    ("config", "extra", "files"),
    [
        ("lora", ["--lora_r", "8", "--learning_rate", "2e-2"], ADAPTER_FILES),
        ("qlora", ["--lora_r", "8", "--learning_rate", "2e-2"], ADAPTER_FILES),
        ("qlora_8bit", ["--lora_r", "8", "--learning_rate", "2e-2"], ADAPTER_FILES),
        ("full", ["--learning_rate", "2e-3"], FULL_FILES),
    ],
)
def test_guide_config_trains_and_writes_the_guides_files(config, extra, files, tiny_model, small_data, tmp_path):
    out = tmp_path / f"output_qwen_{config}"
    proc = train_with_guide_command(config, tiny_model, small_data, out, *extra)
    assert {p.name for p in out.iterdir()} == files
    metrics = json.loads((out / "train_metrics.json").read_text())
    losses = [loss for _, loss in metrics["loss_history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses  # falls on a short run
    assert "trainable params:" in proc.stderr and "trainable%:" in proc.stderr
    assert metrics["levers_on"] == list(LEVERS)  # every run records the levers it had on
    applied = metrics["levers_applied"]
    assert applied == {"lm_head": True, "packed_attention": packed_attention.NAME, "allocator": applied["allocator"]}
    assert applied["allocator"] in ("tcmalloc", "glibc")  # which one where: tests/test_allocator.py
    saved = json.loads((out / "kftune_config.json").read_text())
    assert saved["base_model"] == str(tiny_model) and saved["max_steps"] == 12
    if config != "full":
        assert (
            "found linear layers q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in proc.stderr
            or config == "lora"
        )
        assert metrics["target_modules"] == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    assert not list(tmp_path.glob(".*partial*")), "staging folder left behind"
