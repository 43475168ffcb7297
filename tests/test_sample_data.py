"""The synthetic Xiaohongshu data set: deterministic, well-formed in both forms, and the committed file is current."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kftune import cli
from kftune.dev.sample_data import SYSTEM_PROMPT, generate_samples, write_samples

COMMITTED = Path(__file__).parents[1] / "data/store_xhs_sft_samples.jsonl"
EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
HASHTAG_LINE = re.compile(r"^#\S+( #\S+){2,4}$")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def alpaca() -> list[dict]:
    return generate_samples(200, "alpaca", seed=0)


def test_same_arguments_give_identical_bytes(tmp_path):
    a = write_samples(tmp_path / "a.jsonl", 50, "messages", seed=3)
    b = write_samples(tmp_path / "b.jsonl", 50, "messages", seed=3)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != write_samples(tmp_path / "c.jsonl", 50, "messages", seed=4).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no temp files left


def test_committed_file_is_what_the_code_makes(tmp_path):
    assert cli.main(["sample-data", str(tmp_path / "s.jsonl"), "--rows", "600"]) == 0
    assert (tmp_path / "s.jsonl").read_bytes() == COMMITTED.read_bytes()
    assert len(_read(COMMITTED)) == 600


def test_alpaca_rows_have_the_shop_facts_and_a_post(alpaca):
    assert len(alpaca) == 200
    for row in alpaca:
        assert set(row) == {"instruction", "input", "output"}
        facts = dict(line.split("：", 1) for line in row["input"].split("\n"))
        assert list(facts) == ["店名", "品类", "城市", "亮点", "人均"]
        highlights = facts["亮点"].split("、")
        assert 2 <= len(highlights) <= 3
        assert all(h in row["output"] for h in highlights)
        assert facts["人均"] in row["output"] and facts["店名"] in row["output"]


def test_each_post_has_title_body_and_hashtags(alpaca):
    for row in alpaca:
        post = row["output"]
        title, *body, tags = post.split("\n")
        assert EMOJI.search(title) or title.startswith("【"), title
        assert body, post
        assert HASHTAG_LINE.match(tags), tags
        assert len(EMOJI.findall(post)) >= 3, post
        assert 80 <= len(post) <= 250, len(post)


def test_messages_form_matches_the_alpaca_rows(tmp_path, alpaca):
    path = write_samples(tmp_path / "m.jsonl", 200, "messages", seed=0)
    rows = _read(path)
    assert len(rows) == 200
    for row, source in zip(rows, alpaca):
        system, user, assistant = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert system["content"] == SYSTEM_PROMPT
        assert user["content"] == source["instruction"] + "\n" + source["input"]
        assert assistant["content"] == source["output"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "0"], "--rows must be at least 1"),
        (["--format", "sharegpt"], "--format must be one of alpaca, messages"),
    ],
)
def test_bad_flags_are_reported_without_a_file(tmp_path, capsys, args, message):
    target = tmp_path / "out.jsonl"
    assert cli.main(["sample-data", str(target), *args]) == 2
    assert message in capsys.readouterr().err
    assert not target.exists()


def test_a_directory_target_is_refused(tmp_path, capsys):
    assert cli.main(["sample-data", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
