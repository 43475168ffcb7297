"""The pipelines' parameters in one place: read from their signatures, coerced to their declared types, checked.

The CLI builds its flags from `pipeline_parameters`, `run`/`sweep` check the arguments before anything
starts, and `submit` resolves a run's parameters (defaults, --params file, flags) the same way. Where the
data is a local file, the node count is also checked against its rows (`check_nodes_against_file`).
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kftune import steps
from kftune.core.errors import ConfigError, KftuneError
from kftune.sweep import plan as sweep
from kftune.train.node_count import check_nodes_against_data, node_count_problems
from pipelines.compile import pipeline_function

# the pipelines' defaults, as numbers: gpus_per_node is a string parameter (pipelines/finetune.py says why)
NODE_DEFAULTS = {"train_nodes": 1, "gpus_per_node": 1}


@functools.cache
def pipeline_parameters(pipeline: str = "finetune") -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_function(pipeline).pipeline_func).parameters)


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Check the training settings and node counts among the pipeline arguments, all at once, before anything runs."""
    settings = {k: v for k, v in arguments.items() if k in steps.TRAIN_SETTINGS}
    _with_node_counts(arguments, lambda: steps.check_train_settings(arguments.get("method", "lora"), settings))


def check_sweep_arguments(arguments: Mapping[str, Any]) -> None:
    """The sweep's lists, its primary metric, every candidate's training settings and the node counts, all at once."""
    settings = {k: v for k, v in arguments.items() if k in steps.TRAIN_SETTINGS}
    defaults = {k: p.default for k, p in pipeline_parameters("sweep").items()}
    _with_node_counts(
        arguments,
        lambda: sweep.check(
            *(arguments.get(k, defaults[k]) for k in ("methods", "ranks", "target_presets")),
            settings,
            primary_metric=arguments.get("primary_metric", defaults["primary_metric"]),
        ),
    )


def node_counts(arguments: Mapping[str, Any]) -> tuple[int, int | None]:
    """(train_nodes, gpus_per_node) among the arguments as numbers; the GPUs None when they are no whole number."""
    gpus = str(arguments.get("gpus_per_node", NODE_DEFAULTS["gpus_per_node"])).strip()
    nodes = arguments.get("train_nodes", NODE_DEFAULTS["train_nodes"])
    return nodes, int(gpus) if re.fullmatch(r"[+-]?\d+", gpus) else None


def _with_node_counts(arguments: Mapping[str, Any], check_settings: Any) -> None:
    """Run `check_settings`, adding the node-count problems to its ConfigError; alone, they raise one line."""
    nodes, gpus = node_counts(arguments)
    if gpus is None:
        problems = [f"--gpus-per-node {arguments['gpus_per_node']}: give a whole number of GPUs, e.g. 8"]
        problems += node_count_problems(nodes, 1)
    else:
        problems = node_count_problems(nodes, gpus)
    try:
        check_settings()
    except ConfigError as exc:
        if problems:
            raise ConfigError(exc.problems + problems, source="pipeline parameters") from None
        raise
    if problems:
        raise KftuneError("; ".join(problems))


def check_nodes_against_file(arguments: Mapping[str, Any], data: str | Path) -> None:
    """More nodes than the local data file has batches fails here, before anything starts (see node_count.py).

    The train rows are estimated as the validation gate will split them: the file's rows less the eval
    share (`eval_fraction`). Rows the gate rejects and a data mix change that count; the train step checks
    the split's own count, so a run this lets through can still stop there. Nothing to check for one node.
    """
    nodes, gpus = node_counts(arguments)
    rows = _rows(Path(data).expanduser())
    if nodes <= 1 or rows is None or arguments.get("data_mix"):
        return
    defaults = pipeline_parameters()
    fraction = arguments.get("eval_fraction", defaults["eval_fraction"].default)
    batch = arguments.get("per_device_train_batch_size", defaults["per_device_train_batch_size"].default)
    per_node = arguments.get("train_processes") or gpus or 1
    train_rows = rows - max(1, round(fraction * rows)) if 0 < fraction < 1 else rows
    check_nodes_against_data(train_rows, batch, nodes, per_node)


def _rows(path: Path) -> int | None:
    """Rows of a JSONL file or JSON array; None when it is no readable file (the gate says what is wrong)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        return len(items) if isinstance(items, list) else None
    return sum(1 for line in text.split("\n") if line.strip())


def check(arguments: Mapping[str, Any], pipeline: str = "finetune") -> None:
    """Every check of the pipeline's arguments; the data too where `data_uri` is a local file."""
    (check_sweep_arguments if pipeline == "sweep" else check_arguments)(arguments)
    data = str(arguments.get("data_uri") or "")
    if data and not data.startswith("s3://"):
        check_nodes_against_file(arguments, data)


def resolve_parameters(given: Mapping[str, Any], pipeline: str = "finetune") -> dict[str, Any]:
    """Pipeline defaults overlaid with the given values, each coerced to its declared type; all problems at once."""
    declared = pipeline_parameters(pipeline)
    problems = [f"unknown pipeline parameter {k!r} (known: {', '.join(declared)})" for k in given if k not in declared]
    resolved: dict[str, Any] = {}
    for name, param in declared.items():
        value = given.get(name, param.default)
        if value is inspect.Parameter.empty:
            problems.append(f"{name} is required (--{name.replace('_', '-')} or a key in --params)")
            continue
        many = typing.get_origin(param.annotation) is list
        kind = typing.get_args(param.annotation)[0] if many else param.annotation
        try:
            if many and not isinstance(value, list):
                raise TypeError
            resolved[name] = [_typed(kind, v) for v in value] if many else _typed(kind, value)
        except (TypeError, ValueError):
            problems.append(f"{name}: {value!r} is not a {'list of ' if many else ''}{kind.__name__}")
    if problems:
        raise KftuneError("; ".join(problems))
    check(resolved, pipeline)
    return resolved


def _typed(kind: type, value: Any) -> Any:
    typed = kind(value)
    if kind is int and float(value) != typed:
        raise ValueError
    return typed


def read_params(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        params = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KftuneError(f"--params {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise KftuneError(f"--params {path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(params, dict):
        raise KftuneError(f"--params {path}: expected a JSON object of pipeline parameters")
    return params
