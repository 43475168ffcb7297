"""The evaluation report: one self-contained page with embedded plots, rendered by headless Chromium."""

import re

import pytest

from kftune.evaluate.report import render, write_report
from scripts.screenshot_report import find_browser, screenshot

METRICS = {
    "model": "s3://b/models/" + "a" * 64,
    "base_model": "s3://b/base/" + "b" * 64,
    "method": "lora",
    "eval_data": "eval.jsonl",
    "eval_rows": 60,
    "eval_sha256": "c" * 64,
    "eval_key": "d" * 64,
    "template_fingerprint": "e" * 64,
    "base": {
        "eval_loss": 8.6,
        "perplexity": 5430.0,
        "rougeL": 0.05,
        "chrf": 3.1,
        "checks_pass_rate": 0.0,
        "checks": {"title": 0.0, "hashtag": 0.0, "length": 0.5, "all": 0.0},
    },
    "tuned": {
        "eval_loss": 3.6,
        "perplexity": 36.6,
        "rougeL": 0.41,
        "chrf": 30.2,
        "checks_pass_rate": 0.75,
        "checks": {"title": 1.0, "hashtag": 0.75, "length": 1.0, "all": 0.75},
    },
}
TRAINING = {
    "loss_history": [[s, 8.5 * 0.993**s] for s in range(0, 301, 10)],
    "eval_loss_history": [[s, 8.6 * 0.994**s] for s in range(30, 301, 30)],
}
VALIDATION = {
    "token_lengths": {
        "rows": 600,
        "p50": 190,
        "p90": 230,
        "max": 260,
        "max_seq_length": 256,
        "histogram": [[i * 10, (i + 1) * 10, max(0, 80 - abs(19 - i) * 12)] for i in range(27)],
    }
}
SAMPLES = [
    {
        "prompt": [{"role": "user", "content": "为这家店写一篇小红书探店笔记。\n店名：山野咖啡"}],
        "reference": "☕成都咖啡店天花板｜山野咖啡\n手冲很好喝\n#成都探店 #咖啡",
        "base_output": "<script>alert(1)</script>",
        "tuned_output": "☕山野咖啡｜成都\n露台安静\n#咖啡",
        "base_checks": {"title": False, "hashtag": False, "length": False},
        "tuned_checks": {"title": True, "hashtag": True, "length": False},
    }
]


def test_every_part_is_on_the_page_and_model_text_is_escaped():
    page = render(METRICS, SAMPLES, TRAINING, VALIDATION)
    assert page.count('src="data:image/png;base64,') == 2 and page.count("<svg") == 1  # metrics, loss; token lengths
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "☕成都咖啡店天花板｜山野咖啡" in page and "✓ title" in page and "✗ length" in page
    assert re.search(r'class="num better">3\.6<', page)  # lower loss is better, and marked so


def test_missing_parts_are_said_not_failed():
    page = render(METRICS, [], None, None)
    assert page.count("data:image/png;base64,") == 1
    assert "no training loss history" in page and "no validation report" in page and "no samples generated" in page


@pytest.mark.skipif(find_browser() is None, reason="no chromium on PATH (apt-get install chromium); CI has none")
def test_the_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    from PIL import Image

    report = write_report(tmp_path / "report.html", METRICS, SAMPLES, TRAINING, VALIDATION)
    shot = screenshot(report, tmp_path / "report.png", width=1200, height=2400)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colors = image.getcolors(maxcolors=1 << 20)
    # the plots' bar/line blue (#1f77b4) and base grey (#999999) are drawn; text alone has neither
    counts = {rgb: n for n, rgb in colors}
    assert counts.get((0x1F, 0x77, 0xB4), 0) > 2000 and counts.get((0x99, 0x99, 0x99), 0) > 2000
    assert len(colors) > 500  # anti-aliased text and plots, not a blank page


def test_the_screenshot_script_says_when_there_is_no_browser(tmp_path, monkeypatch):
    from scripts import screenshot_report

    report = write_report(tmp_path / "r.html", METRICS, [], None, None)
    monkeypatch.setattr(screenshot_report, "BROWSERS", ("no-such-browser-kftune",))
    assert screenshot_report.main([str(report), str(tmp_path / "r.png")]) == screenshot_report.NO_BROWSER
    assert not (tmp_path / "r.png").exists()
