"""The pipeline steps' plain-Python parts that need no S3 or MLflow: the settings, the metadata round trip."""

import dataclasses

import pytest

from kftune import steps
from kftune.core.errors import ConfigError, KftuneError
from kftune.evaluate.evaluation import assistant_loss, encode


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize(("method", "lora_r", "bits"), [("full", None, None), ("lora", 8, None), ("qlora", 8, 8)])
def test_settings_a_method_does_not_use_are_dropped(method, lora_r, bits):
    cfg = steps.check_train_settings(method, {"lora_r": 8, "lora_alpha": 16, "quantization_bit": 8, "max_steps": 3})
    assert cfg.method == method
    assert (cfg.lora_r if cfg.uses_adapter else None) == lora_r
    assert (cfg.quantization_bit if cfg.use_qlora else None) == bits


def test_bad_settings_are_all_reported_naming_the_parameter():
    with pytest.raises(ConfigError) as caught:
        steps.check_train_settings("lora", {"lora_r": 0, "learning_rate": 3.0})
    assert any("lora_r" in p for p in caught.value.problems) and any(
        "learning_rate" in p for p in caught.value.problems
    )
    with pytest.raises(KftuneError, match="method must be one of full, lora, qlora"):
        steps.check_train_settings("dora", {})


def test_results_survive_the_metadata_round_trip(tmp_path):
    split = steps.DataSplit("s3://b/d/1", "1" * 64, "s3://b/d/1/train.jsonl", "s3://b/d/1/eval.jsonl", 9, 1, "2" * 64)
    metadata = steps.write_pointer(str(tmp_path / "out" / "data"), split)
    assert steps.from_metadata(steps.DataSplit, {**metadata, "display_name": "added by a backend"}) == split
    assert (tmp_path / "out" / "data").read_text().strip().startswith("{")
    assert dataclasses.asdict(split) == metadata


def test_the_loss_counts_only_assistant_tokens(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    short, long_prompt = _conversation("店", "好吃"), _conversation("店" * 40, "好吃")
    ((ids, mask),) = encode(tokenizer, [short], 256)
    answer = tokenizer("好吃<|im_end|>")["input_ids"]
    assert sum(mask) == len(answer) and [i for i, m in zip(ids, mask) if m] == answer
    # a longer prompt adds no scored tokens
    assert assistant_loss(model, tokenizer, [long_prompt]).tokens == assistant_loss(model, tokenizer, [short]).tokens
    result = assistant_loss(model, tokenizer, [short, long_prompt], batch_size=1)
    batched = assistant_loss(model, tokenizer, [short, long_prompt], batch_size=2)  # padding changes nothing
    assert result.rows == 2 and abs(result.loss - batched.loss) < 1e-4
