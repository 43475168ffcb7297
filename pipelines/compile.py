"""Compile the DAG into the YAML package a Kubeflow Pipelines cluster runs."""

from pathlib import Path


def compile_pipeline(path: str | Path) -> Path:
    """Write the compiled pipeline (pipeline spec + Kubernetes platform spec) to `path`."""
    from kfp import compiler

    from pipelines.finetune import finetune_pipeline

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(finetune_pipeline, str(path))
    return path
