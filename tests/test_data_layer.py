"""One data layer: every row the gate accepts loads in training (and evaluation) to the same messages.

The gate (kftune.data.validate) and training's reader (kftune.data.reading) share the row formats and
`to_messages` (kftune.data.formats) and the schema and role rules (kftune.data.row_rules); this checks
the promise on random rows of both forms, good and bad, rather than on a few hand-picked ones.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kftune.data.formats import to_messages
from kftune.data.reading import load_conversations
from kftune.data.rules import Options
from kftune.data.validate import validate

# short texts, often blank or whitespace, with the separators and line breaks that trip line-based readers
TEXT = st.one_of(
    st.sampled_from(["", " ", "hi", "写一篇笔记", "a\nb", "x\u2028y", "\r", "#tag", "\t"]), st.text(max_size=12)
)
MAYBE = st.one_of(st.none(), TEXT, st.integers(0, 3))  # optional fields: absent-like, a string, or a wrong type


@st.composite
def alpaca(draw) -> dict:
    row = {"instruction": draw(st.one_of(TEXT, st.integers(0, 3))), "output": draw(TEXT)}
    for key in ("input", "system"):
        if draw(st.booleans()):
            row[key] = draw(MAYBE)
    if draw(st.integers(0, 4)) == 0:
        row["history"] = draw(st.lists(st.lists(TEXT, min_size=2, max_size=2), max_size=2))
    if draw(st.integers(0, 6)) == 0:
        row["note"] = "an unknown field"
    return row


@st.composite
def messages(draw) -> dict:
    roles = draw(st.lists(st.sampled_from(["system", "user", "assistant", "bot"]), min_size=0, max_size=5))
    if draw(st.booleans()):  # most real rows alternate: make those common
        roles = (["system"] if draw(st.booleans()) else []) + ["user", "assistant"] * draw(st.integers(1, 2))
    turns = [{"role": role, "content": draw(TEXT)} for role in roles]
    if turns and draw(st.integers(0, 6)) == 0:
        turns[0]["weight"] = 1  # an unknown field inside a message
    return {"messages": turns}


def test_to_messages_reads_both_forms_alike():
    alpaca_row = {"instruction": "写一篇笔记", "input": "店名：A", "output": "好店", "system": "你是博主"}
    assert (
        to_messages(alpaca_row)
        == to_messages({"messages": to_messages(alpaca_row)})
        == [
            {"role": "system", "content": "你是博主"},
            {"role": "user", "content": "写一篇笔记\n店名：A"},
            {"role": "assistant", "content": "好店"},
        ]
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(alpaca(), messages()), min_size=1, max_size=12))
def test_every_row_the_gate_accepts_loads_to_the_same_messages(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("gate")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    validate(data, folder / "out", Options(min_rows=0, eval_fraction=0, max_reject_fraction=1))
    rejected = {
        json.loads(line)["line"] for line in (folder / "out" / "rejected.jsonl").read_text("utf-8").split("\n") if line
    }
    kept = [row for number, row in enumerate(rows, start=1) if number not in rejected]
    accepted = folder / "out" / "accepted.jsonl"
    gate_says = [json.loads(line)["messages"] for line in accepted.read_text("utf-8").split("\n") if line]
    assert len(gate_says) == len(kept)
    if not kept:
        return
    raw = folder / "kept.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    assert load_conversations(raw) == gate_says  # the rows as the user wrote them
    assert load_conversations(accepted) == gate_says  # the gate's own output, as training reads it
