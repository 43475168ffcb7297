"""kfp.local taught to resolve a dsl.OneOf of artifacts, as a KFP cluster (2.17+) does.

The train step is an If/Else (one node, or a TrainJob across nodes) whose model output is a dsl.OneOf of
the two branches' `model` artifacts. kfp.local (2.17.3, and its master as of this writing) resolves a
OneOf of parameters by taking the branch that produced a value, but refuses a OneOf of artifacts
("Expected 1 artifact in ArtifactSelectorSpec. Got: 2"). `artifact_oneof` applies the same rule to
artifacts for the length of a local run, and leaves a DAG output with one selector to kfp itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def _resolve_artifact_oneof(original: Any) -> Any:
    """A replacement for OrchestratorUtils.get_dag_output_artifacts that also resolves several selectors."""

    def get_dag_output_artifacts(cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
        single = type(dag_outputs_spec)()
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            if len(spec.artifact_selectors) == 1:
                single.artifacts[key].CopyFrom(spec)
                continue
            found = []
            for selector in spec.artifact_selectors:
                try:  # a branch that did not run has no outputs
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):
                    continue
            if len(found) != 1:
                raise ValueError(f"dsl.OneOf output {key!r}: {len(found)} of its branches produced it, expected 1")
            outputs[key] = found[0]
        return {**original.__func__(cls, single, io_store), **outputs}

    return classmethod(get_dag_output_artifacts)


@contextlib.contextmanager
def artifact_oneof() -> Iterator[None]:
    """For the length of the block, kfp.local resolves a dsl.OneOf of artifacts (restored afterwards)."""
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    original = OrchestratorUtils.__dict__["get_dag_output_artifacts"]
    OrchestratorUtils.get_dag_output_artifacts = _resolve_artifact_oneof(original)
    try:
        yield
    finally:
        OrchestratorUtils.get_dag_output_artifacts = original
