"""Component: an MLflow run with the lineage, and a model version whose source is the S3 artifact."""

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
    registered: Output[Model],
    merged: Input[Model] = None,
):
    """Register `merged` when given (LoRA, QLoRA), else `trained` (full fine-tuning)."""
    from kftune import steps

    result = steps.register(
        registered_model_name,
        experiment_name,
        steps.from_metadata(steps.DataSplit, data.metadata),
        steps.from_metadata(steps.TrainedModel, trained.metadata),
        steps.from_metadata(steps.Evaluation, evaluation.metadata),
        steps.from_metadata(steps.MergedModel, merged.metadata) if merged is not None else None,
    )
    registered.metadata.update(steps.write_pointer(registered.path, result))
