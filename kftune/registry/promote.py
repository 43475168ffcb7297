"""`kftune register`: every candidate becomes an MLflow model version; `champion` moves only when it wins.

A candidate is a full or merged model (an adapter is refused: merge it first) plus its evaluation. Registering it:

1. returns the existing version when this artifact (its sha256) was registered before;
2. logs a run (params, metrics, loss curve, metrics.json, samples.jsonl, report.html) and, as its LoggedModel,
   the model as an MLflow chat model with the model card: the only registered copy, verified by its MANIFEST.json;
3. creates the version from that LoggedModel, tagged with its lineage and metrics, alias `challenger`;
4. asks kftune.gate whether it beats its base by the margin and the current champion on the same eval data
   (stored metrics when the eval key matches, else the champion scored again), moves `champion` if so, and
   writes the decision and its reasons as tags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.commit import head_commit
from kftune.core.errors import KftuneError
from kftune.core.storage import resolve_path, split_artifact_uri
from kftune.evaluate.evaluation import rescore_model
from kftune.registry import gate
from kftune.registry import tracking as registry
from kftune.registry.modelcard import render
from kftune.registry.tracking import CHALLENGER, CHAMPION, Registration
from kftune.train.config import TrainConfig

log = logging.getLogger("kftune")

METRIC_TAG = "metric."  # version tags holding the tuned model's metrics, e.g. metric.eval_loss
TAGGED_METRICS = (
    "eval_loss",
    "perplexity",
    "rougeL",
    "chrf",
    "checks_pass_rate",
    "tool_call_parse_rate",
    "tool_call_declared_rate",
    "tool_call_name_match",
    "tool_call_args_match",
)
# config keys that say where files were, not how the model was trained: left out of the config hash
_PLACES = ("output_dir", "data_path", "eval_data_path", "overwrite_output_dir")

Rescore = Callable[[Any], Mapping[str, float]]  # champion ModelVersion -> its metrics on the candidate's eval data


def config_sha256(model_dir: Path) -> str:
    """sha256 of the training config the model carries, without the paths that differ run to run."""
    if not TrainConfig.saved_in(model_dir):
        return ""
    saved = {k: v for k, v in TrainConfig.load(model_dir).to_dict().items() if k not in _PLACES}
    return hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()


def lineage(
    model_dir: Path, *, dataset_sha256: str = "", git_commit: str = "", pipeline_run: str = ""
) -> dict[str, str]:
    """The facts a version is tagged with, read from the model's own kftune_config.json."""
    cfg = TrainConfig.load(model_dir) if TrainConfig.saved_in(model_dir) else None
    facts = {
        "method": cfg.method if cfg else "",
        "lora_r": cfg.lora_r if cfg and cfg.uses_adapter else "",
        "quantization_bit": cfg.quantization_bit if cfg and cfg.use_qlora else "",
        "base_model": cfg.base_model if cfg else "",
        "dataset_sha256": dataset_sha256,
        "config_sha256": config_sha256(model_dir),
        "git_commit": git_commit,
        "pipeline_run": pipeline_run,
    }
    return {k: str(v) for k, v in facts.items() if v not in (None, "")}


def _metrics_of(version) -> dict[str, float]:
    return {k[len(METRIC_TAG) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)}


def _existing(mlflow, name: str, version) -> Registration:
    champion = registry.version_by_alias(mlflow, name, CHAMPION)
    reasons = [r for r in version.tags.get("gate.reasons", "").split("\n") if r]
    return Registration(
        name,
        str(version.version),
        version.run_id or "",
        "",
        version.source,
        promoted=champion is not None and str(champion.version) == str(version.version),
        reasons=reasons,
        champion=str(champion.version) if champion else "",
        existing=True,
    )


def _new_version(
    mlflow,
    name: str,
    *,
    experiment: str,
    model_uri: str,
    model_sha256: str,
    evaluation_dir: Path,
    evaluation: Mapping[str, Any],
    lineage_tags: Mapping[str, str],
    params: Mapping[str, Any] | None,
    train_metrics: Mapping[str, float] | None,
    loss_history: list[tuple[int, float]] | None,
    data_stats: Mapping[str, Any] | None,
):
    """A run with the evaluation's files, the model logged to it as an MLflow Model, a version tagged with it all."""
    from kftune.core.storage import resolve_path
    from kftune.data.reading import load_samples
    from kftune.registry import mlflow_model

    model_dir = Path(resolve_path(model_uri))
    mlflow_model.refuse_adapter(model_dir, model_uri)
    tuned, base = evaluation["tuned"], evaluation["base"]
    tags = {
        **lineage_tags,
        "kind": "model",
        "artifact_sha256": model_sha256,
        "candidate_uri": model_uri,
        "eval_key": evaluation["eval_key"],
        "eval_sha256": evaluation["eval_sha256"],
        **{f"{METRIC_TAG}{k}": tuned[k] for k in TAGGED_METRICS if k in tuned},
        **{f"base.{k}": base[k] for k in TAGGED_METRICS if k in base},
        **gate.benchmark_values(evaluation, "bench.", "base.bench."),
    }
    card = render(
        name=name,
        base_model=lineage_tags.get("base_model", evaluation["base_model"]),
        lineage=lineage_tags,
        evaluation=evaluation,
        data=data_stats,
    )
    first = load_samples(resolve_path(evaluation["eval_data"]))[0]
    example = mlflow_model.input_example(first, evaluation.get("settings", {}).get("max_new_tokens", 64))
    metrics = {
        **(train_metrics or {}),
        **{k: tuned[k] for k in TAGGED_METRICS if k in tuned},
        **{f"base_{k}": base[k] for k in TAGGED_METRICS if k in base},
        **gate.benchmark_values(evaluation, "bench_", "base_bench_"),
    }
    files = [
        evaluation_dir / f
        for f in (artifacts.EVAL_METRICS, artifacts.SAMPLES, artifacts.REPORT)
        if (evaluation_dir / f).is_file()
    ]
    run_params = {**(params or {}), **lineage_tags}
    run_id, url = registry.log_run(
        mlflow,
        experiment,
        f"{name}-{lineage_tags.get('method', 'model')}",
        params=run_params,
        metrics=metrics,
        tags=tags,
        loss_history=loss_history or [],
        artifacts=files,
    )
    with registry.mlflow_errors(mlflow.tracking_uri, f"log the MLflow Model of {name!r}"):
        logged, registered_sha = mlflow_model.log(
            mlflow,
            registry.experiment_id_for(mlflow, experiment),
            run_id,
            model_dir,
            card=card,
            example=example,
            facts={k: tags[k] for k in ("method", "base_model", "artifact_sha256", "candidate_uri") if k in tags},
            params=run_params,
        )
    version = registry.create_version(
        mlflow,
        name,
        f"models:/{logged.model_id}",
        run_id,
        {**tags, mlflow_model.SHA_TAG: registered_sha},
        model_id=logged.model_id,
    )
    return version, run_id, url


def _champion_metrics(champion, eval_key: str, rescore: Rescore | None) -> tuple[dict | None, str, tuple[str, ...]]:
    """(the champion's metrics on the candidate's eval data or None without a champion, its label, a note)."""
    if champion is None:
        return None, "the champion", ()
    label = f"champion version {champion.version}"
    if champion.tags.get("eval_key") == eval_key:
        return _metrics_of(champion), label, ()
    if rescore is None:  # nothing comparable: decide() refuses to promote over it
        return {}, label, (f"{label} was scored on other eval data or settings and could not be scored again",)
    log.info("the champion (version %s) was scored on other eval data or settings: scoring it again", champion.version)
    return (
        dict(rescore(champion)),
        label,
        (f"{label} was scored again on this eval data (its stored metrics are for other data or settings)",),
    )


JUDGEMENTS = 3  # a candidate is judged again when the champion moved meanwhile, at most this often


def _champion_other_than(mlflow, name: str, number: str):
    champion = registry.version_by_alias(mlflow, name, CHAMPION)
    return None if champion is None or str(champion.version) == number else champion


def _version_of(version) -> str | None:
    return None if version is None else str(version.version)


def register(
    name: str,
    *,
    experiment: str,
    model_uri: str,
    model_sha256: str,
    evaluation_dir: Path,
    lineage_tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    train_metrics: Mapping[str, float] | None = None,
    loss_history: list[tuple[int, float]] | None = None,
    data_stats: Mapping[str, Any] | None = None,
    metric: str = gate.DEFAULT_METRIC,
    margin: float = gate.DEFAULT_MARGIN,
    rescore: Rescore | None = None,
    max_drop: float | None = None,
) -> Registration:
    """Register the candidate at `model_uri` (sha256 `model_sha256`) scored in `evaluation_dir`, and run the gate.

    `rescore` scores the champion on this candidate's eval data when its stored metrics are for
    other eval data or settings; without it such a champion is not replaced. `max_drop`: the guard on
    the evaluation's benchmarks (kftune.registry.gate); None: none.
    """
    rules: dict[str, Any] = {"metric": metric, "margin": margin, "max_drop": max_drop}
    gate.decide({metric: 1.0}, {metric: 2.0}, None, **rules)  # a bad metric, margin or guard fails first
    evaluation = json.loads((evaluation_dir / artifacts.EVAL_METRICS).read_text(encoding="utf-8"))
    rules["benchmarks"] = evaluation.get("benchmarks")
    mlflow = registry.client()
    found = registry.find_version(mlflow, name, model_sha256)
    if found is not None and "gate.decision" in found.tags:
        result = _existing(mlflow, name, found)
        print(result.decision(), flush=True)
        return result

    if found is None:
        version, run_id, url = _new_version(
            mlflow,
            name,
            experiment=experiment,
            model_uri=model_uri,
            model_sha256=model_sha256,
            evaluation_dir=evaluation_dir,
            evaluation=evaluation,
            lineage_tags=lineage_tags,
            params=params,
            train_metrics=train_metrics,
            loss_history=loss_history,
            data_stats=data_stats,
        )
    else:  # registered before, but the gate never ran (the earlier registration was interrupted)
        version, run_id, url = found, found.run_id, ""
    number = str(version.version)
    registry.set_alias(mlflow, name, CHALLENGER, number)

    tuned, base = evaluation["tuned"], evaluation["base"]
    for _ in range(JUDGEMENTS):
        champion = _champion_other_than(mlflow, name, number)
        champion_metrics, label, note = _champion_metrics(champion, evaluation["eval_key"], rescore)
        decision = gate.decide(tuned, base, champion_metrics, champion_label=label, **rules)
        decision = dataclasses.replace(decision, reasons=decision.reasons + note)
        if not decision.promote:
            break
        # Judging can take minutes (the champion may be scored again); another registration may have
        # moved the alias meanwhile. Move it only from the champion this candidate was judged against.
        if _version_of(_champion_other_than(mlflow, name, number)) == _version_of(champion):
            registry.set_alias(mlflow, name, CHAMPION, number)
            break
        log.info("the champion moved while version %s was judged; judging it again", number)
    else:
        decision = dataclasses.replace(
            decision,
            promote=False,
            reasons=decision.reasons
            + (f"the champion moved {JUDGEMENTS} times while this candidate was judged; left as challenger",),
        )
    registry.tag_version(
        mlflow,
        name,
        number,
        {
            "gate.decision": "champion" if decision.promote else "challenger",
            "gate.reasons": "\n".join(decision.reasons),
            "gate.metric": metric,
            "gate.margin": margin,
            "gate.compared_with": str(champion.version) if champion is not None else "none",
            **gate.guard_tags(decision),
        },
        run_id=run_id,
    )
    now_champion = number if decision.promote else (str(champion.version) if champion is not None else "")
    result = Registration(
        name,
        number,
        run_id or "",
        url,
        version.source,
        promoted=decision.promote,
        reasons=list(decision.reasons),
        champion=now_champion,
        existing=found is not None,
    )
    print(result.decision(), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kftune register", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="the candidate: merged/full model or adapter folder, or s3:// artifact URI"
    )
    p.add_argument(
        "--evaluation", required=True, help="the `kftune evaluate` output folder (or its s3:// artifact URI)"
    )
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--experiment", default="kftune", help="MLflow experiment of the registration run (default: kftune)")
    p.add_argument("--dataset_sha256", default="", help="sha256 of the training data file (tagged on the version)")
    p.add_argument("--pipeline_run", default="", help="the pipeline run that made the model (tagged on the version)")
    p.add_argument("--metric", default=gate.DEFAULT_METRIC, choices=list(gate.DIRECTIONS), help="the primary metric")
    p.add_argument(
        "--margin",
        type=float,
        default=gate.DEFAULT_MARGIN,
        help=f"how much better than the base the candidate must be, as a fraction of the base's value "
        f"(default: {gate.DEFAULT_MARGIN})",
    )
    p.add_argument(
        "--guard_max_drop",
        type=float,
        help="guard against forgetting: every benchmark metric in the evaluation must stay within this fraction "
        "of its base's value (0.05: 5%%), direction-aware; default (or negative): no guard",
    )
    return p


def main(argv: list[str]) -> int:
    from kftune.core.storage import canonical_json, tree_manifest

    args = build_parser().parse_args(argv)
    if args.model.startswith("s3://"):
        bucket, base, _ = split_artifact_uri(args.model)
        model_uri, sha = f"s3://{bucket}/{base}", base.rsplit("/", 1)[-1]
    else:  # a local folder is logged as it is (its sha256 computed as an upload would): no copy in S3 first
        if not Path(args.model, "config.json").is_file() and not Path(args.model, "adapter_config.json").is_file():
            raise KftuneError(
                f"--model {args.model}: not a model folder (no config.json); give a merged or fully "
                "fine-tuned model folder or its s3:// artifact URI"
            )
        model_uri, sha = args.model, hashlib.sha256(canonical_json(tree_manifest(args.model))).hexdigest()
    evaluation_dir = Path(resolve_path(args.evaluation))
    model_dir = Path(resolve_path(model_uri))
    training = model_dir / artifacts.TRAIN_METRICS
    history = json.loads(training.read_text(encoding="utf-8")).get("loss_history", []) if training.is_file() else []
    tags = lineage(
        model_dir, dataset_sha256=args.dataset_sha256, git_commit=head_commit(), pipeline_run=args.pipeline_run
    )
    register(
        args.name,
        experiment=args.experiment,
        model_uri=model_uri,
        model_sha256=sha,
        evaluation_dir=evaluation_dir,
        lineage_tags=tags,
        loss_history=[(int(s), float(v)) for s, v in history],
        metric=args.metric,
        margin=args.margin,
        rescore=rescorer(evaluation_dir),
        max_drop=args.guard_max_drop,
    )
    return 0


def rescorer(evaluation_dir: Path) -> Rescore:
    """Score a champion version on the eval data and with the settings recorded in `evaluation_dir`/metrics.json."""

    def rescore(champion) -> Mapping[str, float]:

        evaluation = json.loads((evaluation_dir / artifacts.EVAL_METRICS).read_text(encoding="utf-8"))
        from kftune.registry.mlflow_model import HF_SUBDIR, download

        return rescore_model(
            str(download(champion) / HF_SUBDIR), evaluation, base_model=champion.tags.get("base_model")
        )

    return rescore
