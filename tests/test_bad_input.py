"""Each bad input gives one clear message, a non-zero exit, no traceback, and writes nothing."""

import pytest

from .conftest import run_cli


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def out(tmp_path):
    return tmp_path / "output"


def train(tiny_model, data, out, *extra, env=None):
    return run_cli(
        "fine_tune_qwen.py",
        "--config_file",
        "configs/train_config_lora.json",
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        *extra,
        env=env,
    )


def assert_clean_failure(proc, *expected, out=None):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-2000:]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")), "staging folder left behind"


def test_missing_data_file(tiny_model, tmp_path, out):
    assert_clean_failure(
        train(tiny_model, tmp_path / "nope.jsonl", out), "nope.jsonl: data file not found", "--data_path", out=out
    )


def test_empty_data_file(tiny_model, tmp_path, out):
    data = write(tmp_path / "empty.jsonl", "")
    assert_clean_failure(train(tiny_model, data, out), "empty.jsonl: no samples", out=out)


def test_bad_json_line(tiny_model, tmp_path, out):
    data = write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    assert_clean_failure(train(tiny_model, data, out), "bad.jsonl:2: invalid JSON", out=out)


def test_max_seq_length_that_cuts_off_every_answer(tiny_model, small_data, out):
    proc = train(tiny_model, small_data, out, "--max_seq_length", "16")
    assert_clean_failure(proc, "--data_path", "none of its", "max_seq_length=16", "raise --max_seq_length", out=out)


def test_unknown_and_invalid_config_keys(tiny_model, small_data, out):
    proc = train(tiny_model, small_data, out, "--lora_rank", "8", "--lora_dropout", "2")
    assert_clean_failure(
        proc, "unknown flag --lora_rank; did you mean --lora_r?", "lora_dropout: must be in [0, 1)", out=out
    )


def test_lm_head_among_lora_targets(tiny_model, small_data, out):
    """kftune's own target check says it in one line, before trl would refuse it with a traceback."""
    proc = train(tiny_model, small_data, out, "--lora_target_modules", "q_proj,lm_head")
    assert_clean_failure(proc, "lora_target_modules: lm_head is", "output head", out=out)


@pytest.mark.parametrize("value", ["dropout, lm_head", "dropuot", "lm_head,,dropout"])
def test_levers_off_naming_no_lever(tiny_model, small_data, out, value):
    proc = train(tiny_model, small_data, out, env={"KFTUNE_LEVERS_OFF": value})
    assert_clean_failure(proc, f"KFTUNE_LEVERS_OFF={value!r}:", "is not a lever", out=out)


def test_base_model_path_missing(small_data, tmp_path, out):
    proc = train(tmp_path / "models" / "Qwen2.5-0.5B-Instruct", small_data, out)
    assert_clean_failure(proc, "model folder not found", "--base_model", out=out)


def test_output_dir_not_empty_is_kept(tiny_model, small_data, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_clean_failure(
        train(tiny_model, small_data, out), "already exists and is not empty", "--overwrite_output_dir"
    )
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.fixture
def no_bitsandbytes(tmp_path):
    """Stand-in for a platform where bitsandbytes cannot load (no such machine here): a package that fails to import."""
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    write(fake / "__init__.py", "raise ImportError('libbitsandbytes: no backend for this platform')\n")
    return {"PYTHONPATH": str(fake.parent)}


def test_qlora_where_bitsandbytes_cannot_run(tiny_model, small_data, out, no_bitsandbytes):
    proc = run_cli(
        "fine_tune_qwen.py",
        "--config_file",
        "configs/train_config_qlora.json",
        "--base_model",
        str(tiny_model),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        env=no_bitsandbytes,
    )
    assert_clean_failure(proc, "quantization needs bitsandbytes, which cannot run here", "use_lora", out=out)


def test_4bit_inference_where_bitsandbytes_cannot_run(tiny_model, no_bitsandbytes):
    proc = run_cli(
        "inference_lora.py", "--base_model", str(tiny_model), "--load_in_4bit", "--prompt", "hi", env=no_bitsandbytes
    )
    assert_clean_failure(proc, "quantization needs bitsandbytes", "--load_in_4bit")


def test_inference_with_missing_adapter(tiny_model, tmp_path):
    proc = run_cli(
        "inference_lora.py",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(tmp_path / "output_qwen_lora"),
        "--prompt",
        "hi",
    )
    assert_clean_failure(proc, "output_qwen_lora: model folder not found", "--lora_model")
