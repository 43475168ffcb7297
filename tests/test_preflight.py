"""The memory pre-flight: its arithmetic, its refusal, and its estimate against measured peaks."""

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kftune.core.errors import KftuneError
from kftune.models.loading import Runtime
from kftune.train.config import resolve
from kftune.train.preflight import GiB, ModelShape, check, device_memory, estimate

REPO = Path(__file__).resolve().parents[1]
QWEN = ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)
CPU = Runtime("cpu", "fp32")


def test_qwen2_5_0_5b_counts():
    assert QWEN.params == 494_032_768  # Qwen2.5-0.5B's parameter count
    assert QWEN.lora_params(64, None) == 35_192_832  # r=64 on all seven projections: 6.65%, not the guide's ~3%


def test_methods_rank_as_expected_and_checkpointing_saves_activations():
    def total(method, **kw):
        return estimate(QWEN, method=method, batch=4, seq=512, precision="bf16", device="cuda", **kw).total

    assert total("full") > total("lora") > total("qlora", bits=8) > total("qlora", bits=4)
    plain = estimate(QWEN, method="lora", batch=4, seq=512, precision="bf16")
    saved = estimate(QWEN, method="lora", batch=4, seq=512, precision="bf16", checkpointing=True)
    assert (
        saved.parts["activations"] < plain.parts["activations"] / 2 and saved.parts["weights"] == plain.parts["weights"]
    )
    assert estimate(QWEN, method="lora", batch=4, seq=512).parts["runtime"] > 0  # a CPU process counts itself
    assert estimate(QWEN, method="lora", batch=4, seq=512, device="cuda").parts["runtime"] == 0


@pytest.fixture(scope="module")
def deep_config(tmp_path_factory) -> Path:
    """Only a config.json: the pre-flight reads sizes, never weights. Deep, so checkpointing matters a lot."""
    from transformers import Qwen2Config

    folder = tmp_path_factory.mktemp("deep")
    Qwen2Config(
        hidden_size=64,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
    ).save_pretrained(folder)
    return folder


def lora_config(folder: Path, **values):
    return resolve({"base_model": str(folder), "use_lora": True, "lora_r": 8, **values}, {})


def shape_of(folder: Path) -> ModelShape:
    from kftune.train.preflight import model_shape

    return model_shape(str(folder))


def test_refuses_what_cannot_fit_naming_settings_that_would(deep_config, caplog):
    room, _ = device_memory("cpu")
    seq = 4096
    batch = 1
    while (
        estimate(shape_of(deep_config), method="lora", batch=batch, seq=seq, lora_r=8, checkpointing=True).total
        < 3 * room
    ):
        batch *= 2
    cfg = lora_config(deep_config, per_device_train_batch_size=batch, max_seq_length=seq)
    with caplog.at_level(logging.INFO, logger="kftune"), pytest.raises(KftuneError) as error:
        check(cfg, str(deep_config), CPU)
    message = str(error.value)
    assert "memory pre-flight" in message and "GiB" in message and "--force true" in message
    assert "settings that would fit: --per_device_train_batch_size" in message
    assert "estimated peak" in caplog.text  # printed before refusing
    assert check(replace(cfg, force=True), str(deep_config), CPU) == replace(cfg, force=True)


def test_turns_on_checkpointing_only_when_that_alone_fits(deep_config):
    room, _ = device_memory("cpu")
    shape = shape_of(deep_config)
    batch = 1
    while estimate(shape, method="lora", batch=batch, seq=2048, lora_r=8).total < 1.2 * room:
        batch = int(batch * 1.25) + 1
    assert estimate(shape, method="lora", batch=batch, seq=2048, lora_r=8, checkpointing=True).total < 0.7 * room
    cfg = lora_config(deep_config, per_device_train_batch_size=batch, max_seq_length=2048)
    assert check(cfg, str(deep_config), CPU).gradient_checkpointing is True
    small = lora_config(deep_config, per_device_train_batch_size=1, max_seq_length=64)
    assert check(small, str(deep_config), CPU) == small  # fits: nothing changes


# (method, bits, checkpointing): each trained for two steps in its own process, peak RSS measured
MEASURED = [("full", 4, False), ("lora", 4, False), ("qlora", 4, False), ("lora", 4, True)]


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_measured_peak_rss(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from measure import Spec, build_model, measure, write_rows

    shape = {
        "hidden_size": 384,
        "num_layers": 4,
        "num_heads": 6,
        "num_kv_heads": 2,
        "intermediate_size": 1024,
        "embedding_rows": 32_000,
    }
    model = build_model(tmp_path / "model", shape)  # saved in bf16, as Qwen2.5 ships
    data = write_rows(tmp_path / "rows.jsonl", rows=8, seq=128, model=model)
    specs = [
        Spec(
            label=f"{method}{bits if method == 'qlora' else ''}{'+ckpt' if ckpt else ''}",
            model=str(model),
            data=str(data),
            method=method,
            bits=bits,
            batch=2,
            seq=128,
            lora_r=16,
            checkpointing=ckpt,
            precision="fp32",
        )
        for method, bits, ckpt in MEASURED
    ]
    rows = measure(specs, timeout_s=600, progress=lambda line: None)
    report = [
        (r["label"], round(r.get("peak_bytes", 0) / GiB, 3), round(r.get("estimate_bytes", 0) / GiB, 3)) for r in rows
    ]
    print("\n(label, measured peak GiB, estimate GiB):", report)
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert len({r["peak_bytes"] for r in rows}) > 1, report  # the shapes differ in memory, not just in name
    for r in rows:
        assert abs(r["estimate_bytes"] / r["peak_bytes"] - 1) <= 0.25, report


def test_a_config_without_sizes_skips_the_check_with_a_warning(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    cfg = lora_config(tmp_path, per_device_train_batch_size=10**6)
    with caplog.at_level(logging.WARNING, logger="kftune"):
        assert check(cfg, str(tmp_path), CPU) == cfg
    assert "memory pre-flight skipped" in caplog.text
