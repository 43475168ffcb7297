"""A method x rank sweep: the candidates to train, and the step that compares them and names the winner.

`plan` turns the sweep's lists (methods, ranks, target-module presets) into one candidate per
combination. Full fine-tuning has neither rank nor targets, so it is one candidate however many
ranks are swept. `compare` ranks the trained and evaluated candidates (kftune.sweep.compare), uploads
the table as Markdown, JSON and HTML (with a quality-vs-memory plot) to S3, logs it to MLflow as
a parent run with one child run per candidate, and returns the winner, which the pipeline then
merges and registers like a single run's model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.errors import ConfigError, KftuneError
from kftune.core.storage import upload_dir
from kftune.steps import DataSplit, Evaluation, TrainedModel, check_train_settings, fetch, reports_errors
from kftune.sweep import compare as comparing
from kftune.train.config import SEVEN_PROJECTIONS

# sweep method -> (training method, QLoRA bits)
SWEEP_METHODS: dict[str, tuple[str, int | None]] = {
    "full": ("full", None),
    "lora": ("lora", None),
    "qlora4": ("qlora", 4),
    "qlora8": ("qlora", 8),
}
# preset -> lora_target_modules; "" (auto) lets training find every linear layer but the LM head
TARGET_PRESETS: dict[str, str] = {
    "all": SEVEN_PROJECTIONS,
    "attention": "q_proj,k_proj,v_proj,o_proj",
    "mlp": "gate_proj,up_proj,down_proj",
    "auto": "",
}
UNUSED_BITS = 4  # the train step takes an int for every method; only QLoRA reads it


def plan(methods: Sequence[str], ranks: Sequence[float], presets: Sequence[str]) -> list[dict[str, Any]]:
    """One candidate per (method, rank, preset), full fine-tuning once; every problem reported at once.

    A candidate is what one training branch needs: {name, sweep_method, method, bits, rank, preset,
    targets}. Ranks may arrive as floats (KFP passes list items that way); whole numbers are accepted.
    """
    problems = []
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if not methods or unknown:
        problems.append(
            f"methods: {', '.join(map(repr, unknown)) or 'none given'}; choose from {', '.join(SWEEP_METHODS)}"
        )
    bad_presets = [p for p in presets if p not in TARGET_PRESETS]
    adapters = [m for m in dict.fromkeys(methods) if m in SWEEP_METHODS and m != "full"]
    if adapters and (not presets or bad_presets):
        problems.append(
            f"target_presets: {', '.join(map(repr, bad_presets)) or 'none given'}; "
            f"choose from {', '.join(TARGET_PRESETS)}"
        )
    whole = [int(r) for r in ranks if isinstance(r, (int, float)) and not isinstance(r, bool) and float(r).is_integer()]
    if adapters and (not ranks or len(whole) != len(ranks) or min(whole) < 1):
        problems.append(f"ranks: {list(ranks) or 'none given'}; give whole numbers >= 1 (LoRA ranks)")
    if problems:
        raise ConfigError(problems, source="the sweep's parameters")
    candidates = []
    for method in dict.fromkeys(methods):
        train_method, bits = SWEEP_METHODS[method]
        if method == "full":
            candidates.append(
                {
                    "name": "full",
                    "sweep_method": method,
                    "method": train_method,
                    "bits": UNUSED_BITS,
                    "rank": 0,
                    "preset": "",
                    "targets": "",
                }
            )
            continue
        for rank in dict.fromkeys(whole):
            for preset in dict.fromkeys(presets):
                candidates.append(
                    {
                        "name": f"{method}-r{rank}-{preset}",
                        "sweep_method": method,
                        "method": train_method,
                        "bits": bits or UNUSED_BITS,
                        "rank": rank,
                        "preset": preset,
                        "targets": TARGET_PRESETS[preset],
                    }
                )
    return candidates


def candidate_settings(candidate: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings of one candidate: the shared ones plus its rank, bits and targets."""
    return {
        **settings,
        "lora_r": int(candidate["rank"]),
        "quantization_bit": int(candidate["bits"]),
        "lora_target_modules": candidate["targets"] or None,
    }


def check(
    methods: Sequence[str],
    ranks: Sequence[float],
    presets: Sequence[str],
    settings: Mapping[str, Any],
    primary_metric: str = "eval_loss",
) -> list[dict[str, Any]]:
    """The plan, the primary metric and every candidate's training settings, validated before anything runs.

    Every problem is reported at once; when the lists themselves are wrong, the shared settings are
    still checked (as for a LoRA candidate), so one pass fixes everything.
    """
    problems: list[str] = []
    try:
        candidates = plan(methods, ranks, presets)
    except ConfigError as exc:
        problems += exc.problems
        candidates = []
    measured = [m for m in comparing.DIRECTIONS if m in {f.name for f in dataclasses.fields(Evaluation)}]
    if primary_metric not in measured:
        problems.append(
            f"primary_metric: {primary_metric!r} is not measured by the evaluate step; use one of {', '.join(measured)}"
        )
    stand_in = {"method": "lora", "rank": 8, "bits": UNUSED_BITS, "targets": ""}
    for candidate in candidates or [stand_in]:
        try:
            check_train_settings(candidate["method"], candidate_settings(candidate, settings))
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems, source="the sweep's parameters")
    return candidates


@dataclass(frozen=True)
class SweepResult:
    uri: str  # S3 folder with comparison.md, .json, .html and .png
    sha256: str
    primary_metric: str
    winner: str
    winner_method: str  # full | lora | qlora: whether the winner needs merging
    candidates: int
    parent_run_id: str
    parent_run_url: str
    table: str  # the Markdown table


def candidate_row(candidate: Mapping[str, Any], trained: TrainedModel, evaluation: Evaluation) -> comparing.Candidate:
    """What compare ranks, read from the steps' results: training's measurements, evaluation's fields by name."""
    full = candidate["method"] == "full"
    m = trained.metrics
    return comparing.Candidate(
        name=candidate["name"],
        method=candidate["sweep_method"],
        rank=None if full else int(candidate["rank"]),
        targets=None if full else candidate["preset"],
        trainable_params=int(m["trainable_params"]),
        total_params=int(m["total_params"]),
        peak_memory_bytes=_int_or_none(m.get("peak_memory_bytes")),
        train_seconds=float(m["train_seconds"]),
        tokens_per_second=m.get("tokens_per_second"),
        quality=comparing.metric_values(dataclasses.asdict(evaluation)),
    )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _check_pairing(
    candidates: Sequence[Mapping[str, Any]], trained: Sequence[TrainedModel], evaluations: Sequence[Evaluation]
) -> None:
    """The three lists must describe the same candidates in the same order (KFP collects in loop order)."""
    if not len(candidates) == len(trained) == len(evaluations):
        raise KftuneError(
            f"the sweep collected {len(trained)} trained models and {len(evaluations)} evaluations "
            f"for {len(candidates)} candidates; every branch must train and evaluate once"
        )
    for candidate, model, evaluation in zip(candidates, trained, evaluations, strict=True):
        rank = model.params.get("lora_r")
        same = model.method == candidate["method"] and (candidate["method"] == "full" or rank == int(candidate["rank"]))
        report = json.loads(Path(fetch(evaluation.uri), artifacts.EVAL_METRICS).read_text(encoding="utf-8"))
        if not same or report["model"] != model.uri:
            raise KftuneError(
                f"sweep candidate {candidate['name']}: the collected model ({model.method}, r={rank}) "
                f"or its evaluation ({report['model']}) is not this candidate's"
            )


@reports_errors
def compare(
    data: DataSplit,
    candidates: Sequence[Mapping[str, Any]],
    trained: Sequence[TrainedModel],
    evaluations: Sequence[Evaluation],
    primary_metric: str,
    experiment: str,
    artifact_root: str,
    html_path: str | Path | None = None,
) -> tuple[SweepResult, TrainedModel, Evaluation]:
    """Rank the candidates, publish the table (S3 and MLflow) and return (result, winner, its evaluation).

    `html_path`: also write the HTML page there (the pipeline's report artifact)."""
    _check_pairing(candidates, trained, evaluations)
    rows = [candidate_row(c, t, e) for c, t, e in zip(candidates, trained, evaluations, strict=True)]
    comparison = comparing.rank(rows, primary_metric)
    by_name = {row.name: (t, e) for row, t, e in zip(rows, trained, evaluations, strict=True)}
    won, scored = by_name[comparison.winner.name]
    with tempfile.TemporaryDirectory(prefix="kftune-sweep-") as tmp:
        files = comparing.write_reports(comparison, tmp)
        if html_path:
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp, files["html"]), html_path)
        artifact = upload_dir(tmp, f"{artifact_root}/sweeps")
        run_id, url = log_to_mlflow(experiment, comparison, Path(tmp), data, by_name, artifact.uri)
    result = SweepResult(
        artifact.uri,
        artifact.sha256,
        primary_metric,
        comparison.winner.name,
        won.method,
        len(rows),
        run_id,
        url,
        comparing.to_markdown(comparison),
    )
    return result, won, scored


def log_to_mlflow(
    experiment: str,
    comparison: comparing.Comparison,
    reports: Path,
    data: DataSplit,
    results: Mapping[str, tuple[TrainedModel, Evaluation]],
    report_uri: str,
) -> tuple[str, str]:
    """A parent run holding the table and the winner, and one child run per candidate; returns (parent id, URL)."""
    from kftune.registry.tracking import client, log_run

    mlflow = client()
    winner = comparison.winner
    parent, url = log_run(
        mlflow,
        experiment,
        f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        params={
            "primary_metric": comparison.metric,
            "winner": winner.name,
            "dataset_sha256": data.dataset_sha256,
            "report_uri": report_uri,
        },
        metrics={"candidates": len(comparison.rows), f"winner_{comparison.metric}": winner.value(comparison.metric)},
        tags={"kftune.sweep": "parent"},
        artifacts=sorted(reports.iterdir()),
        artifact_path="comparison",
    )
    for row in comparison.rows:
        c = row.candidate
        trained, evaluation = results[c.name]
        measured = {
            "place": row.place,
            "relative_quality": row.relative_quality,
            "trainable_params": c.trainable_params,
            "trainable_share": c.trainable_share,
            "peak_memory_bytes": c.peak_memory_bytes,
            "train_seconds": c.train_seconds,
            "tokens_per_second": c.tokens_per_second,
            **{k: c.value(k) for k in comparing.DIRECTIONS},
            **{k: getattr(evaluation, k) for k in ("base_eval_loss", "base_perplexity")},
        }
        log_run(
            mlflow,
            experiment,
            c.name,
            params={"method": c.method, "lora_r": c.rank, "targets": c.targets, **trained.params},
            metrics=measured,
            tags={
                "mlflow.parentRunId": parent,
                "kftune.sweep": "candidate",
                "trained_uri": trained.uri,
                "evaluation_uri": evaluation.uri,
                "winner": str(row.place == 1).lower(),
            },
        )
    return parent, url
