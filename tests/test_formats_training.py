"""Every row format through training and evaluation on the tiny model: tool calls (loss on the calls and answers,
not on tool results or prompts; padded and padding-free), a text corpus on a base model without a chat template
(loss on every token, EOS-separated blocks, perplexity), prompt/completion rows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from transformers import TrainerCallback

from kftune.data.rules import Options
from kftune.data.validate import validate
from kftune.dev.tool_data import text_rows, tool_rows, write_jsonl
from kftune.evaluate.evaluation import Settings, evaluate
from kftune.registry import gate
from kftune.train.config import TrainConfig
from kftune.train.training import run


class FirstRows(TrainerCallback):
    """Keeps the prepared training rows (input ids and labels) the trainer starts with."""

    rows: list[dict] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.rows = [train_dataloader.dataset[i] for i in range(len(train_dataloader.dataset))]


def train(base: Path, data: Path, out: Path, **settings) -> tuple[dict, list[dict]]:
    watch = FirstRows()
    cfg = TrainConfig(
        base_model=str(base),
        data_path=str(data),
        output_dir=str(out),
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        learning_rate=2e-2,
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        logging_steps=1,
        precision="fp32",
        **settings,
    )
    return run(cfg, callbacks=[watch]).metrics, watch.rows


def labelled(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


@pytest.fixture(scope="module")
def tool_split(tool_model, tmp_path_factory) -> Path:
    rows = tool_rows(40, seed=7)
    data = write_jsonl(tmp_path_factory.mktemp("tools") / "glaive.jsonl", rows)
    out = tmp_path_factory.mktemp("split") / "validation"
    report = validate(data, out, Options(tokenizer=str(tool_model), max_seq_length=1024, eval_fraction=0.2))
    assert report.passed, report.failures
    return out


@pytest.mark.parametrize("padding_free", [True, False])
def test_tool_rows_train_on_calls_and_answers_not_on_results(tool_model, tool_split, tmp_path, padding_free):
    from kftune.models.loading import load_tokenizer

    metrics, rows = train(
        tool_model, tool_split / "train.jsonl", tmp_path / "adapter", max_seq_length=1024, padding_free=padding_free
    )
    assert metrics["last_loss"] < metrics["first_loss"]
    tokenizer = load_tokenizer(str(tool_model))
    sample = json.loads((tool_split / "train.jsonl").read_text().splitlines()[0])
    learnt = labelled(tokenizer, rows[0])
    call = sample["messages"][1]["tool_calls"][0]["function"]
    # the call turn and the final answer, each with its <|im_end|>; nothing of the tool result, prompt or schemas
    assert f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {json.dumps(call["arguments"])}}}' in learnt
    assert learnt.endswith(sample["messages"][3]["content"] + "<|im_end|>")
    assert learnt.count("<|im_end|>") == 2
    for unseen in (sample["messages"][2]["content"], "<tool_response>", sample["messages"][0]["content"], "<tools>"):
        assert unseen not in learnt


def test_tool_rows_evaluate_with_tool_call_metrics(tool_model, tool_split, tmp_path):
    train(tool_model, tool_split / "train.jsonl", tmp_path / "adapter", max_seq_length=1024)
    settings = Settings(samples=3, max_new_tokens=24, precision="fp32")
    metrics = evaluate(str(tmp_path / "adapter"), str(tool_split / "eval.jsonl"), tmp_path / "eval", settings=settings)
    for side in ("base", "tuned"):
        assert metrics[side]["tool_call_rows"] == 3
        for name in ("tool_call_parse_rate", "tool_call_declared_rate", "tool_call_name_match", "tool_call_args_match"):
            assert 0 <= metrics[side][name] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tuned"]["tool_call_rows"] == 3
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    calls = [s for s in samples if s.get("kind") == "tool_call"]
    assert len(calls) == 3 and all(s["prompt"][-1]["role"] == "user" for s in calls)
    assert json.loads(calls[0]["reference"])["name"]
    assert "tool call name match" in (tmp_path / "eval" / "report.html").read_text()
    decision = gate.decide(metrics["tuned"], metrics["base"], None, metric="tool_call_name_match")
    assert decision.metric == "tool_call_name_match" and decision.candidate == metrics["tuned"]["tool_call_name_match"]


def test_text_corpus_trains_without_a_chat_template_and_evaluates_perplexity(tiny_model, tmp_path):
    from kftune.models.loading import load_tokenizer

    bare = shutil.copytree(tiny_model, tmp_path / "base")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    docs = text_rows(24)
    data = write_jsonl(tmp_path / "corpus.jsonl", docs[:20])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", docs[20:])
    metrics, rows = train(bare, data, tmp_path / "adapter", max_seq_length=64)
    assert metrics["data_kind"] == "text" and metrics["last_loss"] < metrics["first_loss"]
    tokenizer = load_tokenizer(str(bare))
    assert not tokenizer.chat_template
    assert all(r["labels"] == r["input_ids"] for r in rows)  # loss on every token
    stream = [t for r in rows for t in r["input_ids"]]
    assert sorted(len(r["input_ids"]) for r in rows)[1:] == [64] * (len(rows) - 1)  # full blocks, one shorter
    assert stream.count(tokenizer.eos_token_id) == 20  # one EOS after each document
    expected = sum(len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) + 1 for d in docs[:20])
    assert len(stream) == expected

    result = evaluate(
        str(tmp_path / "adapter"), str(held_out), tmp_path / "eval", settings=Settings(samples=4, precision="fp32")
    )
    assert result["eval_kind"] == "text" and "rougeL" not in result["tuned"]
    assert math.isfinite(result["tuned"]["perplexity"]) and result["tuned"]["perplexity"] < result["base"]["perplexity"]
    assert (tmp_path / "eval" / "samples.jsonl").read_text() == ""
    assert "perplexity" in (tmp_path / "eval" / "report.html").read_text()


def test_prompt_completion_rows_train_on_the_completion(tiny_model, tmp_path):
    from kftune.models.loading import load_tokenizer

    rows = [{"prompt": f"为第{i}家店写一句话", "completion": f"第{i}家店的咖啡很香。"} for i in range(8)]
    metrics, prepared = train(tiny_model, write_jsonl(tmp_path / "pc.jsonl", rows), tmp_path / "adapter")
    assert math.isfinite(metrics["train_loss"]) and metrics["data_kind"] == "chat"
    tokenizer = load_tokenizer(str(tiny_model))
    assert {labelled(tokenizer, r) for r in prepared} == {f"{r['completion']}<|im_end|>" for r in rows}


def test_training_refuses_a_template_that_cannot_render_tools_before_loading_the_model(
    tool_model, tool_split, tmp_path
):
    from kftune.core.errors import KftuneError

    plain = shutil.copytree(tool_model, tmp_path / "plain")
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(KftuneError, match="the chat template ignores `tools`"):
        train(plain, tool_split / "train.jsonl", tmp_path / "out", max_seq_length=1024)
    assert not (tmp_path / "out").exists()
