"""Component: the train step's model as this task's own output, so a sweep's loop can collect it."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def forward_model(model: Input[Model], trained: Output[Model]):
    """`trained` is `model` (its metadata and pointer file): the train step's output is a dsl.OneOf of its two
    branches (pipelines/finetune.py's `train_step`), and KFP cannot collect a OneOf over a ParallelFor."""
    from kftune import steps

    result = steps.from_metadata(steps.TrainedModel, model.metadata)
    trained.metadata.update(steps.write_pointer(trained.path, result))
