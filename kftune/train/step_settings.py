"""The training settings a pipeline step takes: the guide's config keys a method uses, checked before anything runs.

kftune.steps re-exports these; the train components call `steps.train_settings(locals())`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kftune.core.errors import KftuneError
from kftune.train.config import METHODS, TrainConfig, resolve, with_method_defaults

# what a model's MLflow run records of its training config (None for keys its method does not use)
TRAIN_PARAMS = (
    "base_model",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "quantization_bit",
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "seed",
    "data_mix",
)
# the training settings a pipeline passes to its train component, each a TrainConfig key
TRAIN_SETTINGS = tuple(k for k in TRAIN_PARAMS if k != "base_model")


def train_values(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The guide's config keys for `method`: settings a method does not use are dropped, not contradicted."""
    if method not in METHODS:
        raise KftuneError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values = with_method_defaults(method, dict(settings))
    if method == "full":
        values = {k: v for k, v in values.items() if not k.startswith("lora_") and k != "quantization_bit"}
    elif method == "lora":
        values = {k: v for k, v in values.items() if k != "quantization_bit"} | {"use_lora": True}
    else:
        values["use_qlora"] = True
    return values


def train_settings(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings among a train component's parameters (its `locals()`); "" targets mean automatic."""
    settings = {k: parameters[k] for k in TRAIN_SETTINGS}
    settings["lora_target_modules"] = settings["lora_target_modules"] or None
    return settings


def check_train_settings(method: str, settings: Mapping[str, Any]) -> TrainConfig:
    """Validate the training settings before anything runs; every problem is reported at once."""
    placeholders = {"base_model": "base", "data_path": "train.jsonl", "output_dir": "out"}
    return resolve({**placeholders, **train_values(method, settings)}, {}, file_label="pipeline parameters")


def eval_every(cfg: TrainConfig, train_rows: int, points: int = 10) -> int:
    """Steps between evaluations during training so the report's eval-loss curve has about `points` points."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * math.ceil(train_rows / per_step))
    return max(1, total // points)
