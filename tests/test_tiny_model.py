"""The tiny Qwen2: loads through the Auto classes as Qwen2, tokenizes exactly as trained, and masks assistant turns."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from kftune import cli
from kftune.dev.sample_data import generate_samples, messages_row
from kftune.dev.tiny_model import DEFAULT_VOCAB_SIZE, build_tiny_model, corpus_texts, train_tokenizer

OTHER_TEXT = [
    "Hello, world!  Mixed 中英文 text with    spaces\n\n\tand tabs.",
    'def f(x: int) -> str:\n    return f"{x!r:>8}"  # 注释\r\n',
    "naïve café, ｶﾀｶﾅ, 한국어, Ελληνικά, русский, عربى, 🤖🧋👩‍💻, 1234567890",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "cafe\u0301 decomposed: NFC turns it into café before BPE",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def trained():
    """The raw `tokenizers` BPE, trained the way build_tiny_model trains it."""
    return train_tokenizer(corpus_texts(), DEFAULT_VOCAB_SIZE)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _assert_same_ids(tokenizer, trained, texts: list[str]) -> None:
    for text in texts:
        assert tokenizer(text)["input_ids"] == trained.encode(text).ids, text[:80]
        # Qwen2Tokenizer NFC-normalises first, so decoding gives back the NFC form of the text.
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == unicodedata.normalize("NFC", text)


def test_auto_tokenizer_is_qwen2_with_qwen_special_tokens(tokenizer):
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.tokenize("<|im_start|>x<|im_end|>")[0] == "<|im_start|>"


def test_ids_match_the_trained_bpe_on_sample_data(tokenizer, trained):
    rows = generate_samples(50, seed=7)
    _assert_same_ids(tokenizer, trained, [r["input"] + "\n" + r["output"] for r in rows])


def test_ids_match_on_english_code_and_other_scripts(tokenizer, trained):
    _assert_same_ids(tokenizer, trained, OTHER_TEXT)
    assert tokenizer.unk_token_id is None
    # Every byte has a token, so any UTF-8 text encodes without an unknown token.
    assert set(ByteLevel.alphabet()) <= set(tokenizer.get_vocab())


def test_ids_match_on_real_chinese_alpaca_rows(tokenizer, trained, alpaca_array):
    rows = json.loads(alpaca_array.read_text(encoding="utf-8"))
    _assert_same_ids(tokenizer, trained, [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows])


def test_assistant_mask_covers_content_and_im_end(tokenizer):
    messages = messages_row(generate_samples(1)[0])["messages"]
    messages += [{"role": "user", "content": "再短一点"}, {"role": "assistant", "content": "好的✨"}]
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True, tokenize=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert masked == messages[2]["content"] + "<|im_end|>" + "好的✨<|im_end|>"
    assert ids[mask.index(1) - 1] == tokenizer.encode("\n")[0]  # `<|im_start|>assistant\n` stays unmasked
    assert sum(ids[i] == tokenizer.eos_token_id for i, m in enumerate(mask) if m) == 2


def test_chat_template_is_chatml_with_a_default_system(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_is_qwen2_with_tied_embeddings(model, tokenizer):
    config = model.config
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear - {"lm_head"} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_forward_and_generate(model, tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "为这家店写一篇小红书探店笔记。"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape == (1, prompt["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_same_seed_gives_the_same_weights(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temp folders left


def test_data_flag_trains_the_tokenizer_on_that_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_samples(20, "messages")))
    out = build_tiny_model(tmp_path / "m", data_path=data, vocab_size=600, hidden_size=16, num_heads=2, num_kv_heads=1)
    assert len(AutoTokenizer.from_pretrained(out)) == 600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "3", "--kv-heads", "2"], "must be divisible by --heads 3"),
        (["--heads", "4", "--kv-heads", "3"], "--heads 4 must be divisible by --kv-heads 3"),
        (["--vocab-size", "100", "--layers", "0"], "2 problem(s)"),
        (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    ],
)
def test_bad_flags_are_reported_without_a_folder(tmp_path, capsys, args, message):
    target = tmp_path / "m"
    assert cli.main(["tiny-model", str(target), *args]) == 2
    assert message in capsys.readouterr().err
    assert not target.exists()


def test_non_empty_folder_needs_force(tmp_path, capsys):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert cli.main(["tiny-model", str(target)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "mine"
    assert cli.main(["tiny-model", str(target), "--force", "--hidden-size", "16", "--heads", "2"]) == 0
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
