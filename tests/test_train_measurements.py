"""The measurements a sweep compares methods by: tokens trained per second and the run's own peak memory."""

import pytest

from kftune.data.reading import load_conversations
from kftune.evaluate.evaluation import encode
from kftune.models.loading import load_tokenizer
from kftune.train.config import resolve
from kftune.train.measure import peak_memory
from kftune.train.training import run

pytestmark = pytest.mark.slow  # trains a few seconds
MAX_LENGTH = 256  # above every row's length: trl drops rows truncation leaves without assistant tokens
BALLAST = 2**30


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def one_epoch(tiny_model, small_data, tmp_path_factory) -> dict:
    """A LoRA run over exactly one epoch (24 rows, 4 a step), after this process briefly held 1 GiB more."""
    import peft  # noqa: F401  (imported first, so the run itself adds little)

    before = _rss()
    ballast = b"\x01" * BALLAST  # written, so resident: it raises the process's RSS high-water mark
    del ballast
    assert peak_memory("cpu").bytes > before + 0.9 * BALLAST  # the premise: the process's peak includes it
    cfg = resolve(
        {
            "base_model": str(tiny_model),
            "data_path": str(small_data),
            "use_lora": True,
            "lora_r": 4,
            "output_dir": str(tmp_path_factory.mktemp("measured") / "out"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_seq_length": MAX_LENGTH,
        },
        {},
    )
    return {**run(cfg).metrics, "rss_before": before}


def test_tokens_per_second_counts_every_real_token_trained_on(one_epoch, tiny_model, small_data):
    """One epoch trains on every row once: the count is the rows' token lengths, padding excluded."""
    tokenizer = load_tokenizer(str(tiny_model))
    expected = sum(len(ids) for ids, _ in encode(tokenizer, load_conversations(small_data), MAX_LENGTH))
    assert one_epoch["train_tokens"] == expected
    assert one_epoch["tokens_per_second"] == pytest.approx(expected / one_epoch["train_seconds"], rel=1e-2)


def test_peak_memory_is_the_runs_own_not_the_process_peak_before_it(one_epoch):
    assert one_epoch["peak_memory_source"] == "rss_high_water_mark"
    assert one_epoch["peak_memory_bytes"] > 0.9 * one_epoch["rss_before"]  # the process as it was, plus the model
    # not the ballast released before training: the mark was reset when the run began
    assert one_epoch["peak_memory_bytes"] < one_epoch["rss_before"] + BALLAST / 2, (
        one_epoch["peak_memory_bytes"],
        one_epoch["rss_before"],
    )
