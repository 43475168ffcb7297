"""Data loading: both forms, JSON arrays as users bring them, and `file:line` errors."""

import json

import pytest

from kftune.core.errors import KftuneError
from kftune.data.reading import load_conversations

from .conftest import REPO


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_alpaca_and_messages_become_the_same_messages(tmp_path):
    alpaca = {"instruction": "写一篇笔记", "input": "店名：A", "output": "好店 #探店", "system": "你是博主"}
    messages = {
        "messages": [
            {"role": "system", "content": "你是博主"},
            {"role": "user", "content": "写一篇笔记\n店名：A"},
            {"role": "assistant", "content": "好店 #探店"},
        ]
    }
    path = write_lines(
        tmp_path / "d.jsonl", [json.dumps(alpaca, ensure_ascii=False), "", json.dumps(messages, ensure_ascii=False)]
    )
    first, second = load_conversations(path)
    assert first == second


def test_committed_sample_data_loads():
    rows = load_conversations(REPO / "data" / "store_xhs_sft_samples.jsonl")
    assert len(rows) >= 500 and all(r[-1]["role"] == "assistant" for r in rows)


def test_llama_factory_json_array_loads(alpaca_array):
    items = json.loads(alpaca_array.read_text(encoding="utf-8"))
    rows = load_conversations(alpaca_array)
    assert len(rows) == len(items) > 100  # exact copies too: the gate, not the reader, rejects them
    with_input = [i for i, item in enumerate(items) if item["input"]]
    assert 0 < len(with_input) < len(items)
    for i in with_input:  # the input goes on its own line after the instruction
        assert rows[i][0]["content"] == items[i]["instruction"] + "\n" + items[i]["input"]
    assert all(rows[i][-1] == {"role": "assistant", "content": items[i]["output"]} for i in range(len(items)))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"'], "d.jsonl:2: invalid JSON"),
        (['["not", "an", "object"]'], "d.jsonl: item 0: the row is a JSON str; expected an object"),
        (['{"instruction": "a", "output": "b"}', '{"prompt": "a"}'], "d.jsonl:2: in none of the formats"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "d.jsonl:1: no assistant turn"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], "d.jsonl:1: messages[0].role is 'bot'"),
        ([""], "no samples (the file is empty)"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, expected):
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(KftuneError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_conversations(path)


def test_missing_file(tmp_path):
    with pytest.raises(KftuneError, match="data file not found"):
        load_conversations(tmp_path / "nope.jsonl")
