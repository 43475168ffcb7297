"""`kftune train` runs on tcmalloc where the library is installed (the `tcmalloc` lever), on glibc's malloc
otherwise or with the lever off; train_metrics.json says which, read from the process's own memory map."""

import json
import os

import pytest

from kftune.core.allocator import tcmalloc

from .conftest import run_cli
from .test_train import SHORT_RUN


@pytest.mark.parametrize("off", ["", "tcmalloc"])
def test_training_records_the_allocator_it_ran_on(tiny_model, small_data, tmp_path, off):
    out = tmp_path / "out"
    env = {"KFTUNE_LEVERS_OFF": off, "LD_PRELOAD": os.environ.get("LD_PRELOAD", "").replace("tcmalloc", "")}
    proc = run_cli(
        "fine_tune_qwen.py",
        "--config_file",
        "configs/train_config_lora.json",
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(out),
        *SHORT_RUN,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    expected = "tcmalloc" if tcmalloc() and not off else "glibc"
    assert metrics["levers_applied"]["allocator"] == expected
    assert ("tcmalloc" in metrics["levers_on"]) == (not off)
