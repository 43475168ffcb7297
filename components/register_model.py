"""Component: an MLflow model version with lineage, model card and evaluation; `champion` moves only if it wins."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(
    data: Input[Dataset],
    trained: Input[Model],
    evaluation: Input[Metrics],
    registered_model_name: str,
    experiment_name: str,
    artifact_root: str,
    primary_metric: str,
    promotion_margin: float,
    git_commit: str,
    pipeline_run: str,
    registered: Output[Model],
    merged: Input[Model] = None,
    guard_max_drop: float = -1.0,
):
    """Register `merged` when given (LoRA, QLoRA), else `trained` (full fine-tuning); the decision is in the metadata."""
    from kftune import steps

    result = steps.register(
        registered_model_name,
        experiment_name,
        steps.from_metadata(steps.DataSplit, data.metadata),
        steps.from_metadata(steps.TrainedModel, trained.metadata),
        steps.from_metadata(steps.Evaluation, evaluation.metadata),
        steps.from_metadata(steps.MergedModel, merged.metadata) if merged is not None else None,
        artifact_root=artifact_root,
        metric=primary_metric,
        margin=promotion_margin,
        git_commit=git_commit,
        pipeline_run=pipeline_run,
        guard_max_drop=guard_max_drop,
    )
    registered.metadata.update(steps.write_pointer(registered.path, result))
