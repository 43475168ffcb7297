"""Inference (`inference_lora.py`), merging (`kftune merge`) and the guide's own merge snippet."""

import json
import re

import pytest
import torch

from kftune.train.config import resolve
from kftune.train.training import run

from .conftest import run_cli


@pytest.fixture(scope="module")
def adapters(tiny_model, small_data, tmp_path_factory):
    """A LoRA and a 4-bit QLoRA adapter, each trained for a few steps."""
    root = tmp_path_factory.mktemp("adapters")
    common = {
        "base_model": str(tiny_model),
        "data_path": str(small_data),
        "max_steps": 8,
        "learning_rate": 2e-2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lora_r": 8,
        "max_seq_length": 256,
    }
    lora = run(resolve({**common, "use_lora": True, "output_dir": str(root / "lora")}, {})).output_dir
    qlora = run(
        resolve({**common, "use_qlora": True, "quantization_bit": 4, "output_dir": str(root / "qlora")}, {})
    ).output_dir
    return {"lora": lora, "qlora": qlora}


def test_prompt_prints_a_generation(tiny_model, adapters):
    proc = run_cli(
        "inference_lora.py",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters["lora"]),
        "--prompt",
        "为这家店写一篇小红书探店笔记。",
        "--max_new_tokens",
        "12",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no generation printed"


def test_prompt_with_4bit_base(tiny_model, adapters):
    proc = run_cli(
        "inference_lora.py",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters["qlora"]),
        "--load_in_4bit",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "8",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_chat_keeps_history_and_exits_cleanly(tiny_model, adapters):
    proc = run_cli(
        "inference_lora.py",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters["lora"]),
        "--chat",
        "--max_new_tokens",
        "6",
        "--do_sample",
        "false",
        stdin="你好\n再写一篇\n/reset\n你好\n/exit\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    turns = [(int(t), int(n)) for t, n in re.findall(r"\[turn (\d+): (\d+) prompt tokens", proc.stderr)]
    assert [t for t, _ in turns] == [1, 2, 1], proc.stderr[-1000:]
    (_, first), (_, second), (_, after_reset) = turns
    assert second > first  # the second prompt carries the first exchange
    assert after_reset == first  # /reset dropped it
    assert proc.stdout.count("assistant> ") == 3


def test_chat_ends_on_ctrl_d(tiny_model, adapters):
    proc = run_cli(
        "inference_lora.py",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters["lora"]),
        "--chat",
        "--max_new_tokens",
        "4",
        stdin="你好\n",
    )
    assert proc.returncode == 0 and "[turn 1:" in proc.stderr


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merge_checks_parity_and_writes_a_loadable_model(kind, tiny_model, adapters, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        "-m",
        "kftune.cli",
        "merge",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters[kind]),
        "--output_dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 14, 15, 92, 65]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    on_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapters[kind]
    )
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - on_base(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    assert not torch.allclose(
        merged.model.layers[0].self_attn.q_proj.weight,
        AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].self_attn.q_proj.weight,
    )


def test_merge_fails_loudly_when_parity_breaks(tiny_model, adapters, tmp_path):
    """A bound below fp32 rounding stands in for a broken merge: the check must refuse and write nothing."""
    out = tmp_path / "merged"
    proc = run_cli(
        "-m",
        "kftune.cli",
        "merge",
        "--base_model",
        str(tiny_model),
        "--lora_model",
        str(adapters["lora"]),
        "--output_dir",
        str(out),
        "--tolerance",
        "1e-12",
    )
    assert proc.returncode == 2
    assert "merge parity failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_guides_merge_snippet_runs_on_our_adapter(tiny_model, adapters, tmp_path):
    snippet = f"""
from transformers import AutoModelForCausalLM
base_model = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r})
lora_path = {str(adapters["lora"])!r}

from peft import PeftModel
model = PeftModel.from_pretrained(base_model, lora_path)
merged_model = model.merge_and_unload()
merged_model.save_pretrained("./merged_model")
"""
    proc = run_cli("-c", f"import os; os.chdir({str(tmp_path)!r})\n" + snippet)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "merged_model" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merged_model_matches_the_adapter_in_bf16_within_rounding(kind, tiny_model, adapters, tmp_path):
    """In bf16 (what GPUs and CPUs with native bf16 run), merging cannot be bit-exact, so the bound is derived.

    The merged weight W + s·BA is rounded to bf16 once; on the adapter path W is rounded and s·B(Ax) computed
    in bf16 beside it. So each adapted projection (the adapter's target modules, in every layer) can round
    its output differently by about one bf16 ulp, carried unamplified down the residual stream, and the
    logits are rounded once more: at most (targets·layers + 1) ulps of bf16 at the largest logit (an ulp
    there is 2^(floor(log2 max|logit|) - 7)). Measured: 3-6 such ulps, against a bound of 15 here.
    The merged model must also differ from the base by far more than that, so a merge that lost the
    adapter fails. A QLoRA adapter is compared on the full-precision base it is merged into: like with like.
    """
    import math

    from kftune.models.infer import load_for_inference
    from kftune.models.merge import merge

    merged_dir = merge(str(tiny_model), str(adapters[kind]), str(tmp_path / "merged")).output_dir
    ids = torch.tensor([[3, 14, 15, 92, 65, 200, 300, 17, 9, 1000, 512, 44]])
    logits = {}
    for name, (model_dir, adapter) in {
        "adapter": (tiny_model, adapters[kind]),
        "merged": (merged_dir, None),
        "base": (tiny_model, None),
    }.items():
        model, _ = load_for_inference(str(model_dir), str(adapter) if adapter else None, precision="bf16")
        assert next(model.parameters()).dtype == torch.bfloat16
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits.float()

    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    targets = len(json.loads((adapters[kind] / "adapter_config.json").read_text())["target_modules"])
    ulp = 2.0 ** (math.floor(math.log2(float(logits["adapter"].abs().max()))) - 7)
    bound = (targets * layers + 1) * ulp
    diff = float((logits["merged"] - logits["adapter"]).abs().max())
    assert diff <= bound, (diff, bound)
    assert float((logits["base"] - logits["adapter"]).abs().max()) > 4 * bound
