"""One self-contained report.html for an evaluation: loss curves, base vs tuned, token lengths, samples.

The page is core/pages.py's base with this report's body; plots are matplotlib PNGs embedded as data
URIs and the token histogram is the validation report's own. Parts whose inputs are missing (no
training metrics, no validation report) say so instead of failing.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from kftune.core.pages import png_img, render_page, token_histogram

TUNED_COLOR, BASE_COLOR, EVAL_COLOR = "#1f77b4", "#999999", "#d62728"
BAR_METRICS = (
    ("eval_loss", "eval loss (lower is better)"),
    ("rougeL", "ROUGE-L, characters"),
    ("chrf", "chrF"),
    ("checks_pass_rate", "outputs passing every check"),
    ("tool_call_name_match", "tool calls naming the reference's function"),
    ("tool_call_args_match", "tool calls with the reference's exact arguments"),
)
# every base-vs-tuned number of the table and the terminal, in order
TABLE_METRICS = (
    ("eval_loss", "eval loss"),
    ("perplexity", "perplexity"),
    ("rougeL", "ROUGE-L (chars)"),
    ("chrf", "chrF"),
    ("checks_pass_rate", "passing every check"),
    ("tool_call_parse_rate", "tool calls that parse"),
    ("tool_call_declared_rate", "tool calls naming a declared function"),
    ("tool_call_name_match", "tool call name match"),
    ("tool_call_args_match", "tool call arguments match"),
)


def _png(fig) -> Markup:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return png_img(buffer.getvalue())


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=(width, height))


def loss_curves(training: dict[str, Any] | None, metrics: dict[str, Any]) -> Markup:
    """Training loss by step, eval loss by step (when training evaluated), and the final base/tuned eval loss."""
    history = (training or {}).get("loss_history") or []
    if not history:
        return Markup(
            '<p class="note">no training loss history (the model folder has no train_metrics.json from '
            "kftune train)</p>"
        )
    fig = _figure(9, 4)
    ax = fig.add_subplot()
    steps, losses = zip(*history)
    ax.plot(steps, losses, color=TUNED_COLOR, label="training loss")
    evals = (training or {}).get("eval_loss_history") or []
    if evals:
        eval_steps, eval_losses = zip(*evals)
        ax.plot(eval_steps, eval_losses, "o-", color=EVAL_COLOR, label="eval loss during training")
    last = steps[-1]
    ax.axhline(metrics["base"]["eval_loss"], color=BASE_COLOR, linestyle="--", label="base model, eval loss")
    ax.plot(
        [last], [metrics["tuned"]["eval_loss"]], "*", markersize=14, color=EVAL_COLOR, label="tuned model, eval loss"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per assistant token (nats)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def metrics_chart(metrics: dict[str, Any]) -> Markup:
    shown = [(key, label) for key, label in BAR_METRICS if key in metrics["tuned"] and key in metrics["base"]]
    fig = _figure(3.2 * len(shown), 3.4)
    for i, (key, label) in enumerate(shown, start=1):
        ax = fig.add_subplot(1, len(shown), i)
        values = [metrics["base"][key], metrics["tuned"][key]]
        bars = ax.bar(["base", "tuned"], values, color=[BASE_COLOR, TUNED_COLOR])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle("Base vs tuned on the same held-out data")
    return _png(fig)


def length_histogram(validation: dict[str, Any] | None) -> Markup:
    stats = (validation or {}).get("token_lengths")
    if not stats:
        return Markup('<p class="note">no validation report with token lengths (pass --validation)</p>')
    return Markup("<p>Token lengths of {} accepted rows: p50 {}, p90 {}, max {}</p>").format(
        stats["rows"], stats["p50"], stats["p90"], stats["max"]
    ) + token_histogram(stats)


def _metrics_table(metrics: dict[str, Any]) -> Markup:
    rows = []
    for key, label in TABLE_METRICS:
        if key not in metrics["tuned"]:
            continue
        base, tuned = metrics["base"][key], metrics["tuned"][key]
        lower_better = key in ("eval_loss", "perplexity")
        better = tuned < base if lower_better else tuned > base
        rows.append(
            f'<tr><td>{label}</td><td class="num">{base:.4g}</td>'
            f'<td class="num{" better" if better else ""}">{tuned:.4g}</td></tr>'
        )
    for name, rate in (metrics["tuned"].get("checks") or {}).items():
        if name != "all":
            rows.append(
                f'<tr><td>check: {html.escape(name)}</td><td class="num">{metrics["base"]["checks"][name]:.2f}</td>'
                f'<td class="num">{rate:.2f}</td></tr>'
            )
    return Markup("<table><tr><th>metric</th><th>base</th><th>tuned</th></tr>" + "".join(rows) + "</table>")


def _number(value: Any, fmt: str = ".4g") -> str:
    return "n/a" if value is None else format(value, fmt)


def _benchmarks_table(metrics: dict[str, Any]) -> Markup:
    """Base vs tuned per benchmark task, with the delta; with a guard, drops beyond it are marked."""
    from kftune.registry.gate import guard

    rows = metrics.get("benchmarks")
    if not rows:
        return Markup('<p class="note">no benchmarks run (kftune evaluate --benchmarks)</p>')
    settings = metrics.get("benchmark_settings") or {}
    max_drop = settings.get("guard_max_drop")
    body = []
    for task, row in rows.items():
        mark = ""
        if max_drop is not None:
            g = guard(task, row, max_drop)
            mark = '<span class="ok">✓ within</span>' if g.passed else '<span class="no">✗ beyond the guard</span>'
        stderr = f" ± {row['stderr']:.2g}" if row.get("stderr") is not None else ""
        body.append(
            f"<tr><td>{html.escape(task)}</td><td>{html.escape(str(row['metric']))} "
            f"({'higher' if row.get('higher_is_better', True) else 'lower'} is better)</td>"
            f'<td class="num">{_number(row["base"])}</td><td class="num">{_number(row["tuned"])}{stderr}</td>'
            f'<td class="num">{_number(row.get("delta"), "+.4g")}</td><td class="num">{row.get("examples", 0)}</td>'
            f"<td>{mark}</td></tr>"
        )
    guard_note = f"guard: max drop {max_drop * 100:g}% of the base" if max_drop is not None else "no guard set"
    return Markup(
        f'<p class="note">lm-evaluation-harness, same examples and seed for both models, prompts through the '
        f"chat template; {html.escape(guard_note)}</p><table><tr><th>task</th><th>metric</th><th>base</th>"
        "<th>tuned</th><th>delta</th><th>examples</th><th>guard</th></tr>" + "".join(body) + "</table>"
    )


def _checks(results: dict[str, bool]) -> str:
    return " ".join(
        f'<span class="{"ok" if ok else "no"}">{"✓" if ok else "✗"} {html.escape(name)}</span>'
        for name, ok in results.items()
    )


def _samples_table(samples: Sequence[dict[str, Any]]) -> Markup:
    if not samples:
        return Markup('<p class="note">no samples generated (--samples 0, or a text corpus: perplexity only)</p>')
    rows = []
    for s in samples:
        prompt = "\n".join(m["content"] for m in s["prompt"] if m["role"] == "user")
        rows.append(
            f"<tr><td>{html.escape(prompt)}</td><td>{html.escape(s['reference'])}</td>"
            f"<td>{html.escape(s['base_output'])}<br>{_checks(s.get('base_checks') or {})}</td>"
            f"<td>{html.escape(s['tuned_output'])}<br>{_checks(s.get('tuned_checks') or {})}</td></tr>"
        )
    return Markup(
        '<table class="samples"><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>'
        + "".join(rows)
        + "</table>"
    )


EVALUATION_PAGE = """{% extends "base.html" %}
{% block title %}kftune evaluation report{% endblock %}
{% block body %}
<h1>kftune evaluation: base vs tuned</h1>
<table class="meta">{% for name, value in meta %}<tr><td>{{ name }}</td><td>{{ value }}</td></tr>{% endfor %}</table>
<h2>Metrics</h2>{{ metrics_table }}
{{ metrics_chart }}
<h2>Benchmarks (general ability)</h2>{{ benchmarks_table }}
<h2>Loss curves</h2>{{ loss_curves }}
<h2>Token lengths (validation)</h2>{{ length_histogram }}
<h2>Samples (greedy, side by side)</h2>{{ samples_table }}
{% endblock %}
"""


def render(
    metrics: dict[str, Any],
    samples: Sequence[dict[str, Any]],
    training: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
) -> str:
    meta = [
        ("tuned model", metrics["model"]),
        ("base model", metrics["base_model"]),
        ("method", metrics.get("method") or "unknown"),
        ("eval data", metrics["eval_data"]),
        ("eval rows / sha256", f"{metrics['eval_rows']} / {metrics['eval_sha256']}"),
        ("eval key", metrics["eval_key"]),
        ("template fingerprint", metrics["template_fingerprint"]),
    ]
    return render_page(
        EVALUATION_PAGE,
        meta=meta,
        metrics_table=_metrics_table(metrics),
        metrics_chart=metrics_chart(metrics),
        benchmarks_table=_benchmarks_table(metrics),
        loss_curves=loss_curves(training, metrics),
        length_histogram=length_histogram(validation),
        samples_table=_samples_table(samples),
    )


def write_report(
    path: str | Path,
    metrics: dict[str, Any],
    samples: Sequence[dict[str, Any]],
    training: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.write_text(render(metrics, samples, training, validation), encoding="utf-8")
    return path


def format_table(metrics: dict[str, Any]) -> str:
    """base vs tuned, one metric a row: what `kftune evaluate` prints."""
    shown = [name for name, _ in TABLE_METRICS if name in metrics["tuned"]]
    width = max([18] + [len(name) + 1 for name in shown])
    rows = [f"{'metric':<{width}}{'base':>12}{'tuned':>12}"]
    rows += [f"{name:<{width}}{metrics['base'][name]:>12.4f}{metrics['tuned'][name]:>12.4f}" for name in shown]
    for task, row in (metrics.get("benchmarks") or {}).items():
        rows.append(f"{task + ' ' + row['metric']:<{width}}{_number(row['base']):>12}{_number(row['tuned']):>12}")
    return "\n".join(rows)
