"""Component: eval loss and perplexity of the base and the tuned model on the eval split."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(data: Input[Dataset], model: Input[Model], artifact_root: str, sample_tokens: int, metrics: Output[Metrics]):
    """Score both models; the numbers become KFP metrics, the full report an S3 JSON named in the metadata."""
    from kftune import steps

    split = steps.from_metadata(steps.DataSplit, data.metadata)
    trained = steps.from_metadata(steps.TrainedModel, model.metadata)
    result = steps.evaluate(trained.uri, split.eval_uri, artifact_root, sample_tokens=sample_tokens)
    metrics.metadata.update(steps.write_pointer(metrics.path, result))
