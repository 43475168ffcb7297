"""Component: merge a LoRA/QLoRA adapter into its full-precision base, with the parity check."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_adapter(model: Input[Model], artifact_root: str, merged: Output[Model]):
    """Merge the adapter `model` points at; `merged` carries the merged model's S3 URI."""
    from kftune import steps

    trained = steps.from_metadata(steps.TrainedModel, model.metadata)
    result = steps.merge(trained.uri, artifact_root)
    merged.metadata.update(steps.write_pointer(merged.path, result))
