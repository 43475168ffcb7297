"""The pipelines' parameters in one place: read from their signatures, coerced to their declared types, checked.

The CLI builds its flags from `pipeline_parameters`, `run`/`sweep` check the arguments before anything
starts, and `submit` resolves a run's parameters (defaults, --params file, flags) the same way.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kftune import steps
from kftune.core.errors import KftuneError
from kftune.sweep import plan as sweep
from pipelines.compile import pipeline_function


@functools.cache
def pipeline_parameters(pipeline: str = "finetune") -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_function(pipeline).pipeline_func).parameters)


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Check the training settings among the pipeline arguments, all at once, before anything runs."""
    settings = {k: v for k, v in arguments.items() if k in steps.TRAIN_SETTINGS}
    steps.check_train_settings(arguments.get("method", "lora"), settings)


def check_sweep_arguments(arguments: Mapping[str, Any]) -> None:
    """The sweep's lists, its primary metric and every candidate's training settings, all at once."""
    settings = {k: v for k, v in arguments.items() if k in steps.TRAIN_SETTINGS}
    defaults = {k: p.default for k, p in pipeline_parameters("sweep").items()}
    sweep.check(
        *(arguments.get(k, defaults[k]) for k in ("methods", "ranks", "target_presets")),
        settings,
        primary_metric=arguments.get("primary_metric", defaults["primary_metric"]),
    )


def check(arguments: Mapping[str, Any], pipeline: str = "finetune") -> None:
    (check_sweep_arguments if pipeline == "sweep" else check_arguments)(arguments)


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
