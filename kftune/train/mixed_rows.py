"""The training rows with `data_mix`'s sources drawn in (kftune.data.mixing), each source through the gate.

Training reads its rows here: the task's train split, then every mixed-in source validated by the same
gate as the task data (its own report kept with the model) and drawn at its share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.formats import Sample
from kftune.data.mixing import KEY, Source, mix, parse
from kftune.data.reading import is_text, load_samples
from kftune.data.validate import validate


def gate_sources(sources: list[Source], options, reports_dir: Path) -> list[tuple[Source, dict[str, Any], Path]]:
    """Run the validation gate on each source: (source, its report, its accepted rows), reports kept in
    `reports_dir/source-<i>`. A missing source, a failed gate or no accepted rows stops with one line."""
    gated = []
    for i, source in enumerate(sources):
        out = reports_dir / f"source-{i}"
        try:
            report = validate(source.uri, out, options)
        except KftuneError as exc:
            raise KftuneError(f"{KEY} source {source.uri}: {exc}") from None
        if report.accepted == 0:
            raise KftuneError(
                f"{KEY} source {source.uri}: no accepted rows ({report.rejected} of {report.rows_in} rejected; "
                f"see {out}/report.json); fix the source or drop it from {KEY}"
            )
        if not report.passed:
            raise KftuneError(
                f"{KEY} source {source.uri}: the validation gate failed: {'; '.join(report.failures)} "
                f"(see {out}/report.json)"
            )
        gated.append((source, report.to_dict(), out / "accepted.jsonl"))
    return gated


def mixed_training_rows(
    task_rows: list[Sample], value: str, seed: int, options, reports_dir: Path
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """The training rows with `value`'s sources mixed in, and the record of the mix (uri, sha256, weight,
    rows accepted and drawn per source; the task data first, its uri "data_path")."""
    sources = parse(value)
    if not sources:
        return task_rows, []
    gated = gate_sources(sources, options, reports_dir)
    loaded = [(source, load_samples(accepted)) for source, _, accepted in gated]
    for source, rows in loaded:  # a text corpus and chat rows train differently: never mixed
        if is_text(rows) != is_text(task_rows):
            kinds = ("text", "chat") if is_text(rows) else ("chat", "text")
            raise KftuneError(f"{KEY} source {source.uri}: {kinds[0]} rows, but the task data is {kinds[1]} rows")
    rows, drawn = mix(task_rows, loaded, seed)
    record = [{"uri": "data_path", "weight": round(1 - sum(s.weight for s in sources), 12), "drawn": drawn[0]}]
    for (source, report, _), count in zip(gated, drawn[1:]):
        record.append(
            {
                "uri": source.uri,
                "sha256": report["dataset_sha256"],
                "weight": source.weight,
                "rows_in": report["rows_in"],
                "accepted": report["accepted"],
                "rejected": report["rejected"],
                "drawn": count,
            }
        )
    return rows, record
