"""A small random Qwen2 model plus a byte-level BPE tokenizer, built offline in seconds.

No hub is reachable, so demos and tests need a base model the project can make itself. It has
Qwen2's architecture (the same q/k/v/o and gate/up/down projections LoRA targets), Qwen2.5's
special tokens and ChatML template, and a tokenizer trained on the sample data so a tiny model
can learn the post format on a CPU in minutes.

transformers 5.24 loads model_type qwen2 with `Qwen2Tokenizer`, which keeps only the vocab and
merges of tokenizer.json and rebuilds the normaliser and pre-tokenizer itself; the BPE is trained
with that same pipeline (see `_qwen2_pipeline`) so the ids it learned are the ids users get.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kftune.core.atomic import building
from kftune.core.errors import ConfigError, KftuneError
from kftune.data.formats import to_json, turn_text
from kftune.data.row_rules import sample_problem
from kftune.dev.sample_data import SYSTEM_PROMPT, generate_samples, messages_row

if TYPE_CHECKING:  # imported lazily below, so `--help` and flag errors stay instant
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_POSITIONS = 4096
DEFAULT_VOCAB_SIZE = 4096

# ChatML as in Qwen2.5, tools included: with `tools` the system turn lists their schemas in <tools> tags, an
# assistant's calls are <tool_call> blocks of {"name", "arguments"} JSON, and tool results go back in a user
# turn as <tool_response> blocks. The generation markers wrap each assistant turn's content, calls and
# <|im_end|>, so assistant-only loss (trl) also trains the model to call and to stop.
TOOLS_PREAMBLE = (
    "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
TOOLS_EPILOGUE = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call>"
)
# what the template writes around tools, as text (for the tokenizer of a model trained on tool calls)
TOOL_SCAFFOLD = [
    (TOOLS_PREAMBLE + TOOLS_EPILOGUE).replace("\\n", "\n"),
    '<tool_call>\n{"name": "',
    '", "arguments": ',
    "}\n</tool_call>",
    "\n<tool_response>\n",
    "\n</tool_response>",
]
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + DEFAULT_SYSTEM + "' }}{%- endif %}"
    "{{- '" + TOOLS_PREAMBLE + "' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '" + TOOLS_EPILOGUE + "<|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.tool_calls %}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen2_pipeline(tokenizer: Tokenizer) -> None:
    """Give a `tokenizers.Tokenizer` the normaliser, pre-tokenizer and decoder `Qwen2Tokenizer` rebuilds on load."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _row_texts(row: Any, where: str) -> list[str]:
    """The texts of one row (any format), checked by the data layer's rules (as training reads it).

    An alpaca row gives its instruction, input and output apart, not the joined prompt: the demo model's
    tokenizer has always learnt them so, and other merges would change what `make run` prints."""
    problem, sample = sample_problem(row)
    if problem:
        raise KftuneError(f"{where}: {problem}")
    if "text" in sample:
        return [sample["text"]]
    if "instruction" not in row:  # the tools' schemas and the calls too: a tool-calling model reads and writes them
        texts = [turn_text(m) for m in sample["messages"]] + [to_json(t) for t in sample.get("tools") or []]
        return texts + (TOOL_SCAFFOLD if sample.get("tools") else [])
    return [row.get(key) or "" for key in ("instruction", "input", "output")]


def corpus_texts(data_path: str | os.PathLike | None = None) -> list[str]:
    """Tokenizer training text: the data set (default: the 600 sample rows) plus the chat scaffolding."""
    if data_path is None:
        texts = [t for row in generate_samples(600) for t in _row_texts(messages_row(row), "sample")]
    else:
        texts = list(_read_texts(Path(data_path)))
    return texts + [SYSTEM_PROMPT, DEFAULT_SYSTEM, "system\n", "user\n", "assistant\n"]


def _read_texts(path: Path) -> Iterator[str]:
    """Texts from a JSONL file (any format), naming the line of any bad row."""
    if not path.is_file():
        raise KftuneError(f"--data {path}: no such file; give a JSONL file in alpaca or messages form")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KftuneError(
                    f"--data {path}:{number}: not valid JSON ({exc.msg}); expected JSONL, one object per line"
                ) from None
            yield from _row_texts(row, f"--data {path}:{number}")


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the 256 byte symbols are always in the vocab, so nothing is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    _qwen2_pipeline(tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def to_qwen2_tokenizer(raw: Tokenizer) -> Qwen2Tokenizer:
    """Wrap the trained BPE in `Qwen2Tokenizer` with Qwen2.5's special tokens and the ChatML template."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    model = json.loads(raw.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _check_sizes(
    hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int
) -> None:
    """Report every impossible size at once, naming the flag."""
    problems = [
        f"--{flag} must be at least {low}, got {value}"
        for flag, value, low in (
            ("hidden-size", hidden_size, 8),
            ("layers", num_layers, 1),
            ("heads", num_heads, 1),
            ("kv-heads", num_kv_heads, 1),
            ("intermediate-size", intermediate_size, 1),
            ("vocab-size", vocab_size, 512),
        )
        if value < low
    ]
    if num_heads >= 1 and hidden_size % num_heads:
        problems.append(f"--hidden-size {hidden_size} must be divisible by --heads {num_heads}")
    elif num_heads >= 1 and (hidden_size // num_heads) % 2:
        problems.append(f"head size --hidden-size / --heads = {hidden_size // num_heads} must be even (RoPE)")
    if num_kv_heads >= 1 and num_heads % num_kv_heads:
        problems.append(f"--heads {num_heads} must be divisible by --kv-heads {num_kv_heads}")
    if problems:
        raise ConfigError(problems, source="tiny-model flags")


def _prepare_target(out_dir: Path, force: bool) -> None:
    """Refuse to replace a non-empty folder unless asked to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KftuneError(f"{out_dir} is a file; give a folder path for the model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise KftuneError(f"{out_dir} exists and is not empty; pass --force to replace it or pick another folder")


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    data_path: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    embedding_rows: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Build and save the model and tokenizer in `out_dir`, which ends up complete or absent.

    `embedding_rows` (default: the tokenizer's size) pads the embedding as Qwen2.5 pads its 151,665
    tokens to 151,936, so a real model's shape can be built around the small tokenizer (benchmarks);
    `dtype` is the dtype the weights are saved in (Qwen2.5 ships bfloat16).
    """
    _check_sizes(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size)
    out_dir = Path(out_dir)
    _prepare_target(out_dir, force)

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = to_qwen2_tokenizer(train_tokenizer(corpus_texts(data_path), vocab_size))
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    if embedding_rows is not None and embedding_rows < len(tokenizer):
        raise KftuneError(f"embedding_rows {embedding_rows} is less than the tokenizer's {len(tokenizer)} tokens")
    config = Qwen2Config(
        vocab_size=embedding_rows or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        # Qwen's 0.02 suits hidden sizes near 1000; at 64-128 it caps frozen-embedding logits near
        # +-1, so LoRA on a random tiny model could barely learn. 1/sqrt(hidden) keeps logits O(1-10).
        initializer_range=hidden_size**-0.5,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(getattr(torch, dtype))  # save_pretrained records the dtype in config.json
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)

    with building(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


def main(argv: list[str]) -> int:
    defaults = {name: p.default for name, p in inspect.signature(build_tiny_model).parameters.items()}
    parser = argparse.ArgumentParser(
        prog="kftune tiny-model",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="DIR", help="folder to write the model and tokenizer to")
    for flag, dest, help_ in (
        ("--hidden-size", "hidden_size", "model width"),
        ("--layers", "num_layers", "decoder layers"),
        ("--heads", "num_heads", "attention heads"),
        ("--kv-heads", "num_kv_heads", "key/value heads (grouped-query attention)"),
        ("--intermediate-size", "intermediate_size", "MLP width"),
        ("--vocab-size", "vocab_size", "BPE vocab size to train; less if the data runs out of merges"),
        ("--seed", "seed", "weight-init seed"),
    ):
        parser.add_argument(flag, dest=dest, metavar="N", type=int, default=defaults[dest], help=help_)
    parser.add_argument(
        "--data",
        dest="data_path",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="JSONL (alpaca or messages) to train the tokenizer on; default: the 600 sample rows",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    out = build_tiny_model(**vars(parser.parse_args(argv)))
    print(f"wrote a tiny Qwen2 model and tokenizer to {out}")
    return 0
