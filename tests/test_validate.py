"""The data validation gate: each rule found at its row, nothing valid lost, bounded memory, exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kftune.core.errors import ConfigError, KftuneError
from kftune.data.formats import to_messages
from kftune.data.pii import find_pii
from kftune.data.rules import RULES, Options
from kftune.data.streaming import BOM, ArrayItems
from kftune.data.token_counting import TokenCounter, load_counter
from kftune.data.validate import validate
from kftune.data.validation_report import Report

from .alpaca_array import write_alpaca_array
from .conftest import REPO, external_alpaca, run_cli

GOOD = [
    {"instruction": f"介绍一下第{i}家咖啡店", "input": "", "output": f"第{i}家店的拿铁很香，环境安静，适合看书。"}
    for i in range(4)
]
BAD_LINE = 3  # every rule fixture: GOOD[0], GOOD[1], the bad line, GOOD[2], GOOD[3]


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def tool_chat(name: str, arguments: dict | str) -> dict:
    """A messages row with one tool call (`arguments` as given) and its result, declaring get_weather."""
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"weather": "snowy"}'},
            {"role": "assistant", "content": "It is snowy in Oslo."},
        ],
        "tools": [WEATHER_TOOL],
    }


def encode(row: bytes | dict) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()


# One fixture row per rule that a row can break on its own (or against GOOD[0]).
RULE_FIXTURES: dict[str, bytes | dict] = {
    "parse.invalid_json": b'{"instruction": "x", "output": ',
    "parse.not_object": b'["instruction", "output"]',
    "parse.invalid_utf8": b'{"instruction": "caf\xe9 au lait?", "output": "a coffee with milk"}',
    "parse.bom": BOM + encode({"instruction": "say hi", "output": "hi there"}),
    "parse.blank_line": b"   ",
    "schema.unknown_form": {"question": "q?", "answer": "an answer"},
    "schema.missing_field": {"instruction": "no output here"},
    "schema.wrong_type": {"instruction": "q", "output": 5},
    "schema.unknown_field": {"instruction": "say hi", "output": "hi there", "id": 7},
    "roles.unknown_role": chat(("human", "hi"), ("assistant", "hello there")),
    "roles.system_not_first": chat(("user", "hi"), ("system", "be brief"), ("assistant", "hello there")),
    "roles.not_alternating": chat(("user", "hi"), ("user", "again"), ("assistant", "hello there")),
    "roles.no_assistant": chat(("user", "hi")),
    "roles.not_ending_with_assistant": chat(("user", "hi"), ("assistant", "hello there"), ("user", "bye")),
    "roles.empty_content": {"instruction": "  \t", "output": "an answer"},
    "length.short_response": {"instruction": "是不是？", "output": "是"},
    "duplicate.exact": {"instruction": "  介绍一下第0家咖啡店", "input": "", "output": GOOD[0]["output"]},
    "duplicate.conflicting_answer": {"instruction": GOOD[0]["instruction"], "output": "另一个完全不同的回答。"},
    "pii.email": {"instruction": "留个联系方式", "output": "请发邮件到 zhang.san@example.com 联系我"},
    "pii.phone": {"instruction": "留个联系方式", "output": "打电话 138 1234 5678 或 +44 20 7946 0958"},
    "pii.id_number": {"instruction": "登记信息", "output": "身份证号 11010519491231002X 已登记"},
    "pii.card_number": {"instruction": "付款信息", "output": "卡号 4111 1111 1111 1111 已绑定"},
    "content.response_equals_prompt": {"instruction": "重复：你好世界", "output": "重复：你好世界 "},
    "content.replacement_char": {"instruction": "说点什么", "output": "这段文字乱码\ufffd\ufffd了"},
    "content.mojibake": {"instruction": "翻译成中文", "output": "ä¸­æ–‡ means Chinese"},
    "content.control_char": {"instruction": "说点什么", "output": "响铃\x07在这里"},
    # tool calling in the messages form (OpenAI's shape); the ShareGPT form: tests/test_formats.py
    "tools.undeclared_function": tool_chat("book_flight", {"city": "Oslo"}),
    "tools.arguments_not_json": tool_chat("get_weather", "city=Oslo"),
    "tools.bad_schema": {**tool_chat("get_weather", {"city": "Oslo"}), "tools": [{"name": "get_weather"}]},
    "tools.result_without_call": {
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "tool", "content": '{"weather": "snowy"}'},
            {"role": "assistant", "content": "It is snowy in Oslo."},
        ],
        "tools": [WEATHER_TOOL],
    },
}
WARNINGS = {
    "parse.bom",
    "parse.blank_line",
    "schema.unknown_field",
    "duplicate.conflicting_answer",
    "pii.email",
    "pii.phone",
    "pii.id_number",
    "pii.card_number",
}  # pii: the default policy flags
TESTED_ELSEWHERE = {
    "parse.broken_array",
    "length.too_long",
    "roles.template_error",
    "leakage.eval_in_train",
    "leakage.external_eval",
    "content.empty_text",  # a text row cannot share a file with alpaca rows: tests/test_formats.py
}


def write(path: Path, rows: list[bytes | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(encode(r) + b"\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(report: Report) -> dict[str, list[dict]]:
    out = Path(report.out_dir)
    return {name: read_jsonl(out / f"{name}.jsonl") for name in ("accepted", "rejected", "warnings", "train", "eval")}


def gate(tmp_path: Path, rows: list[bytes | dict], **options) -> tuple[Report, dict[str, list[dict]]]:
    data = write(tmp_path / "data.jsonl", rows)
    report = validate(data, tmp_path / "out", Options(**{"min_rows": 1, **options}))
    return report, outputs(report)


def found(records: list[dict], rule: str) -> list[int]:
    return [r["line"] for r in records if rule in {p["rule"] for p in r.get("problems", [r])}]


def test_every_rule_has_a_fixture():
    assert set(RULES) == set(RULE_FIXTURES) | TESTED_ELSEWHERE


@pytest.mark.parametrize("rule", sorted(RULE_FIXTURES))
def test_rule_found_at_its_row(tmp_path, rule):
    rows = [GOOD[0], GOOD[1], RULE_FIXTURES[rule], GOOD[2], GOOD[3]]
    report, out = gate(tmp_path, rows)
    if rule in WARNINGS:
        assert found(out["warnings"], rule) == [BAD_LINE]
        assert out["rejected"] == []
    else:
        assert found(out["rejected"], rule) == [BAD_LINE]
        assert [r["line"] for r in out["rejected"]] == [BAD_LINE]
        assert out["rejected"][0]["where"] == f"{tmp_path / 'data.jsonl'}:{BAD_LINE}"
    assert report.rules[rule]["rows"] == 1
    blank = rule == "parse.blank_line"
    assert report.rows_in == 5 - blank == report.accepted + report.rejected
    assert {json.dumps(m) for m in out["accepted"]} >= {json.dumps({"messages": to_messages(g)}) for g in GOOD}


def test_rejected_rows_say_what_is_wrong(tmp_path):
    _, out = gate(
        tmp_path,
        [
            GOOD[0],
            RULE_FIXTURES["roles.unknown_role"],
            RULE_FIXTURES["schema.wrong_type"],
            RULE_FIXTURES["duplicate.exact"],
        ],
    )
    messages = {r["rule"]: r["message"] for r in out["rejected"]}
    assert messages["roles.unknown_role"] == "messages[0].role is 'human'; expected one of system, user, assistant"
    assert messages["schema.wrong_type"] == "'output' is int; expected a string"
    assert messages["duplicate.exact"] == "duplicate of the row at line 1; remove it"
    assert out["rejected"][0]["row"] == RULE_FIXTURES["roles.unknown_role"]  # the row as it was, to fix it


def test_a_repeated_second_answer_is_a_duplicate_of_its_own_line(tmp_path):
    other = RULE_FIXTURES["duplicate.conflicting_answer"]
    _, out = gate(tmp_path, [GOOD[0], other, GOOD[1], other, GOOD[0]])
    assert found(out["warnings"], "duplicate.conflicting_answer") == [2]
    assert {r["line"]: r["message"] for r in out["rejected"]} == {
        4: "duplicate of the row at line 2; remove it",
        5: "duplicate of the row at line 1; remove it",
    }


def test_a_row_reports_every_problem_of_its_stage(tmp_path):
    row = chat(("system", "s"), ("assistant", " "), ("system", "again"))
    _, out = gate(tmp_path, [row])
    rules = [p["rule"] for p in out["rejected"][0]["problems"]]
    assert rules == [
        "roles.system_not_first",
        "roles.not_alternating",
        "roles.not_ending_with_assistant",
        "roles.empty_content",
    ]


def test_broken_json_array_fails_the_gate_at_its_line(tmp_path):
    data = tmp_path / "data.json"
    items = [json.dumps(g, ensure_ascii=False) for g in GOOD[:2]] + ['{"instruction": "x" "output": "y"}', "{}"]
    data.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    report = validate(data, tmp_path / "out", Options(min_rows=1, max_reject_fraction=1))
    out = outputs(report)
    assert report.data_format == "json-array" and not report.passed
    assert found(out["rejected"], "parse.broken_array") == [4]
    assert report.failures[0].startswith(f"{data}:4: invalid JSON in the array")
    assert report.accepted == 2 and report.rows_in == 3
    assert report.dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()


def test_json_array_gives_the_same_result_as_jsonl(tmp_path):
    rows = [GOOD[0], RULE_FIXTURES["roles.no_assistant"], GOOD[1], RULE_FIXTURES["pii.email"], GOOD[2]]
    array = tmp_path / "data.json"
    array.write_bytes(BOM + b"[" + b",\n  ".join(encode(r) for r in rows) + b"]")
    jsonl = write(tmp_path / "data.jsonl", rows)
    a = validate(array, tmp_path / "a", Options(min_rows=1))
    validate(jsonl, tmp_path / "b", Options(min_rows=1))
    assert (tmp_path / "a" / "accepted.jsonl").read_bytes() == (tmp_path / "b" / "accepted.jsonl").read_bytes()
    assert [r["line"] for r in outputs(a)["rejected"]] == [2]  # array items carry the line they start on
    assert outputs(a)["rejected"][0]["item"] == 1
    assert a.rules["parse.bom"]["rows"] == 1


def test_small_read_chunks_split_items_and_numbers(tmp_path):
    """Items and numbers cut at a read boundary are completed, not misread."""
    text = '[{"a": 1}, 12345, {"b": "x\\ny"},\n 6.5e3, "s", null]'
    rows = list(ArrayItems(io.StringIO(text), chunk_chars=3))
    assert [r.raw for r in rows] == json.loads(text)
    assert [r.line for r in rows] == [1, 1, 1, 2, 2, 2]


# --- length, template and policies, with the tiny Qwen2 tokenizer ------------------------------------


LIMIT = 128  # GOOD rows are 94 tokens under the tiny tokenizer and its default system prompt


@pytest.fixture(scope="module")
def counter(tiny_model) -> TokenCounter:
    return load_counter(str(tiny_model), limit=LIMIT)


def test_token_counts_match_the_chat_template(counter):
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "你是博主"},
            {"role": "user", "content": "\n\n写一篇笔记 "},
            {"role": "assistant", "content": " 好店 ✨ #探店\n"},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c  "},
            {"role": "assistant", "content": "\td"},
        ],
        [{"role": "user", "content": "长" * 300}, {"role": "assistant", "content": "答" * 10}],
        [{"role": "user", "content": "编号 12 3\t4  5\n6"}, {"role": "assistant", "content": "<|im_end|> 7"}],
        [{"role": "user", "content": "cafe\u0301 1\u0301 Ａ\u030a ①²"}, {"role": "assistant", "content": "e\u0301 "}],
    ]
    fast = TokenCounter(counter.tokenizer, limit=10_000, check_rows=0)  # no cross-checks: the fast path alone
    for c in conversations:
        fast.template_problem(tuple(m["role"] for m in c))
    assert fast.count(conversations) == fast.exact(conversations)
    assert fast.describe()["fast_rows"] == len(conversations) - 1  # the row holding an added token is rendered


def real_conversations() -> list[list[dict]]:
    """The committed sample data, alpaca-style arrays (the generated one, the external one when present) and
    benchmark-style rows."""
    sys.path.insert(0, str(REPO / "bench"))
    from validate_throughput import write_rows

    with tempfile.TemporaryDirectory(prefix="kftune-test-tokens-") as tmp:
        write_rows(Path(tmp) / "short.jsonl", 500)
        rows = read_jsonl(Path(tmp) / "short.jsonl") + read_jsonl(REPO / "data" / "store_xhs_sft_samples.jsonl")
        arrays = [write_alpaca_array(Path(tmp) / "alpaca.json").path, external_alpaca()]
        for array in filter(None, arrays):
            rows += json.loads(array.read_text(encoding="utf-8"))
    return [m for m in map(to_messages, rows) if all(t["content"].strip() for t in m)]


@pytest.mark.external_data
def test_fast_token_counts_equal_apply_chat_template_on_real_data(counter):
    conversations = real_conversations()
    fast = TokenCounter(counter.tokenizer, limit=10_000, check_rows=0)
    assert fast.count(conversations) == fast.exact(conversations)
    stats = fast.describe()
    assert stats["fast_rows"] == len(conversations) and stats["method"].startswith("chat template pieces")


# NFD accents, added tokens, and the private-use characters the counter and the gate's fast lane use inside
PIECES = list("ab Z'sS 12０9\n\t\r 。，!?你好咖啡①😀\u3000\u00a0\u0301\ue000\ue001\ue002") + ["<|im_end|>"]
TRICKY = st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join)


@pytest.fixture(scope="module")
def shared_counter(counter) -> TokenCounter:
    """One counter for every example, so its caches fill up across rows as in a real run."""
    return TokenCounter(counter.tokenizer, limit=10_000, check_rows=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(TRICKY, TRICKY), min_size=1, max_size=3), st.one_of(st.none(), TRICKY))
def test_fast_token_counts_equal_apply_chat_template_on_random_rows(shared_counter, turns, system):
    conversation = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert shared_counter.count([conversation]) == shared_counter.exact([conversation])


# --- the fast lane: the same answer as the row rules, for every row it takes -------------------------

LANE_TEXT = st.text(
    alphabet=st.sampled_from(list("ab XY 12345678，。！？你好咖啡 \u3000\t\nＡ①ﬁß\u0301@\ue000\ue002")), max_size=24
)


@st.composite
def lane_row(draw) -> dict:
    """Rows near the lane's edges: both forms, extra fields, odd types and roles, suspect text."""
    text = lambda: draw(st.one_of(LANE_TEXT, st.sampled_from(["好", "回答：很好", " ", ""])))
    form = draw(st.sampled_from(["alpaca", "alpaca", "messages", "messages", "odd"]))
    if form == "alpaca":
        row = {"instruction": text(), "input": draw(st.sampled_from([None, "", "补充"])), "output": text()}
        if draw(st.booleans()):
            row["system"] = draw(st.sampled_from([None, "", "你是助手", 3]))
        if draw(st.booleans()):
            row["history"] = draw(st.sampled_from([None, [], [["问", "答"]], ""]))
        return row
    roles = draw(
        st.sampled_from(
            [
                ["user", "assistant"],
                ["system", "user", "assistant"],
                ["user", "assistant", "user", "assistant"],
                ["user"],
                ["assistant", "user"],
                ["user", "bot"],
                ["user", "assistant", "system"],
            ]
        )
    )
    messages = [{"role": r, "content": text()} for r in roles]
    if form == "odd":
        messages[0] = draw(
            st.sampled_from(
                [
                    {"role": "user"},
                    {"role": "user", "content": 1},
                    {"role": "user", "content": "x", "name": "n"},
                    "user",
                ]
            )
        )
    return {"messages": messages}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lane_row(), min_size=1, max_size=12))
def test_the_fast_lane_agrees_with_the_row_rules(counter, objs):
    import copy

    from kftune.data.checker import Checker
    from kftune.data.row_rules import WORTH_A_LOOK
    from kftune.data.rules import Row

    checker = Checker(Options(tokenizer="tiny", max_seq_length=40), counter, external=None)
    lane = checker.fast(copy.deepcopy(objs))
    rows = checker.slow([Row(i + 1, None, copy.deepcopy(obj)) for i, obj in enumerate(objs)])
    for obj, clean, row in zip(objs, lane, rows):
        if type(clean) is tuple:  # taken by the lane: exactly what the rules give
            assert not row.problems and not row.notes, (obj, row.problems, row.notes)
            assert clean == (row.tokens, row.keys, row.text), obj
        elif clean is not None:  # counted, too long: the rules say so too
            assert row.tokens == clean > 40 and row.problems[0][0] == "length.too_long"
        elif (
            not row.problems
            and not row.notes
            and not (obj.get("history"))
            and not any(WORTH_A_LOOK.search(m["content"]) or "\ue000" in m["content"] for m in row.messages)
        ):
            pytest.fail(f"the lane left a clean row to the slow way: {obj}")
    assert counter.slow_reason is None  # the cross-checks never caught a fast count that was wrong


def test_a_template_that_edits_contents_is_rendered_row_by_row(counter):
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(counter.tokenizer.name_or_path)
    tokenizer.chat_template = counter.tokenizer.chat_template.replace(
        "message['content'] + '<|im_end|>' }}", "message['content'] | trim + '<|im_end|>' }}"
    )
    assert tokenizer.chat_template != counter.tokenizer.chat_template
    trimming = TokenCounter(tokenizer, limit=10_000, check_rows=0)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  padded answer  "}]
    assert trimming.describe()["method"].startswith("chat template per row")
    assert trimming.count([conversation]) == trimming.exact([conversation])


def long_answer(n: int = 400) -> dict:
    return {"instruction": "写一篇很长的笔记", "output": "这家店的咖啡非常好喝，环境也很安静。" * (n // 18)}


@pytest.mark.parametrize("policy", ["reject", "truncate", "keep"])
def test_too_long_rows_follow_the_length_policy(tmp_path, tiny_model, counter, policy):
    report, out = gate(
        tmp_path,
        [GOOD[0], GOOD[1], long_answer(), GOOD[2]],
        tokenizer=str(tiny_model),
        max_seq_length=LIMIT,
        length_policy=policy,
    )
    assert report.rules["length.too_long"] == {"action": policy, "rows": 1}
    if policy == "reject":
        assert found(out["rejected"], "length.too_long") == [BAD_LINE]
        return
    assert found(out["warnings"], "length.too_long") == [BAD_LINE] and report.accepted == 4
    kept = out["accepted"][2]["messages"]
    original = to_messages(long_answer())
    if policy == "keep":
        assert kept == original
    else:
        assert original[-1]["content"].startswith(kept[-1]["content"]) and kept[-1]["content"]
        assert counter.exact([kept])[0] <= LIMIT < counter.exact([original])[0]
    assert report.token_lengths["max"] == counter.exact([kept])[0]


def test_truncation_cannot_save_a_row_whose_prompt_is_too_long(tmp_path, tiny_model):
    row = {"instruction": "很长的问题" * 40, "output": "短答案"}
    _, out = gate(tmp_path, [GOOD[0], row], tokenizer=str(tiny_model), max_seq_length=LIMIT, length_policy="truncate")
    assert "the prompt alone does not fit" in out["rejected"][0]["message"]


def test_a_chat_template_that_refuses_a_row(tmp_path, tiny_model):
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}" + tokenizer.chat_template
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    row = chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello there"))
    _, out = gate(tmp_path, [GOOD[0], GOOD[1], row], tokenizer=str(tmp_path / "tok"))
    assert found(out["rejected"], "roles.template_error") == [BAD_LINE]
    assert "System role not supported" in out["rejected"][0]["message"]


@pytest.mark.parametrize("policy", ["flag", "reject", "redact"])
def test_personal_data_follows_the_pii_policy(tmp_path, policy):
    row = {"instruction": "联系方式", "output": "邮箱 li.si@example.cn，电话 13912345678，卡号 4111111111111111"}
    report, out = gate(tmp_path, [GOOD[0], row], pii_policy=policy)
    assert {r: report.rules[r]["rows"] for r in ("pii.email", "pii.phone", "pii.card_number")} == dict.fromkeys(
        ("pii.email", "pii.phone", "pii.card_number"), 1
    )
    if policy == "reject":
        assert report.rejected == 1 and "li.si@example.cn" not in out["rejected"][0]["message"]
        return
    answer = out["accepted"][1]["messages"][-1]["content"]
    expected = row["output"] if policy == "flag" else "邮箱 [EMAIL]，电话 [PHONE]，卡号 [CARD_NUMBER]"
    assert answer == expected
    assert all("13912345678" not in w["message"] for w in out["warnings"])  # reports mask the value


@pytest.mark.parametrize(
    "text",
    [
        "2023年12月31日 下午3点",
        "价格 12345678 元",
        "订单号 1234567890123",
        "ISBN 978-3-16-148410-0",
        "圆周率 3.14159265358979",
        "身份证号 110105194912310021",
        "版本 v1.2.3 (2024-01-15)",
    ],
)
def test_numbers_that_are_not_personal_data(text):
    assert find_pii(text) == []


# --- leakage and the split -----------------------------------------------------------------------------


def distinct_rows(n: int, tag: str = "") -> list[dict]:
    return [{"instruction": f"问题{tag}{i}：这家店怎么样？", "output": f"回答{i}：很好，推荐。"} for i in range(n)]


def test_split_is_deterministic_and_keeps_a_prompt_on_one_side(tmp_path):
    rows = distinct_rows(200)
    rows += [{"instruction": r["instruction"], "output": r["output"] + "（另一种说法）"} for r in rows[:60]]
    first, out = gate(tmp_path / "a", rows)
    second, _ = gate(tmp_path / "b", rows)
    assert (Path(first.out_dir) / "eval.jsonl").read_bytes() == (Path(second.out_dir) / "eval.jsonl").read_bytes()
    assert first.rules["duplicate.conflicting_answer"]["rows"] == 60
    assert first.train_rows + first.eval_rows == first.accepted == 260
    assert first.eval_rows >= 20  # 20 of 200 distinct prompts held out, with their second answers
    prompts = {side: {r["messages"][0]["content"] for r in out[side]} for side in ("train", "eval")}
    assert not prompts["train"] & prompts["eval"]


def test_an_eval_question_seen_in_train_moves_to_train(tmp_path):
    rows = distinct_rows(40)
    rows += [
        chat(("system", f"你是第{k}号助手"), ("user", "同一个问题：哪家店最好？"), ("assistant", f"答案{k}"))
        for k in range(12)
    ]
    report, out = gate(tmp_path, rows, eval_fraction=0.3)
    moved = found(out["warnings"], "leakage.eval_in_train")
    assert moved and set(moved) <= set(range(41, 53))
    assert report.rules["leakage.eval_in_train"]["rows"] == len(moved)
    questions = {side: {r["messages"][-2]["content"] for r in out[side]} for side in ("train", "eval")}
    assert not questions["train"] & questions["eval"]


def test_rows_that_share_a_question_with_the_external_eval_set_are_rejected(tmp_path):
    external = write(
        tmp_path / "bench.jsonl", [chat(("user", "问题3：这家店怎么样？"), ("assistant", "x")), b"not json"]
    )
    report, out = gate(tmp_path, distinct_rows(6), eval_data=str(external))
    assert found(out["rejected"], "leakage.external_eval") == [4]
    assert report.options["eval_data_unusable_rows"] == 1


# --- the gate, the report, the files -------------------------------------------------------------------


def test_report_counts_hash_and_html(tmp_path, tiny_model):
    rows = distinct_rows(30) + [RULE_FIXTURES["schema.missing_field"], RULE_FIXTURES["pii.email"]]
    report, out = gate(tmp_path, rows, tokenizer=str(tiny_model))
    saved = json.loads((Path(report.out_dir) / "report.json").read_text())
    assert saved["rows_in"] == 32 == saved["accepted"] + saved["rejected"]
    assert saved["dataset_sha256"] == hashlib.sha256((tmp_path / "data.jsonl").read_bytes()).hexdigest()
    assert saved["rules"]["schema.missing_field"] == {"action": "reject", "rows": 1}
    assert saved["rules"]["pii.email"] == {"action": "flag", "rows": 1}
    lengths = saved["token_lengths"]
    assert lengths["rows"] == 31 and lengths["min"] <= lengths["p50"] <= lengths["max"]
    assert sum(n for _, _, n in lengths["histogram"]) == 31
    page = (Path(report.out_dir) / "report.html").read_text()
    assert "<svg" in page and "schema.missing_field" in page and "PASSED" in page


def test_gate_fails_on_reject_share_and_min_rows(tmp_path):
    rows = distinct_rows(9) + [RULE_FIXTURES["roles.no_assistant"]]
    report, _ = gate(tmp_path / "a", rows, max_reject_fraction=0.05, min_rows=10)
    assert not report.passed
    assert report.failures == [
        "10.0% of rows rejected (1 of 10), above max_reject_fraction=0.05; see rejected.jsonl",
        "9 rows accepted, fewer than min_rows=10",
    ]
    assert gate(tmp_path / "b", rows, max_reject_fraction=0.1, min_rows=9)[0].passed


def test_options_report_every_problem_at_once():
    with pytest.raises(ConfigError) as caught:
        Options(max_seq_length=0, length_policy="cut", eval_fraction=1.5, min_rows=-1)
    assert len(caught.value.problems) == 4
    assert "--policy length=cut: expected one of reject, truncate, keep" in str(caught.value)


def test_output_is_replaced_whole_and_foreign_folders_are_refused(tmp_path):
    data = write(tmp_path / "data.jsonl", distinct_rows(12))
    validate(data, tmp_path / "out", Options())
    (tmp_path / "out" / "stale.txt").write_text("from an earlier run")
    validate(data, tmp_path / "out", Options())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [
            "accepted.jsonl",
            "rejected.jsonl",
            "warnings.jsonl",
            "train.jsonl",
            "eval.jsonl",
            "report.json",
            "report.html",
        ]
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KftuneError, match="is not an earlier validate-data output"):
        validate(data, tmp_path / "mine", Options())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_worker_processes_give_the_same_outputs(tmp_path, tiny_model, monkeypatch):
    """Rows checked in forked workers, a few lines per block, come back in order: same files, same report."""
    from kftune.data import parallel

    rows = (
        distinct_rows(60)
        + [
            GOOD[0],
            RULE_FIXTURES["duplicate.exact"],
            b"",
            RULE_FIXTURES["pii.email"],
            RULE_FIXTURES["schema.missing_field"],
            RULE_FIXTURES["duplicate.conflicting_answer"],
            long_answer(),
        ]
        + distinct_rows(30, tag="b")
        + distinct_rows(5)
    )
    data = write(tmp_path / "data.jsonl", rows)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 300)  # many blocks, several in flight
    reports = {
        w: validate(
            data, tmp_path / f"w{w}", Options(tokenizer=str(tiny_model), max_seq_length=LIMIT, workers=w, min_rows=1)
        )
        for w in (1, 2)
    }
    for name in ("accepted", "rejected", "train", "eval"):
        assert (tmp_path / "w1" / f"{name}.jsonl").read_bytes() == (tmp_path / "w2" / f"{name}.jsonl").read_bytes()
    warnings = [sorted((tmp_path / f"w{w}" / "warnings.jsonl").read_text().splitlines()) for w in (1, 2)]
    assert warnings[0] == warnings[1]
    one, two = (reports[w].to_dict() for w in (1, 2))
    for report in (one, two):
        report.pop("seconds"), report.pop("out_dir"), report["options"].pop("workers")
    for key in ("checked_rows", "chunk_lookups", "chunk_misses"):  # per worker, and per batch
        one["token_counting"].pop(key), two["token_counting"].pop(key)
    assert one == two and one["rejected"] == 8 and one["token_counting"]["fast_rows"] == one["rows_in"] - 1


# --- no valid row lost: a property over random mixes ---------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from("abcxyz 0123456789，。！？你好咖啡店笔记推荐很好安静"), max_size=40)
REJECTING = {
    rule: row for rule, row in RULE_FIXTURES.items() if rule not in WARNINGS and not rule.startswith("duplicate")
}


@st.composite
def good_row(draw, index: int) -> dict:
    prompt, answer = f"问题{index}：" + draw(TEXT), f"回答{index}：" + draw(TEXT)
    form = draw(st.sampled_from(["alpaca", "messages", "system"]))
    if form == "alpaca":
        return {"instruction": prompt, "input": draw(TEXT), "output": answer}
    turns = [("system", "你是助手" + draw(TEXT))] if form == "system" else []
    return chat(*turns, ("user", prompt), ("assistant", answer))


@st.composite
def mixes(draw) -> list[tuple[str, bytes | dict]]:
    """(kind, row) pairs: kind is "good", "blank" or the rule a bad row breaks."""
    mix = []
    for i, kind in enumerate(draw(st.lists(st.sampled_from(["good", "good", "bad", "blank"]), max_size=40))):
        if kind == "good":
            mix.append(("good", draw(good_row(i))))
        elif kind == "blank":
            mix.append(("blank", b""))
        else:
            rule = draw(st.sampled_from(sorted(REJECTING)))
            mix.append((rule, REJECTING[rule]))
    return mix


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixes())
def test_no_valid_row_is_lost_and_every_bad_row_is_caught(mix):
    with tempfile.TemporaryDirectory(prefix="kftune-test-validate-") as tmp:
        data = write(Path(tmp) / "data.jsonl", [row for _, row in mix])
        report = validate(data, Path(tmp) / "out", Options(min_rows=0))
        out = outputs(report)
    rows = [(line, kind, row) for line, (kind, row) in enumerate(mix, 1) if kind != "blank"]
    assert report.rows_in == len(rows) == report.accepted + report.rejected
    good = [row for _, kind, row in rows if kind == "good"]
    assert [a["messages"] for a in out["accepted"]] == [to_messages(g) for g in good]
    assert {r["line"]: r["rule"] for r in out["rejected"]} == {line: kind for line, kind, _ in rows if kind != "good"}
    assert report.train_rows + report.eval_rows == report.accepted


# --- real data, big files, the CLI and the benchmark ---------------------------------------------------


def test_real_alpaca_data_mostly_passes(tmp_path, tiny_model, alpaca_array):
    report = validate(alpaca_array, tmp_path / "out", Options(tokenizer=str(tiny_model), length_policy="keep"))
    rejected = {rule: v["rows"] for rule, v in report.rules.items() if v["rows"] and v["action"] == "reject"}
    print(
        f"\nalpaca_zh_demo: {report.rows_in} rows, {report.rejected} rejected {rejected}, "
        f"warnings { {r: v['rows'] for r, v in report.rules.items() if v['rows'] and v['action'] != 'reject'} }"
    )
    rows = json.loads(alpaca_array.read_text(encoding="utf-8"))
    exact_copies = len(rows) - len({json.dumps(r, sort_keys=True) for r in rows})
    assert report.passed and report.rejected / report.rows_in < 0.05
    assert rejected == {"duplicate.exact": exact_copies}  # the only rejections are true copies


def test_committed_sample_data_passes(tmp_path, tiny_model):
    report = validate(
        REPO / "data" / "store_xhs_sft_samples.jsonl", tmp_path / "out", Options(tokenizer=str(tiny_model))
    )
    assert report.passed and report.rejected == 0


MEMORY_PROBE = """
import json, sys
import psutil
from kftune.data.validate import Options, validate
data, rows = sys.argv[1], int(sys.argv[2])
with open(data, "w", encoding="utf-8") as f:
    for i in range(rows):
        f.write(json.dumps({"instruction": f"问题{i}：今天喝什么？", "output": f"回答{i}：一杯拿铁。"}, ensure_ascii=False) + "\\n")
with open(data + ".small", "w") as f:
    f.write(json.dumps({"instruction": "warm up", "output": "imports and caches"}) + "\\n")
validate(data + ".small", data + ".out-small", Options(min_rows=0))
base = psutil.Process().memory_info().rss
report = validate(data, data + ".out", Options(min_rows=0))
# VmHWM is this process's own peak; ru_maxrss would carry pytest's peak over through fork and exec.
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": peak, "accepted": report.accepted, "bytes": __import__("os").path.getsize(data)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_a_large_file_validates_in_bounded_memory(tmp_path):
    rows = 200_000
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big.jsonl"), str(rows)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout)
    growth = probe["peak"] - probe["base"]
    print(
        f"\n{rows} rows, {probe['bytes'] / 1e6:.0f} MB file: peak RSS growth {growth / 1e6:.1f} MB "
        f"({growth / rows:.0f} bytes/row)"
    )
    assert probe["accepted"] == rows
    # Holding the rows as Python objects would take over 1 KB each; the gate keeps ~250 B of hashes.
    assert growth < 400 * rows


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "kftune.cli", "validate-data", *args)


def test_cli_exit_codes(tmp_path):
    good = write(tmp_path / "good.jsonl", distinct_rows(12))
    proc = cli(str(good), "--out", str(tmp_path / "ok"))
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout and "train 11, eval 1" in proc.stdout

    bad = write(tmp_path / "bad.jsonl", distinct_rows(12) + [RULE_FIXTURES["parse.invalid_json"]] * 3)
    proc = cli(str(bad), "--out", str(tmp_path / "failed"))
    assert proc.returncode == 1
    assert "FAILED: 20.0% of rows rejected (3 of 15)" in proc.stdout
    assert json.loads((tmp_path / "failed" / "report.json").read_text())["passed"] is False

    for args, message in [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl: data file not found"),
        ([str(good), "--policy", "length=cut"], "--policy 'length=cut' is not a policy"),
        ([str(good), "--eval-fraction", "1"], "--eval-fraction must be in [0, 1), got 1.0"),
        (
            [str(good), "--base_model", str(tmp_path / "no-model")],
            "model folder not found; check --base_model/--tokenizer",
        ),
        ([str(good), "--base_model", "a", "--tokenizer", "b"], "not allowed with argument"),
    ]:
        proc = cli(*args, "--out", str(tmp_path / "usage"))
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr
        assert not (tmp_path / "usage").exists()


def test_throughput_benchmark_runs(tiny_model):
    proc = run_cli("bench/validate_throughput.py", "--quick", "--tokenizer", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert {
        "json.loads per line (baseline)",
        "gate, no tokenizer",
        "gate + tokenizer (workers)",
        "gate + tokenizer, one process",
    } <= set(lines)
    assert "target 50,000 rows/s with the tokenizer:" in proc.stdout
