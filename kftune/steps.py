"""The engine call behind each pipeline step: plain typed Python that tests call without KFP.

Each step reads its inputs from S3 (or a local path), does one job, uploads what it made as a content-addressed
artifact and returns a small dataclass, which a KFP component stores as its output's metadata (`from_metadata`
rebuilds it). Models carry their own kftune_config.json: later steps read base model and method from it."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kftune.core.errors import KftuneError, one_line
from kftune.core.storage import resolve_path, upload_dir
from kftune.data.gate_stop import stop_message
from kftune.data.validate import Options, validate
from kftune.evaluate.evaluation import Settings
from kftune.evaluate.evaluation import evaluate as score_both
from kftune.registry.gate import DEFAULT_MARGIN, DEFAULT_METRIC
from kftune.registry.modelcard import data_statistics
from kftune.registry.promote import lineage, rescorer
from kftune.registry.promote import register as register_candidate
from kftune.registry.tracking import Registration, check_reachable
from kftune.train.across_nodes import train_across_nodes
from kftune.train.config import METHODS, TrainConfig  # noqa: F401 (METHODS: pipelines call it steps.METHODS)
from kftune.train.launch import train_on_node
from kftune.train.node_count import check_nodes_against_data
from kftune.train.step_settings import (  # noqa: F401 (components and tests call them as steps.*)
    TRAIN_PARAMS,
    TRAIN_SETTINGS,
    check_train_settings,
    eval_every,
    train_settings,
    train_values,
)

ERROR_MARK = "kftune-step-error: "  # a failed step prints this + its message as JSON, for the runner to show
TRAIN_METRICS = (
    "train_loss",
    "first_loss",
    "last_loss",
    "global_steps",
    "train_rows",
    "trainable_params",
    "total_params",
    "train_seconds",
    "train_tokens",
    "tokens_per_second",
    "peak_memory_bytes",
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DataSplit:
    uri: str  # the artifact folder holding train.jsonl and eval.jsonl
    sha256: str
    train_uri: str
    eval_uri: str
    train_rows: int
    eval_rows: int
    dataset_sha256: str  # of the data file as given: what `sha256sum` on the user's copy prints


@dataclass(frozen=True)
class TrainedModel:
    uri: str  # adapter folder (lora, qlora) or full model folder
    sha256: str
    method: str
    params: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Evaluation:
    uri: str  # the evaluation folder: metrics.json, samples.jsonl, report.html
    sha256: str
    eval_key: str  # sha256 of the eval data and scoring settings: equal keys, comparable numbers
    base_eval_loss: float
    eval_loss: float
    base_perplexity: float
    perplexity: float
    eval_rows: int
    eval_tokens: int
    base_rougeL: float | None  # None when no samples were generated
    rougeL: float | None
    base_chrf: float | None
    chrf: float | None
    base_checks_pass_rate: float | None
    checks_pass_rate: float | None
    sample_prompt: str
    base_sample: str
    tuned_sample: str
    benchmarks: dict[str, Any] = dataclasses.field(default_factory=dict)  # metrics.json's: task -> base, tuned, ...
    tool_call_name_match: float | None = None  # None when the eval data has no tool calls
    tool_call_args_match: float | None = None


@dataclass(frozen=True)
class MergedModel:
    uri: str
    sha256: str
    max_abs_logit_diff: float


def from_metadata(cls: type[T], metadata: Mapping[str, Any]) -> T:
    """Rebuild a step result from artifact metadata (extra keys a KFP backend adds are ignored)."""
    return cls(**{f.name: _whole_numbers_as_ints(metadata[f.name]) for f in dataclasses.fields(cls)})


def _whole_numbers_as_ints(value: Any) -> Any:
    """Metadata travels as a protobuf Struct, where every number is a double: 8 comes back as 8.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_ints(v) for v in value]
    return value


def write_pointer(path: str, result: Any) -> dict[str, Any]:
    """Write the result as JSON at a KFP artifact's path (so the backend has a file to store); return it as metadata."""
    metadata = dataclasses.asdict(result)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metadata, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return metadata


def reports_errors(step: F) -> F:
    """Print a user-facing error as one marked line before KFP's traceback, so the runner can show just that.

    Every engine call a component makes goes through a function wrapped in this (tests/test_step_errors.py).
    """

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except KftuneError as exc:
            print(ERROR_MARK + json.dumps(one_line(exc), ensure_ascii=False), file=sys.stderr, flush=True)
            raise

    return wrapper  # type: ignore[return-value]


def fetch(uri_or_path: str) -> Path:
    """A local path for an s3:// artifact URI (downloaded and verified once into kftune's cache) or a local path."""
    return Path(resolve_path(uri_or_path))


@reports_errors
def validate_data(
    data_uri: str,
    artifact_root: str,
    eval_fraction: float = 0.1,
    base_model: str | None = None,
    max_seq_length: int = 512,
    data_format: str = "auto",
) -> DataSplit:
    """Run the validation gate, upload its report and split, and stop the run when the gate fails.

    Also checks that MLflow answers: it is needed only at the last step, and a pipeline should
    fail in seconds, not after training, when a service is down.
    """
    if not 0 < eval_fraction < 1:
        raise KftuneError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    check_reachable()
    options = Options(base_model, max_seq_length, eval_fraction=eval_fraction, progress=False, data_format=data_format)
    with tempfile.TemporaryDirectory(prefix="kftune-validate-") as tmp:
        report = validate(data_uri, Path(tmp, "validation"), options)
        artifact = upload_dir(Path(tmp, "validation"), f"{artifact_root}/datasets")
    if not report.passed:
        raise KftuneError(stop_message(report, data_uri, artifact.uri))
    return DataSplit(
        artifact.uri,
        artifact.sha256,
        f"{artifact.uri}/train.jsonl",
        f"{artifact.uri}/eval.jsonl",
        report.train_rows,
        report.eval_rows,
        report.dataset_sha256,
    )


@reports_errors
def train(
    data: DataSplit,
    base_model: str,
    method: str,
    artifact_root: str,
    settings: Mapping[str, Any],
    processes: int = 0,
    nodes: int = 1,
    gpus_per_node: int = 1,
    placement: Mapping[str, Any] | None = None,
    job_name: str = "",
    image: str = "",
) -> TrainedModel:
    """Fine-tune `base_model` on the train split (settings: the guide's config keys) and upload the result.

    `processes`: per node; 0 trains with one per GPU of the node (DDP, or FSDP for full, under torchrun).
    `nodes` > 1: on a cluster a Kubeflow Trainer TrainJob named `job_name` running `image` (`placement`: the
    task's passed-through pod settings), here two network-namespace hosts (kftune.train.across_nodes).
    """
    cfg = check_train_settings(method, settings)  # before downloading anything
    check_nodes_against_data(data.train_rows, cfg.per_device_train_batch_size, nodes, processes or gpus_per_node)
    # checkpoints go to <artifact_root>/checkpoints/<run key>: a retry of this step resumes from them
    cfg = dataclasses.replace(
        cfg,
        base_model=base_model,
        data_path=data.train_uri,
        eval_data_path=data.eval_uri,
        eval_steps=cfg.eval_steps or eval_every(cfg, data.train_rows),
        checkpoint_uri=f"{artifact_root}/checkpoints",
    )
    if nodes > 1:  # every node reads the split from S3 itself; rank 0 uploads the output
        done = train_across_nodes(cfg, nodes, gpus_per_node, artifact_root, job_name, placement or {}, image)
        uri, sha256, trained = done.uri, done.sha256, done.metrics
    else:
        with tempfile.TemporaryDirectory(prefix="kftune-train-") as tmp:
            local = {"data_path": str(fetch(data.train_uri)), "eval_data_path": str(fetch(data.eval_uri))}
            cfg = dataclasses.replace(cfg, **local, output_dir=f"{tmp}/model")
            result = train_on_node(cfg, processes)
            artifact = upload_dir(result.output_dir, f"{artifact_root}/models")
        uri, sha256, trained = artifact.uri, artifact.sha256, result.metrics
    params = {k: getattr(cfg, k) for k in TRAIN_PARAMS}
    params["lora_target_modules"] = ",".join(trained.get("target_modules") or []) or None  # as resolved
    if not cfg.uses_adapter:
        params.update({k: None for k in params if k.startswith("lora_")})
    if not cfg.use_qlora:
        params["quantization_bit"] = None
    params["data_mix"] = json.dumps(trained.get("data_mix")) if cfg.data_mix else None  # sha256s, rows drawn
    metrics = {k: trained[k] for k in TRAIN_METRICS if trained.get(k) is not None}
    metrics["loss_history"] = trained["loss_history"]
    return TrainedModel(uri, sha256, cfg.method, params, metrics)


@reports_errors
def evaluate(
    model_uri: str,
    eval_uri: str,
    artifact_root: str,
    batch_size: int = 8,
    sample_tokens: int = 256,
    samples: int = 8,
    validation_uri: str | None = None,
    benchmarks: str = "",
    benchmark_limit: int = 0,
    guard_max_drop: float = -1.0,
) -> Evaluation:
    """Score the base and the tuned model on the eval split (kftune.evaluate.evaluation) and upload metrics.json,
    samples.jsonl and report.html; `validation_uri`: the validation artifact, for the report's histogram.

    A QLoRA adapter is scored on its base quantized as in training, and so is that base, so the
    difference is the adapter's alone. `benchmarks`: lm-eval tasks on both (`benchmark_limit` each, 0: all).
    """
    settings = Settings(samples=samples, max_new_tokens=max(sample_tokens, 1), batch_size=batch_size)
    extra = {
        "benchmarks": benchmarks,
        "benchmark_limit": benchmark_limit or None,
        "guard_max_drop": guard_max_drop,
    }
    with tempfile.TemporaryDirectory(prefix="kftune-eval-") as tmp:
        metrics = score_both(
            model_uri, eval_uri, f"{tmp}/evaluation", settings=settings, validation=validation_uri, **extra
        )
        first = json.loads(
            (Path(tmp, "evaluation", "samples.jsonl").read_text(encoding="utf-8").splitlines() or ["{}"])[0]
        )
        artifact = upload_dir(f"{tmp}/evaluation", f"{artifact_root}/evaluations")
    base, tuned = metrics["base"], metrics["tuned"]
    return Evaluation(
        artifact.uri,
        artifact.sha256,
        metrics["eval_key"],
        base["eval_loss"],
        tuned["eval_loss"],
        base["perplexity"],
        tuned["perplexity"],
        metrics["eval_rows"],
        tuned["eval_tokens"],
        base.get("rougeL"),
        tuned.get("rougeL"),
        base.get("chrf"),
        tuned.get("chrf"),
        base.get("checks_pass_rate"),
        tuned.get("checks_pass_rate"),
        (first.get("prompt") or [{"content": ""}])[-1]["content"],
        first.get("base_output", ""),
        first.get("tuned_output", ""),
        metrics.get("benchmarks", {}),
        **{k: tuned.get(k) for k in ("tool_call_name_match", "tool_call_args_match")},
    )


def copy_report(evaluation: Evaluation, path: str) -> None:
    """The evaluation's report.html at `path` (a KFP HTML output), so the run's UI shows it."""
    import shutil

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fetch(f"{evaluation.uri}/report.html"), path)


@reports_errors
def merge(model_uri: str, artifact_root: str) -> MergedModel:
    """Merge a LoRA/QLoRA adapter into its full-precision base (parity-checked) and upload the merged model."""
    from kftune.models.merge import merge as merge_adapter  # heavy: imports torch; loaded when used

    cfg = TrainConfig.load(fetch(model_uri))
    with tempfile.TemporaryDirectory(prefix="kftune-merge-") as tmp:
        result = merge_adapter(cfg.base_model, model_uri, f"{tmp}/merged")
        artifact = upload_dir(result.output_dir, f"{artifact_root}/merged")
    return MergedModel(artifact.uri, artifact.sha256, result.max_abs_logit_diff)


@reports_errors
def register(
    name: str,
    experiment: str,
    data: DataSplit,
    trained: TrainedModel,
    evaluation: Evaluation,
    merged: MergedModel | None = None,
    *,
    artifact_root: str,
    metric: str = DEFAULT_METRIC,
    margin: float = DEFAULT_MARGIN,
    git_commit: str = "",
    pipeline_run: str = "",
    guard_max_drop: float = -1.0,
) -> Registration:
    """Register the merged model (LoRA, QLoRA) or the trained one (full) as an MLflow chat model with its
    lineage, model card and evaluation (`artifact_root` is unused: the MLflow server stores the model), and move `champion` to it only when it beats its base by `margin` and the current champion
    on `metric` (kftune.promote; the returned Registration carries the decision and its reasons).
    Registering the same artifact again returns the existing version.
    """
    model = merged or trained
    evaluation_dir = fetch(evaluation.uri)
    tags = lineage(
        fetch(model.uri), dataset_sha256=data.dataset_sha256, git_commit=git_commit, pipeline_run=pipeline_run
    )
    tags |= {"trained_uri": trained.uri, "evaluation_uri": evaluation.uri, "dataset_uri": data.uri}
    params = {"method": trained.method, **trained.params, "train_rows": data.train_rows, "eval_rows": data.eval_rows}
    metrics = {k: v for k, v in trained.metrics.items() if k != "loss_history"}
    if merged:
        metrics["max_abs_logit_diff"] = merged.max_abs_logit_diff
    return register_candidate(
        name,
        experiment=experiment,
        model_uri=model.uri,
        model_sha256=model.sha256,
        evaluation_dir=evaluation_dir,
        lineage_tags=tags,
        params=params,
        train_metrics=metrics,
        loss_history=[(int(s), float(v)) for s, v in trained.metrics.get("loss_history", [])],
        data_stats=data_statistics(
            data.uri, data.train_rows, data.eval_rows, data.dataset_sha256, trained.params.get("data_mix")
        ),
        metric=metric,
        margin=margin,
        rescore=rescorer(evaluation_dir),
        max_drop=guard_max_drop,
    )
