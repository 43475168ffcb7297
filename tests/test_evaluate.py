"""`kftune evaluate` on a tiny trained adapter, the template fingerprint, and the text scores it uses."""

import json
import shutil

import pytest

from kftune.core import artifacts
from kftune.core.errors import KftuneError
from kftune.train.config import resolve
from kftune.train.training import run

from .conftest import run_cli

pytestmark = pytest.mark.slow  # trains a tiny adapter once for the module (about 20 s on 2 cores)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from kftune.dev.sample_data import write_samples

    return write_samples(tmp_path_factory.mktemp("eval") / "eval.jsonl", rows=6, seed=7)


@pytest.fixture(scope="module")
def adapter(tiny_model, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "lora"
    return run(
        resolve(
            {
                "base_model": str(tiny_model),
                "data_path": str(small_data),
                "output_dir": str(out),
                "use_lora": True,
                "lora_r": 8,
                "max_steps": 12,
                "learning_rate": 2e-2,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 256,
                "logging_steps": 2,
            },
            {},
        )
    ).output_dir


@pytest.fixture(scope="module")
def evaluated(adapter, tiny_model, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "ev"
    proc = run_cli(
        "-m",
        "kftune.cli",
        "evaluate",
        "--base_model",
        str(tiny_model),
        "--model",
        str(adapter),
        "--eval_data",
        str(eval_data),
        "--samples",
        "2",
        "--max_new_tokens",
        "24",
        "--output_dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_evaluate_scores_base_and_tuned_on_the_same_rows(evaluated, eval_data):
    from kftune.core.storage import sha256_file

    out, stdout = evaluated
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "samples.jsonl"]
    metrics = json.loads((out / "metrics.json").read_text())
    base, tuned = metrics["base"], metrics["tuned"]
    assert metrics["eval_rows"] == 6 and metrics["eval_sha256"] == sha256_file(eval_data)
    assert base["eval_tokens"] == tuned["eval_tokens"] > 0  # same rows, same template, same mask
    assert tuned["eval_loss"] < base["eval_loss"]  # 12 LoRA steps on the same kind of posts
    for side in (base, tuned):
        assert 0 <= side["rougeL"] <= 1 and 0 <= side["chrf"] <= 100 and 0 <= side["checks_pass_rate"] <= 1
        assert set(side["checks"]) == {"title", "hashtag", "length", "all"}
    assert metrics["reference_checks"]["all"] == 1.0  # the default checks suit the sample posts
    assert metrics["settings"]["max_seq_length"] == 256  # from the adapter's training config
    assert "eval_loss" in stdout and "rougeL" in stdout


def test_samples_hold_prompt_reference_and_both_outputs(evaluated, eval_data):
    out, _ = evaluated
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    first_row = json.loads(eval_data.read_text().splitlines()[0])
    assert len(samples) == 2
    assert samples[0]["reference"] == first_row["output"]
    assert samples[0]["prompt"][-1]["content"].startswith(first_row["instruction"])
    for sample in samples:
        assert {"base_output", "tuned_output", "base_checks", "tuned_checks"} <= set(sample)


def test_the_report_embeds_the_plots_and_the_samples(evaluated):
    out, _ = evaluated
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # metrics chart and loss curves
    assert "no validation report with token lengths" in page  # --validation not given: said, not failed
    first = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert first["reference"].splitlines()[0] in page


def test_the_eval_key_changes_with_data_and_settings():
    from kftune.evaluate.evaluation import Settings

    key = Settings(max_seq_length=256).key("a" * 64)
    assert key == Settings(max_seq_length=256, batch_size=1).key("a" * 64)  # batch size changes no number
    assert key != Settings(max_seq_length=512).key("a" * 64)
    assert key != Settings(max_seq_length=256, samples=3).key("a" * 64)
    assert key != Settings(max_seq_length=256).key("b" * 64)


def test_training_stores_the_fingerprint_of_the_base_tokenizer(adapter, tiny_model):
    from kftune.models import fingerprint
    from kftune.models.loading import load_tokenizer

    stored = fingerprint.stored(adapter)
    assert stored["fingerprint"] == fingerprint.compute(load_tokenizer(str(tiny_model)))["fingerprint"]
    assert stored["fingerprint"] == fingerprint.compute(load_tokenizer(str(adapter)))["fingerprint"]


@pytest.fixture
def edited_template(adapter, tmp_path):
    """A copy of the adapter whose chat template was changed after training (one extra space)."""
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> ", 1))
    return copy


def test_a_changed_chat_template_is_refused_by_evaluate_merge_and_infer(
    edited_template, tiny_model, eval_data, tmp_path
):
    commands = {
        "evaluate": [
            "evaluate",
            "--model",
            str(edited_template),
            "--eval_data",
            str(eval_data),
            "--samples",
            "0",
            "--output_dir",
            str(tmp_path / "ev"),
        ],
        "merge": [
            "merge",
            "--base_model",
            str(tiny_model),
            "--lora_model",
            str(edited_template),
            "--output_dir",
            str(tmp_path / "merged"),
        ],
        "infer": [
            "infer",
            "--base_model",
            str(tiny_model),
            "--lora_model",
            str(edited_template),
            "--prompt",
            "你好",
            "--max_new_tokens",
            "2",
        ],
    }
    for name, args in commands.items():
        proc = run_cli("-m", "kftune.cli", *args)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "chat template changed" in proc.stderr and "--allow-template-mismatch" in proc.stderr, name
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("ev*")) and not list(tmp_path.glob("merged*"))  # nothing half-written
    allowed = run_cli("-m", "kftune.cli", *commands["infer"], "--allow-template-mismatch", "--do_sample", "false")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "chat template changed" in allowed.stderr  # still said, as a warning


def test_a_base_with_another_tokenizer_is_refused(adapter, tiny_model, tmp_path):
    from kftune.models.infer import checked_tokenizer

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"  # another special token: what the model sees changes
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.rmtree(tmp_path / "no-tokenizer", ignore_errors=True)
    bare = tmp_path / "no-tokenizer"  # an adapter without saved tokenizer files is prompted with the base's
    shutil.copytree(adapter, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    with pytest.raises(KftuneError, match=r"the base model.s tokenizer .*\(tokenizer changed"):
        checked_tokenizer(str(bare), str(other))
    assert checked_tokenizer(str(bare), str(tiny_model)) is not None


def test_character_level_scores_see_chinese():
    from kftune.evaluate.scoring import chrf, rouge_l

    reference = "💐广州花店天花板｜星河花店🔥\n终于打卡了广州的星河花店！\n#广州探店 #花店"
    assert rouge_l([reference], [reference]) == [1.0]
    assert 0.3 < rouge_l(["终于打卡了星河花店"], [reference])[0] < 1.0  # no spaces, still partial credit
    assert rouge_l(["完全无关"], [reference]) == [0.0]
    corpus, per_row = chrf([reference, "无关"], [reference, reference])
    assert per_row[0] == pytest.approx(100.0) and per_row[1] < 5 and 0 < corpus < 100


def test_checks_are_pluggable():
    from kftune.evaluate.scoring import DEFAULT_CHECKS, load_checks, pass_rates, run_checks

    post = "☕成都咖啡店天花板｜山野咖啡\n" + "手冲单品很好喝，露台安静适合办公。" * 4 + "\n#成都探店 #咖啡"
    assert run_checks(DEFAULT_CHECKS, post) == {"title": True, "hashtag": True, "length": True}
    assert run_checks(DEFAULT_CHECKS, "短") == {"title": False, "hashtag": False, "length": False}
    assert [c.name for c in load_checks("hashtag,title")] == ["hashtag", "title"]
    assert load_checks("") == () and load_checks(None) == DEFAULT_CHECKS
    assert [c.name for c in load_checks("kftune.evaluate.scoring:DEFAULT_CHECKS")] == ["title", "hashtag", "length"]
    assert pass_rates([{"a": True, "b": False}, {"a": True, "b": True}], load_checks("")) == {"all": 0.5}
    with pytest.raises(KftuneError, match="--checks emoji: unknown check"):
        load_checks("emoji")
    with pytest.raises(KftuneError, match="--checks nosuch.module:x: cannot import"):
        load_checks("nosuch.module:x")
    with pytest.raises(KftuneError, match="appears twice"):
        load_checks("title,default")


def test_a_fingerprint_of_another_version_is_not_compared(tiny_model, tmp_path):
    from kftune.models import fingerprint
    from kftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    record = {"chat_template": "0" * 64, "tokenizer": "0" * 64, "fingerprint": "0" * 64}
    (tmp_path / artifacts.FINGERPRINT).write_text(json.dumps({**record, "version": fingerprint.VERSION}))
    with pytest.raises(KftuneError, match="chat template and tokenizer changed"):
        fingerprint.check(tmp_path, tokenizer, "this tokenizer")
    (tmp_path / artifacts.FINGERPRINT).write_text(json.dumps({**record, "version": 0}))
    fingerprint.check(tmp_path, tokenizer, "this tokenizer")  # written by another version: warned, not refused


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_reproduces_the_eval_loss_training_reported(precision, tiny_model, small_data, eval_data, tmp_path):
    """`kftune evaluate` in the training's precision gives the eval_loss training printed for the same rows.

    One eval batch (batch 8 > 6 rows), so both are the mean over the same assistant tokens; what differs is
    only the batch layout (training packs rows without padding, evaluate pads them), which changes the order
    of floating-point sums. fp32: agreement to 1e-5 relative (sums of ~10^3 terms, 2^-24 each). bf16: the
    logits are rounded to bf16 (8 significant bits) in both paths, so they agree to a few bf16 ulps of the
    largest logit; the mean loss, an fp32 reduction of per-token losses that each move by at most twice the
    logit difference, agrees to within half a bf16 ulp at the loss's own scale. A wrong mask, template or
    compute dtype moves it by far more.
    """
    import math

    from kftune.evaluate.evaluation import Settings, evaluate

    result = run(
        resolve(
            {
                "base_model": str(tiny_model),
                "data_path": str(small_data),
                "eval_data_path": str(eval_data),
                "output_dir": str(tmp_path / "lora"),
                "use_lora": True,
                "lora_r": 8,
                "max_steps": 6,
                "learning_rate": 2e-2,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 256,
                "precision": precision,
            },
            {},
        )
    )
    trained = result.metrics["eval_loss"]
    metrics = evaluate(
        str(result.output_dir), str(eval_data), tmp_path / "ev", settings=Settings(samples=0, precision=precision)
    )
    assert metrics["settings"]["precision"] == precision
    loss = metrics["tuned"]["eval_loss"]
    half_ulp_bf16 = 2.0 ** (math.floor(math.log2(trained)) - 8)
    bound = 1e-5 * trained if precision == "fp32" else half_ulp_bf16
    assert abs(loss - trained) <= bound, (loss, trained, bound)
    assert abs(metrics["base"]["eval_loss"] - trained) > 10 * bound  # the adapter moved the loss far more than that
