"""Shared fixtures: one tiny Qwen2 model and a small data set per test session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTERNAL_ALPACA = REPO.parent / "shared" / "external" / "alpaca_zh_demo.json"

# Small enough to train in seconds on 2 cores, big enough for 4-bit blocks and 4 attention heads.
TINY = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1024,
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from kftune.dev.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **TINY)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """24 alpaca rows: a few epochs of a short run show the loss falling."""
    from kftune.dev.sample_data import write_samples

    return write_samples(tmp_path_factory.mktemp("data") / "train.jsonl", rows=24, seed=1)


def run_cli(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run a command of the project (e.g. 'fine_tune_qwen.py', ...) with this interpreter, from the repo root."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True, env=full_env, timeout=timeout
    )


def assert_generates(model, tokenizer, new_tokens: int = 5) -> None:
    """The model answers a chat prompt with exactly `new_tokens` greedy tokens."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "写一篇探店笔记"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch sees a CUDA device (bench/gpu.sh runs them) and skip, saying so, elsewhere."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu.sh runs the tests marked cuda on one)")
    for item in marked:
        item.add_marker(skip)
