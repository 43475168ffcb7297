"""Compile a pipeline (the fine-tuning DAG or the sweep) into the YAML package a Kubeflow Pipelines cluster runs."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError

PIPELINES = ("finetune", "sweep")


def pipeline_function(name: str = "finetune", parallelism: int | None = None) -> Any:
    """The pipeline called `name`; `parallelism` caps the sweep's concurrent branches (default: sweep.PARALLELISM)."""
    if name == "finetune":
        if parallelism is not None:
            raise KftuneError("--parallelism applies to the sweep pipeline only (--pipeline sweep)")
        from pipelines.finetune import finetune_pipeline  # heavy: imports kfp; loaded when used

        return finetune_pipeline
    if name == "sweep":
        from pipelines.sweep import PARALLELISM, build, sweep_pipeline  # heavy: imports kfp; loaded when used

        if parallelism is not None and parallelism < 0:
            raise KftuneError(f"--parallelism {parallelism}: give 0 (no limit) or more")
        return sweep_pipeline if parallelism in (None, PARALLELISM) else build(parallelism)  # built on import
    raise KftuneError(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")


def compile_pipeline(
    path: str | Path, name: str = "finetune", parallelism: int | None = None, defaults: Mapping[str, Any] | None = None
) -> Path:
    """Write the compiled pipeline (pipeline spec + Kubernetes platform spec) to `path`.

    `defaults`: parameter values compiled in as the parameters' defaults (a run may still override them).
    """
    from kfp import compiler

    pipeline = pipeline_function(name, parallelism)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path), pipeline_parameters=dict(defaults or {}) or None)
    return path
