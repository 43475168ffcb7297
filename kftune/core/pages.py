"""One HTML page base for every report (data validation, evaluation, sweep): one stylesheet and layout, Jinja2
with autoescaping, and the figure more than one report draws (the token-length histogram).

Each report is a child template `{% extends "base.html" %}` filling `title` and `body`; values are
escaped unless a report passes ready-made HTML as `Markup` (its own tables, embedded plots). Pages are
self-contained (plots inline), so one file renders anywhere: a KFP HTML artifact, MLflow, a browser.
"""

from __future__ import annotations

import base64
from typing import Any

from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup

CSS = """
body{font-family:system-ui,"Noto Sans CJK SC","Noto Color Emoji",sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:14px;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}.better{color:#087f23;font-weight:600}
.samples td{white-space:pre-wrap;overflow-wrap:anywhere;max-width:320px;font-size:13px}.ok{color:#087f23}.no{color:#b00020}
.meta td:first-child{color:#666}.note{color:#666;font-style:italic}img{max-width:100%}
.fail{color:#b00020;font-weight:bold}tr.winner{background:#e8f5e9}
"""
BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}{% endblock %}</title><style>{{ css }}</style></head>
<body>{% block body %}{% endblock %}</body></html>
"""
_ENV = Environment(
    loader=DictLoader({"base.html": BASE}),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_page(template: str, **context: Any) -> str:
    """Render a child template of base.html (autoescaped)."""
    return _ENV.from_string(template).render(css=Markup(CSS), **context)


def png_img(png: bytes, alt: str = "") -> Markup:
    """A PNG embedded as a data URI."""
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, base64.b64encode(png).decode("ascii"))


def token_histogram(stats: dict[str, Any]) -> Markup:
    """Rows per token-length bin (the data gate's `token_lengths`) as inline SVG, with the max_seq_length limit
    as a red line: drawn here once for the validation and the evaluation report."""
    bins, limit = stats["histogram"], stats["max_seq_length"]
    width, height, pad = 640, 220, 30
    top_count = max(n for _, _, n in bins) or 1
    bar = (width - 2 * pad) / len(bins)
    span = bins[-1][1]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img" '
        f'aria-label="token-length histogram">'
    ]
    for i, (lo, hi, n) in enumerate(bins):
        h = (height - pad) * n / top_count
        parts.append(
            f'<rect x="{pad + i * bar:.1f}" y="{height - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
            f'fill="#4a7ebb"><title>{lo}-{hi - 1} tokens: {n} rows</title></rect>'
        )
    x = pad + (width - 2 * pad) * limit / span
    parts.append(f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="#c00" stroke-dasharray="4"/>')
    parts.append(f'<text x="{x + 3:.1f}" y="{pad}" fill="#c00" font-size="11">max_seq_length {limit}</text>')
    parts.append(f'<text x="{pad}" y="{height + 16}" font-size="11">0</text>')
    parts.append(f'<text x="{width - pad}" y="{height + 16}" font-size="11" text-anchor="end">{span} tokens</text>')
    parts.append(f'<text x="{pad}" y="{pad / 2}" font-size="11">{top_count} rows</text></svg>')
    return Markup("".join(parts))  # numbers only: nothing to escape
