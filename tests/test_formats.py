"""Every row format through the gate: ShareGPT with tool calls (LLaMA-Factory's glaive demo shape), tool calls
in OpenAI's messages shape, prompt/completion, raw text; one format per file; a template that cannot render
tools and a base model without a template, each stopped with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kftune.core.errors import KftuneError
from kftune.data.formats import to_messages
from kftune.data.reading import load_samples
from kftune.data.rules import Options
from kftune.data.validate import validate
from kftune.dev.tool_data import BAD_TOOL_ROWS, FUNCTIONS, text_rows, tool_rows, write_jsonl
from kftune.evaluate import tool_calls

from .conftest import REPO, TOOL_ROWS, run_cli


@pytest.fixture(scope="session")
def glaive_file(tmp_path_factory) -> Path:
    """Good ShareGPT tool rows with the three bad ones at lines 11, 22 and 33."""
    rows = tool_rows(TOOL_ROWS, seed=5)
    for line, rule in zip((11, 22, 33), sorted(BAD_TOOL_ROWS), strict=True):
        rows.insert(line - 1, BAD_TOOL_ROWS[rule])
    return write_jsonl(tmp_path_factory.mktemp("glaive") / "glaive_toolcall.jsonl", rows)


def outputs(out: Path) -> dict[str, list[dict]]:
    return {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        for name in ("accepted", "rejected", "train", "eval")
    }


def test_sharegpt_tool_file_validates_with_a_rule_per_bad_row(glaive_file, tool_model, tmp_path):
    report = validate(glaive_file, tmp_path / "out", Options(tokenizer=str(tool_model), max_seq_length=1024))
    out = outputs(tmp_path / "out")
    assert report.row_format == "sharegpt"
    assert report.rows_in == TOOL_ROWS + 3 == report.accepted + report.rejected
    assert {(r["line"], r["rule"]) for r in out["rejected"]} == {
        (11, "tools.arguments_not_json"),
        (22, "tools.result_without_call"),
        (33, "tools.undeclared_function"),
    }
    assert all(len(r["problems"]) == 1 for r in out["rejected"])
    assert report.rules["tools.undeclared_function"]["rows"] == 1
    # the accepted line is the one internal shape: OpenAI messages with tool_calls (arguments as objects), tools
    first = out["accepted"][0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = first["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and isinstance(call["function"]["arguments"], dict)
    assert {t["function"]["name"] for t in first["tools"]} <= set(FUNCTIONS)
    assert len(out["train"]) + len(out["eval"]) == report.accepted


def test_length_is_counted_with_the_tools_rendered(glaive_file, tool_model, tmp_path):
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tool_model))
    rows = list(map(json.loads, glaive_file.read_text().splitlines()))[:5]
    exact = []
    for row in rows:
        sample = load_samples(write_jsonl(tmp_path / "one.jsonl", [row]))[0]
        with_tools = len(tokenizer.apply_chat_template(sample["messages"], tools=sample["tools"], return_dict=False))
        without = len(tokenizer.apply_chat_template(sample["messages"], return_dict=False))
        assert with_tools > without + 50  # the schemas are in the prompt
        exact.append(with_tools)
    limit = sorted(exact)[2]  # some of the five fit, some do not
    report = validate(
        write_jsonl(tmp_path / "five.jsonl", rows),
        tmp_path / "out",
        Options(tokenizer=str(tool_model), min_rows=0, max_seq_length=limit, eval_fraction=0, max_reject_fraction=1),
    )
    too_long = [r["line"] for r in outputs(tmp_path / "out")["rejected"] if r["rule"] == "length.too_long"]
    assert too_long == [i + 1 for i, n in enumerate(exact) if n > limit]
    assert report.token_lengths["max"] == max(n for n in exact if n <= limit)


def test_tool_rules_in_the_sharegpt_form_each_named(tmp_path):
    good = tool_rows(3)
    bad_schema = {**good[0], "tools": json.dumps([{"name": "get_weather"}])}
    not_a_call = {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "get_news"}]}
    ends_on_result = {"conversations": good[0]["conversations"][:3], "tools": good[0]["tools"]}
    unknown = {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    rows = [*good, bad_schema, not_a_call, ends_on_result, unknown, good[1]]
    report = validate(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", Options(min_rows=0))
    rejected = {r["line"]: r["rule"] for r in outputs(tmp_path / "out")["rejected"]}
    assert rejected == {
        4: "tools.bad_schema",
        5: "tools.arguments_not_json",
        6: "roles.not_ending_with_assistant",
        7: "roles.unknown_role",
        8: "duplicate.exact",
    }
    assert report.rows_in == 8 == report.accepted + report.rejected


def test_prompt_completion_rows_as_strings_and_as_message_lists(tmp_path):
    rows = [
        {"prompt": "Translate to French: cat", "completion": "chat"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
            "completion": [{"role": "assistant", "content": "Lima."}],
        },
        {"prompt": "Say hi", "completion": 5},
    ]
    report = validate(write_jsonl(tmp_path / "pc.jsonl", rows), tmp_path / "out", Options(min_rows=0, eval_fraction=0))
    out = outputs(tmp_path / "out")
    assert report.row_format == "prompt_completion"
    assert out["accepted"] == [
        {
            "messages": [
                {"role": "user", "content": "Translate to French: cat"},
                {"role": "assistant", "content": "chat"},
            ]
        },
        {"messages": to_messages(rows[1])},
    ]
    assert [(r["line"], r["rule"]) for r in out["rejected"]] == [(3, "schema.wrong_type")]
    assert "'completion' is int" in out["rejected"][0]["message"]


def test_text_rows_take_the_content_and_pii_rules(tmp_path):
    docs = text_rows(6)
    rows = [*docs, {"text": "   "}, {"text": "bell \x07 here"}, {"text": "write to zhang.san@example.com"}, docs[0]]
    report = validate(write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "out", Options(min_rows=0))
    out = outputs(tmp_path / "out")
    assert report.row_format == "text"
    assert {r["line"]: r["rule"] for r in out["rejected"]} == {
        7: "content.empty_text",
        8: "content.control_char",
        10: "duplicate.exact",
    }
    assert report.rules["pii.email"]["rows"] == 1
    assert out["accepted"][:6] == docs and all(set(r) == {"text"} for r in out["accepted"])


def test_a_file_mixing_formats_stops_with_one_line_naming_the_row(tmp_path):
    rows = [
        {"instruction": "q1", "output": "an answer"},
        {"messages": to_messages({"instruction": "q2", "output": "a"})},
    ]
    rows += [tool_rows(1)[0], {"instruction": "q3", "output": "more"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    expected = f"{data}:3: this row is sharegpt, but the file's first row (line 1) is alpaca"
    with pytest.raises(KftuneError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        validate(data, tmp_path / "out", Options(min_rows=0))
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(KftuneError, match="mixed.jsonl:3: this row is sharegpt"):
        load_samples(data)  # training reads the same way
    proc = run_cli("-m", "kftune.cli", "validate-data", str(data), "--out", str(tmp_path / "cli"))
    assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    good = write_jsonl(tmp_path / "tools.jsonl", tool_rows(3))
    proc = run_cli("-m", "kftune.cli", "validate-data", str(good), "--format", "alpaca", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "tools.jsonl:1: this row is sharegpt, but --format says alpaca" in proc.stderr
    proc = run_cli(
        "-m",
        "kftune.cli",
        "validate-data",
        str(good),
        "--format",
        "sharegpt",
        "--min-rows",
        "1",
        "--out",
        str(tmp_path / "y"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "sharegpt" in proc.stdout


def _with_template(model: Path, folder: Path, template: str | None) -> Path:
    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_cannot_render_tools_is_one_line(glaive_file, tool_model, tmp_path):
    no_tools = _with_template(tool_model, tmp_path / "no-tools", PLAIN_CHATML)
    proc = run_cli(
        "-m",
        "kftune.cli",
        "validate-data",
        str(glaive_file),
        "--base_model",
        str(no_tools),
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2, proc.stdout
    assert "the chat template ignores `tools`" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_base_model_without_a_template_serves_text_rows_only(tool_model, tmp_path):
    bare = _with_template(tool_model, tmp_path / "bare", None)
    texts = write_jsonl(tmp_path / "t.jsonl", text_rows(12))
    report = validate(texts, tmp_path / "ok", Options(tokenizer=str(bare)))
    assert report.passed and report.token_lengths["rows"] == 12
    chats = write_jsonl(tmp_path / "c.jsonl", [{"instruction": f"q{i}", "output": "an answer"} for i in range(12)])
    with pytest.raises(KftuneError, match="the tokenizer has no chat template"):
        validate(chats, tmp_path / "no", Options(tokenizer=str(bare)))


def test_the_tiny_template_renders_tools_as_qwen25_does(tool_model):
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tool_model))
    sample = load_samples(write_jsonl(tool_model.parent / "one.jsonl", tool_rows(1)))[0]
    text = tokenizer.apply_chat_template(sample["messages"], tools=sample["tools"], tokenize=False)
    tool_lines = "\n".join(json.dumps(t) for t in sample["tools"])
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{tool_lines}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )
    call = sample["messages"][1]["tool_calls"][0]["function"]
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        f'{{"name": "{call["name"]}", "arguments": {json.dumps(call["arguments"])}}}\n</tool_call><|im_end|>\n'
        f"<|im_start|>user\n<tool_response>\n{sample['messages'][2]['content']}\n</tool_response><|im_end|>\n"
    ) in text
    # without tools, the template renders exactly as before (the demo and every count are unchanged)
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo<|im_end|>\n"
    )


def test_tool_call_scores():
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    case = tool_calls.Case([{"role": "user", "content": "x"}], tools, "a", {"k": 1})
    outputs = [
        '<tool_call>\n{"name": "a", "arguments": {"k": 1}}\n</tool_call>',  # exact
        '<tool_call>\n{"name": "a", "arguments": {"k": 2}}\n</tool_call>',  # right name, wrong arguments
        '<tool_call>\n{"name": "b", "arguments": "{\\"k\\": 1}"}\n</tool_call>',  # declared, another function
        '<tool_call>\n{"name": "zzz", "arguments": {}}\n</tool_call>',  # undeclared
        '<tool_call>\n{"name": "a", "arguments": {k: 1}\n</tool_call>',  # does not parse
        "no call at all",
    ]
    scores = tool_calls.score(outputs, [case] * len(outputs))
    assert scores == {
        "tool_call_rows": 6,
        "tool_call_parse_rate": 4 / 6,
        "tool_call_declared_rate": 3 / 6,
        "tool_call_name_match": 2 / 6,
        "tool_call_args_match": 1 / 6,
    }
    assert tool_calls.score([], []) == {}


def test_the_committed_demo_file_is_the_generators_and_passes_the_gate(tool_model, tmp_path):
    from kftune.dev.tool_data import DEMO_FILE, demo_rows

    path = REPO / DEMO_FILE
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == demo_rows()
    proc = run_cli(
        "-m",
        "kftune.cli",
        "validate-data",
        str(path),
        "--base_model",
        str(tool_model),
        "--max_seq_length",
        "1024",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows in 63: accepted 60, rejected 3" in proc.stdout and "sharegpt" in proc.stdout
