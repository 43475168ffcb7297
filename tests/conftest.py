"""Shared fixtures: one tiny Qwen2 model and a small data set per test session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# LLaMA-Factory's alpaca_zh_demo.json sits beside the checkout on the project's build machines only, never in
# a user's clone. KFTUNE_TESTS_HIDE_EXTERNAL=1 runs the suite as a plain clone sees it (CI does, see .ci/run).
EXTERNAL_HIDDEN = os.environ.get("KFTUNE_TESTS_HIDE_EXTERNAL") == "1"
EXTERNAL_ALPACA = REPO.parent / "shared" / "external" / "alpaca_zh_demo.json"
EXTERNAL_MISSING = (
    "KFTUNE_TESTS_HIDE_EXTERNAL=1"
    if EXTERNAL_HIDDEN
    else f"{EXTERNAL_ALPACA} not present (it sits beside the checkout on the project's build machines only)"
)


def _refuse_files_beside_the_checkout(event: str, args: tuple) -> None:
    """With the external folder hidden, a test that opens a file of it fails instead of passing by luck."""
    if event == "open" and isinstance(args[0], str) and args[0].startswith(str(REPO.parent / "shared") + os.sep):
        raise FileNotFoundError(f"{args[0]}: a test read a file outside the repository (KFTUNE_TESTS_HIDE_EXTERNAL=1)")


if EXTERNAL_HIDDEN:
    sys.addaudithook(_refuse_files_beside_the_checkout)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the marks must be there when it reads them
def pytest_collection_modifyitems(config, items) -> None:
    """Every test that can read the external data is marked, so CI reruns them with the folder hidden; tests
    marked `cuda` run where torch sees a CUDA device (bench/gpu.sh runs them) and skip, saying so, elsewhere."""
    for item in items:
        if "alpaca_array" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.external_data)
    skip_without_cuda(items)


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


TOOL_ROWS = 40


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory) -> Path:
    """The tiny model with a tokenizer trained on tool rows too (English and JSON take fewer tokens)."""
    from kftune.dev.tiny_model import build_tiny_model
    from kftune.dev.tool_data import tool_rows, write_jsonl

    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "tools.jsonl", tool_rows(TOOL_ROWS))
    return build_tiny_model(tmp_path_factory.mktemp("tools") / "model", **TINY, data_path=corpus)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """24 alpaca rows: a few epochs of a short run show the loss falling."""
    from kftune.dev.sample_data import write_samples

    return write_samples(tmp_path_factory.mktemp("data") / "train.jsonl", rows=24, seed=1)


def external_alpaca() -> Path | None:
    """The real external file, or None where it is absent or hidden."""
    return None if EXTERNAL_HIDDEN or not EXTERNAL_ALPACA.is_file() else EXTERNAL_ALPACA


@pytest.fixture(scope="session")
def generated_alpaca(tmp_path_factory):
    """The tests' own stand-in for the external alpaca file (tests/alpaca_array.py): every clone has it."""
    from .alpaca_array import write_alpaca_array

    return write_alpaca_array(tmp_path_factory.mktemp("alpaca") / "alpaca_zh_like.json")


@pytest.fixture(params=["generated", "external"])
def alpaca_array(request, generated_alpaca) -> Path:
    """An alpaca file as LLaMA-Factory ships one: the generated stand-in always, the real one where present."""
    if request.param == "generated":
        return generated_alpaca.path
    if external_alpaca() is None:
        pytest.skip(EXTERNAL_MISSING)
    return EXTERNAL_ALPACA


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


def skip_without_cuda(items) -> None:
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu.sh runs the tests marked cuda on one)")
    for item in marked:
        item.add_marker(skip)
