"""Ranking sweep candidates and rendering the comparison; logging it to a real (SQLite) MLflow store."""

import base64
import json
import re

import pytest

from kftune.core.errors import KftuneError
from kftune.sweep import compare

PNG = b"\x89PNG\r\n\x1a\n"


def candidate(name, loss, memory_mib=600, seconds=10.0, rouge=None, method="lora", rank=8):
    return compare.Candidate(
        name=name,
        method=method,
        rank=rank,
        targets=None if method == "full" else "all",
        trainable_params=1_000 if method != "full" else 100_000,
        total_params=100_000,
        peak_memory_bytes=memory_mib * 2**20,
        train_seconds=seconds,
        tokens_per_second=250.0,
        quality={"eval_loss": loss, "perplexity": 2.718281828**loss, "rougeL": rouge},
    )


CANDIDATES = [
    candidate("lora-r8-all", 2.0, 700),
    candidate("full", 1.6, 2000, method="full", rank=None),
    candidate("qlora4-r8-all", 2.4, 400, method="qlora4"),
]


def test_lower_is_better_metrics_rank_ascending_with_quality_relative_to_the_best():
    result = compare.rank(CANDIDATES, "eval_loss")
    assert [row.candidate.name for row in result.rows] == ["full", "lora-r8-all", "qlora4-r8-all"]
    assert [row.place for row in result.rows] == [1, 2, 3] and result.winner.name == "full"
    assert [row.relative_quality for row in result.rows] == pytest.approx([1.0, 1.6 / 2.0, 1.6 / 2.4])


def test_higher_is_better_metrics_rank_descending():
    rows = [candidate("a", 2.0, rouge=0.30), candidate("b", 2.5, rouge=0.40), candidate("c", 1.0, rouge=0.20)]
    result = compare.rank(rows, "rougeL")
    assert [row.candidate.name for row in result.rows] == ["b", "a", "c"] and result.higher_is_better
    assert [row.relative_quality for row in result.rows] == pytest.approx([1.0, 0.75, 0.5])


def test_a_tie_goes_to_the_candidate_needing_less_memory_then_less_time():
    rows = [candidate("big", 2.0, 900), candidate("slow", 2.0, 500, seconds=30), candidate("small", 2.0, 500)]
    assert [row.candidate.name for row in compare.rank(rows).rows] == ["small", "slow", "big"]


def test_a_primary_metric_that_was_not_measured_is_refused_naming_the_candidates():
    with pytest.raises(KftuneError, match=r"primary_metric rougeL: not measured for lora-r8-all, full, qlora4-r8-all"):
        compare.rank(CANDIDATES, "rougeL")
    with pytest.raises(KftuneError, match=r"primary_metric 'bleu'"):
        compare.rank(CANDIDATES, "bleu")
    with pytest.raises(KftuneError, match="no candidates"):
        compare.rank([], "eval_loss")


def test_the_markdown_table_has_every_measured_column_filled_and_unmeasured_ones_marked():
    text = compare.to_markdown(compare.rank(CANDIDATES))
    table = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:10] == [
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
    ]
    assert head[10:] == ["eval loss", "perplexity", "ROUGE-L", "chrF", "checks passed", "quality vs best (eval loss)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == 3 and all(len(r) == len(head) for r in rows)
    first = dict(zip(head, rows[0]))
    assert first["candidate"] == "full" and first["rank"] == "-" and first["share"] == "100.00%"
    assert first["peak memory"] == "1.95 GiB" and first["train wall time"] == "10.0 s" and first["tokens/s"] == "250"
    assert first["eval loss"] == "1.600" and first["quality vs best (eval loss)"] == "100.0%"
    second = dict(zip(head, rows[1]))
    assert (
        second["share"] == "1.00%"
        and second["peak memory"] == "700 MiB"
        and second["quality vs best (eval loss)"] == "80.0%"
    )
    for row in rows:
        cells = dict(zip(head, row))
        assert cells["ROUGE-L"] == cells["chrF"] == cells["checks passed"] == "n/a"  # no samples scored here
        assert all(
            v not in ("", "None", "nan", "n/a")
            for k, v in cells.items()
            if k not in ("ROUGE-L", "chrF", "checks passed")
        )
    assert "ranked by eval_loss (lower is better); winner: full" in text


def test_the_json_carries_the_raw_numbers_and_null_for_what_was_not_measured():
    data = json.loads(compare.to_json(compare.rank(CANDIDATES)))
    assert data["primary_metric"] == "eval_loss" and data["winner"] == "full" and data["higher_is_better"] is False
    lora = data["rows"][1]
    assert lora["name"] == "lora-r8-all" and lora["peak_memory_bytes"] == 700 * 2**20 and lora["place"] == 2
    assert lora["quality"]["eval_loss"] == 2.0 and lora["quality"]["rougeL"] is None and lora["quality"]["chrf"] is None
    assert lora["relative_quality"] == pytest.approx(0.8) and lora["trainable_share"] == pytest.approx(0.01)


def test_the_html_page_escapes_names_and_embeds_the_quality_vs_memory_plot():
    rows = [*CANDIDATES, candidate("<script>x</script>", 3.0)]
    comparison = compare.rank(rows)
    png = compare.scatter_png(comparison)
    assert png.startswith(PNG) and len(png) > 5_000
    page = compare.to_html(comparison, png)
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert page.count("<tr") == 1 + len(rows) and page.count('class="winner"') == 1
    (embedded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(embedded) == png


def test_reports_are_written_in_every_format(tmp_path):
    files = compare.write_reports(compare.rank(CANDIDATES), tmp_path / "out")
    assert (
        sorted(p.name for p in (tmp_path / "out").iterdir())
        == sorted(files.values())
        == ["comparison.html", "comparison.json", "comparison.md", "comparison.png"]
    )
    assert (tmp_path / "out" / "comparison.png").read_bytes().startswith(PNG)


def test_metric_values_reads_the_evaluations_fields_by_name():
    fields = {"eval_loss": 2.0, "perplexity": 7.4, "rougeL": 0.31, "sample_prompt": "text", "chrf": None}
    assert compare.metric_values(fields) == {
        "eval_loss": 2.0,
        "perplexity": 7.4,
        "rougeL": 0.31,
        "chrf": None,
        "checks_pass_rate": None,
        "tool_call_name_match": None,  # measured on tool-calling eval data only
        "tool_call_args_match": None,
    }
    assert compare.metric_values({"eval_loss": 2.0})["rougeL"] is None
