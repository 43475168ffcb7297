"""Component: rank the sweep's candidates, publish the comparison (S3, MLflow) and hand on the winner."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare_candidates(
    data: Input[Dataset],
    candidates: List[dict],
    trained: Input[List[Model]],
    evaluations: Input[List[Metrics]],
    primary_metric: str,
    experiment_name: str,
    artifact_root: str,
    report: Output[HTML],
    winner: Output[Model],
    winner_evaluation: Output[Metrics],
) -> str:
    """`trained` and `evaluations` are the loop's collected outputs, in the order of `candidates`.

    `report` is the comparison page (the KFP UI shows it); `winner` and `winner_evaluation` are the
    winner's step results, for merging and registration. Returns the winner's training method
    (full, lora or qlora), which the pipeline branches on.
    """
    import dataclasses

    from kftune import steps
    from kftune.sweep import plan as sweep

    result, model, evaluation = sweep.compare(
        steps.from_metadata(steps.DataSplit, data.metadata),
        candidates,
        [steps.from_metadata(steps.TrainedModel, a.metadata) for a in trained],
        [steps.from_metadata(steps.Evaluation, a.metadata) for a in evaluations],
        primary_metric,
        experiment_name,
        artifact_root,
        html_path=report.path,
    )
    report.metadata.update(dataclasses.asdict(result))  # the page itself is at report.path
    winner.metadata.update(steps.write_pointer(winner.path, model))
    winner_evaluation.metadata.update(steps.write_pointer(winner_evaluation.path, evaluation))
    return result.winner_method
