"""Component: the base and the tuned model scored on the eval split; the report is the task's HTML output."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    data: Input[Dataset],
    model: Input[Model],
    artifact_root: str,
    sample_tokens: int,
    eval_samples: int,
    metrics: Output[Metrics],
    report: Output[HTML],
    benchmarks: str = "",
    benchmark_limit: int = 0,
    guard_max_drop: float = -1.0,
):
    """Score both models; the numbers become KFP metrics, metrics.json/samples.jsonl/report.html an S3 artifact."""
    from kftune import steps

    split = steps.from_metadata(steps.DataSplit, data.metadata)
    trained = steps.from_metadata(steps.TrainedModel, model.metadata)
    result = steps.evaluate(
        trained.uri,
        split.eval_uri,
        artifact_root,
        sample_tokens=sample_tokens,
        samples=eval_samples,
        validation_uri=split.uri,
        benchmarks=benchmarks,
        benchmark_limit=benchmark_limit,
        guard_max_drop=guard_max_drop,
    )
    metrics.metadata.update(steps.write_pointer(metrics.path, result))
    steps.copy_report(result, report.path)
