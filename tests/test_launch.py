"""Training with two processes (`kftune launch`: torchrun, DDP over gloo on CPU) on the tiny model.

The same LoRA run as the single-process guide test, split over two real processes: it must make
the same folder (only process zero writes and publishes it), leave no staging folder behind, and
train on both processes' shares of the data (2 x batch per step).
"""

import json

import torch

from .conftest import run_cli
from .test_train import ADAPTER_FILES, SHORT_RUN

LORA = ["--config_file", "configs/train_config_lora.json", "--lora_r", "8", "--learning_rate", "2e-2"]


def test_two_cpu_processes_train_like_one(tiny_model, small_data, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(
        "-m",
        "kftune.cli",
        "launch",
        "--num-processes",
        "2",
        *LORA,
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(out),
        *SHORT_RUN,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # no .ddp.partial left by either process
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_steps"] == 12
    losses = [loss for _, loss in metrics["loss_history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert proc.stderr.count("saved lora run to") == 1  # one process published


def test_launch_checks_the_process_count(tiny_model, small_data, tmp_path):
    proc = run_cli(
        "-m",
        "kftune.cli",
        "launch",
        "--num-processes",
        "0",
        *LORA,
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(tmp_path / "x"),
    )
    assert proc.returncode == 2 and "--num-processes 0" in proc.stderr and "Traceback" not in proc.stderr
