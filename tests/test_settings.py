"""One source for every training setting: TrainConfig and the guide's per-method configs.

KFP needs the train component's and the pipelines' parameters spelled out in their signatures; these
tests hold them to TrainConfig (same names, same types) and their defaults to the guide's config for
each method (configs/train_config_*.json), so the pipeline trains what the guide describes.
"""

from __future__ import annotations

import inspect
import json
import typing

import pytest

from components.train import train as train_component
from components.train_across_nodes import train_across_nodes
from kftune import steps
from kftune.train.config import BY_METHOD, BY_METHOD_KEYS, FIELDS, METHODS, method_default
from pipelines.parameters import pipeline_parameters

from .conftest import REPO

# Where a pipeline deliberately differs from the guide's config (named in --help and the README):
# the LoRA targets default to automatic discovery (every linear layer but the LM head: the same seven
# projections on Qwen2), and gradient checkpointing is left to the memory pre-flight.
NOT_PIPELINE_PARAMETERS = {"lora_target_modules", "gradient_checkpointing"}
SWEPT = {"lora_r", "quantization_bit", "lora_target_modules"}  # the sweep's candidates set these
GUIDE = sorted((REPO / "configs").glob("train_config_*.json"))


def _kind(key: str) -> type:
    from kftune.train.config import TrainConfig

    hint = typing.get_type_hints(TrainConfig)[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return str if key == "lora_target_modules" else (args[0] if args else hint)


def _guide_method(config: dict) -> str:
    return "qlora" if config.get("use_qlora") else "lora" if config.get("use_lora") else "full"


@pytest.mark.parametrize("path", GUIDE, ids=lambda p: p.stem)
def test_method_defaults_are_the_guides_config(path):
    config = json.loads(path.read_text())
    method = _guide_method(config)
    for key, value in config.items():
        if key in FIELDS and key not in {
            "base_model",
            "data_path",
            "output_dir",
            "use_lora",
            "use_qlora",
            "quantization_bit",
            "lora_target_modules",
        }:
            assert method_default(method, key) == value, f"{path.name}: {key}"


# each train component's parameters besides the training settings: its inputs, output and (launcher) placement
NOT_SETTINGS = {"data", "base_model", "method", "artifact_root", "processes", "model"}
LAUNCHER_ONLY = {"nodes", "gpus_per_node", "run_id", "task_name", "image", "task_config"}


@pytest.mark.parametrize(
    ("component", "own"), [(train_component, set()), (train_across_nodes, LAUNCHER_ONLY)], ids=["train", "across-nodes"]
)
def test_the_train_components_take_exactly_the_training_settings(component, own):
    params = inspect.signature(component.python_func).parameters
    assert NOT_SETTINGS | own <= set(params)
    settings = set(params) - NOT_SETTINGS - own
    assert settings == set(steps.TRAIN_SETTINGS)
    for key in settings:
        assert params[key].annotation in (_kind(key), _kind(key).__name__), key


def test_both_train_components_declare_the_settings_alike():
    """The train step's two branches get one set of arguments (pipelines/finetune.py train_step)."""
    one = inspect.signature(train_component.python_func).parameters
    many = inspect.signature(train_across_nodes.python_func).parameters
    assert [(k, p.annotation, p.default) for k, p in one.items()] == [
        (k, p.annotation, p.default) for k, p in many.items() if k not in LAUNCHER_ONLY
    ]


@pytest.mark.parametrize("pipeline", ["finetune", "sweep"])
def test_pipeline_training_defaults_are_the_guides(pipeline):
    params = pipeline_parameters(pipeline)
    expected = set(steps.TRAIN_SETTINGS) - NOT_PIPELINE_PARAMETERS - (SWEPT if pipeline == "sweep" else set())
    assert expected <= set(params)
    for key in expected:
        param = params[key]
        assert param.annotation is _kind(key), key
        if key in BY_METHOD_KEYS:
            assert param.default == BY_METHOD, f"{key} differs by method: its default must be {BY_METHOD} (by method)"
        else:
            assert {method_default(m, key) for m in METHODS} == {param.default}, key


@pytest.mark.parametrize("method", METHODS)
def test_the_by_method_placeholder_trains_with_the_guides_value(method):
    cfg = steps.check_train_settings(method, {"learning_rate": BY_METHOD, "lora_r": 8})
    assert cfg.learning_rate == method_default(method, "learning_rate") > 0
    assert steps.check_train_settings(method, {"learning_rate": 3e-4}).learning_rate == 3e-4  # a value is kept


def test_only_the_learning_rate_differs_by_method():
    assert BY_METHOD_KEYS == {"learning_rate"}  # a new one needs a BY_METHOD default in both pipelines
