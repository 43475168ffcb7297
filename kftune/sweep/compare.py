"""Rank sweep candidates on one quality metric and render the comparison (Markdown, JSON, HTML + plot).

Pure functions over measured numbers: nothing here trains, reads S3 or talks to MLflow, so the
ranking rules and every rendering are unit-tested on hand-made rows. "Quality vs best" is the
guide's "relative performance" column, measured: the primary metric of each candidate relative
to the best one (value / best when higher is better, best / value when lower is better), so the
winner is 100% and every other candidate is below it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from kftune.core.errors import KftuneError
from kftune.core.pages import png_img, render_page
from kftune.registry.gate import (  # metric -> True when higher is better; the names are Evaluation fields
    DIRECTIONS,
    finite,
)

QUALITY_COLUMNS: dict[str, str] = {
    "eval_loss": "eval loss",
    "perplexity": "perplexity",
    "rougeL": "ROUGE-L",
    "chrf": "chrF",
    "checks_pass_rate": "checks passed",
}
# a tool-calling data set's metrics: in the JSON and the ranking, in the table as the "quality vs best" column
METRIC_LABELS = QUALITY_COLUMNS | {"tool_call_name_match": "tool call name", "tool_call_args_match": "tool call args"}
NOT_MEASURED = "n/a"
MEMORY_NOTE = (
    "peak memory: the training process's own peak, torch.cuda.max_memory_allocated on a GPU, "
    "the RSS high-water mark on a CPU"
)


@dataclass(frozen=True)
class Candidate:
    """One trained and evaluated sweep candidate, as measured."""

    name: str
    method: str  # full | lora | qlora4 | qlora8
    rank: int | None  # LoRA rank; None for full fine-tuning
    targets: str | None  # target-module preset; None for full fine-tuning
    trainable_params: int
    total_params: int
    peak_memory_bytes: int | None
    train_seconds: float
    tokens_per_second: float | None
    quality: Mapping[str, float | None]  # DIRECTIONS' metrics that the evaluation measured

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def value(self, metric: str) -> float | None:
        return finite(self.quality.get(metric))


@dataclass(frozen=True)
class Row:
    place: int  # 1 is the winner
    candidate: Candidate
    relative_quality: float  # primary metric relative to the best, 1.0 for the winner


@dataclass(frozen=True)
class Comparison:
    metric: str
    higher_is_better: bool
    rows: tuple[Row, ...]  # best first

    @property
    def winner(self) -> Candidate:
        return self.rows[0].candidate


def rank(candidates: Iterable[Candidate], metric: str = "eval_loss") -> Comparison:
    """Best first on `metric`; ties go to the candidate needing less memory, then less time."""
    candidates = list(candidates)
    if metric not in DIRECTIONS:
        raise KftuneError(
            f"primary_metric {metric!r}: not a metric the sweep ranks by; use one of {', '.join(DIRECTIONS)}"
        )
    if not candidates:
        raise KftuneError("the sweep has no candidates to compare")
    missing = [c.name for c in candidates if c.value(metric) is None]
    if missing:
        raise KftuneError(
            f"primary_metric {metric}: not measured for {', '.join(missing)} (the evaluate step did not "
            f"score it); rank by one it measures, e.g. eval_loss"
        )
    higher = DIRECTIONS[metric]
    ordered = sorted(
        candidates,
        key=lambda c: (
            (-1 if higher else 1) * c.value(metric),
            c.peak_memory_bytes if c.peak_memory_bytes is not None else math.inf,
            c.train_seconds,
        ),
    )
    best = ordered[0].value(metric)
    rows = tuple(Row(place, c, _relative(c.value(metric), best, higher)) for place, c in enumerate(ordered, 1))
    return Comparison(metric, higher, rows)


def _relative(value: float, best: float, higher: bool) -> float:
    if value == best:
        return 1.0
    if higher:
        return value / best if best else 0.0
    return best / value if value else 0.0


# --- rendering -------------------------------------------------------------------------------


def _count(n: float | None) -> str:
    return NOT_MEASURED if n is None else f"{n:,.0f}"


def _memory(n: int | None) -> str:
    if n is None:
        return NOT_MEASURED
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _number(n: float | None) -> str:
    return NOT_MEASURED if n is None else f"{n:.4g}" if abs(n) >= 1000 else f"{n:.3f}"


def columns(comparison: Comparison) -> list[str]:
    return [
        "#",
        "candidate",
        "method",
        "rank",
        "targets",
        "trainable params",
        "share",
        "peak memory",
        "train wall time",
        "tokens/s",
        *QUALITY_COLUMNS.values(),
        f"quality vs best ({METRIC_LABELS[comparison.metric]})",
    ]


def cells(row: Row) -> list[str]:
    """One table row as text; a value the run did not measure is n/a, never a blank or a guess."""
    c = row.candidate
    return [
        str(row.place),
        c.name,
        c.method,
        "-" if c.rank is None else str(c.rank),
        c.targets or "-",
        _count(c.trainable_params),
        f"{100 * c.trainable_share:.2f}%",
        _memory(c.peak_memory_bytes),
        f"{c.train_seconds:.1f} s",
        _count(c.tokens_per_second),
        *(_number(c.value(m)) for m in QUALITY_COLUMNS),
        f"{100 * row.relative_quality:.1f}%",
    ]


def notes(comparison: Comparison) -> list[str]:
    direction = "higher" if comparison.higher_is_better else "lower"
    return [
        f"ranked by {comparison.metric} ({direction} is better); winner: {comparison.winner.name}",
        "quality vs best: value / best when higher is better, best / value when lower is better",
        MEMORY_NOTE,
        f"{NOT_MEASURED}: not measured by this run's evaluate step",
    ]


def to_markdown(comparison: Comparison) -> str:
    head = columns(comparison)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i in (0, *range(5, len(head))) else "---" for i in range(len(head))) + "|",
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in comparison.rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes(comparison)]) + "\n"


def to_json(comparison: Comparison) -> str:
    """The numbers as measured (null where not measured), for tools and for MLflow."""
    rows = []
    for row in comparison.rows:
        c = row.candidate
        rows.append(
            {
                "place": row.place,
                **asdict(c),
                "quality": {m: c.value(m) for m in METRIC_LABELS},
                "trainable_share": c.trainable_share,
                "relative_quality": row.relative_quality,
            }
        )
    return (
        json.dumps(
            {
                "primary_metric": comparison.metric,
                "higher_is_better": comparison.higher_is_better,
                "winner": comparison.winner.name,
                "rows": rows,
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )


def scatter_png(comparison: Comparison) -> bytes:
    """Primary metric against peak memory, one labelled point per candidate, the winner marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for row in comparison.rows:
            c = row.candidate
            if c.peak_memory_bytes is None:
                continue
            x, y = c.peak_memory_bytes / 2**20, c.value(comparison.metric)
            winner = row.place == 1
            ax.scatter(
                [x],
                [y],
                s=90 if winner else 45,
                marker="*" if winner else "o",
                color="tab:red" if winner else "tab:blue",
                zorder=3,
            )
            ax.annotate(c.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.margins(x=0.2, y=0.1)  # room for the labels
        ax.set_xlabel("peak memory (MiB)")
        direction = "higher" if comparison.higher_is_better else "lower"
        ax.set_ylabel(f"{METRIC_LABELS[comparison.metric]} ({direction} is better)")
        ax.set_title("sweep: quality vs memory (star: winner)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


SWEEP_PAGE = """{% extends "base.html" %}
{% block title %}kftune sweep{% endblock %}
{% block body %}
<h1>kftune sweep</h1>
<table><thead><tr>{% for name in columns %}<th>{{ name }}</th>{% endfor %}</tr></thead><tbody>
{% for place, row in rows %}<tr{% if place == 1 %} class="winner"{% endif %}>{% for cell in row %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
<ul>{% for note in notes %}<li>{{ note }}</li>{% endfor %}</ul>
{{ plot }}
{% endblock %}
"""


def to_html(comparison: Comparison, png: bytes) -> str:
    """One self-contained page: the table, the notes and the plot embedded as a data URI."""
    return render_page(
        SWEEP_PAGE,
        columns=columns(comparison),
        rows=[(row.place, cells(row)) for row in comparison.rows],
        notes=notes(comparison),
        plot=png_img(png, "quality vs peak memory"),
    )


def write_reports(comparison: Comparison, folder: str | Path) -> dict[str, str]:
    """comparison.{md,json,html,png} in `folder`; returns {format: file name}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = scatter_png(comparison)
    files = {"md": to_markdown(comparison), "json": to_json(comparison), "html": to_html(comparison, png)}
    for ext, text in files.items():
        (folder / f"comparison.{ext}").write_text(text, encoding="utf-8")
    (folder / "comparison.png").write_bytes(png)
    return {ext: f"comparison.{ext}" for ext in (*files, "png")}


def metric_values(fields: Mapping[str, object]) -> dict[str, float | None]:
    """The quality metrics among an evaluation's fields, by name; a field the evaluation lacks is None."""
    return {name: fields.get(name) if isinstance(fields.get(name), (int, float)) else None for name in DIRECTIONS}
