"""What training does to parameters, and that saved models reload exactly (engine API).

Precision is a test dimension: every machine runs these in fp32 and in bf16 (forced, so a CPU without native
bf16 emulates it; the tiny model keeps that affordable), since `precision: auto` picks bf16 on GPUs and on CPUs
with native bf16 and fp32 elsewhere.
"""

import pytest
import torch
from transformers import TrainerCallback

from kftune.models.loading import find_linear_targets
from kftune.train.config import resolve
from kftune.train.training import run

PROBE = torch.tensor([[5, 17, 33, 70, 120, 9, 301, 2]])


class WatchParameters(TrainerCallback):
    """Snapshots every parameter before training; records the trained model's probe logits after."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits.float()
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def short_config(tiny_model, small_data, out, **overrides):
    values = {
        "base_model": str(tiny_model),
        "data_path": str(small_data),
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_seq_length": 128,
        "warmup_ratio": 0.0,
        **overrides,
    }
    return resolve(values, {})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("lora", {"use_lora": True, "lora_r": 4}),
        ("qlora4", {"use_qlora": True, "quantization_bit": 4, "lora_r": 4}),
        ("qlora8", {"use_qlora": True, "quantization_bit": 8, "lora_r": 4}),
        ("full", {"learning_rate": 1e-3}),
    ],
)
def test_trainable_change_frozen_stay_and_model_reloads_bit_exact(
    method, overrides, precision, tiny_model, small_data, tmp_path
):
    """Inference loads the model as training computed it (dtype, fp32 norms under QLoRA, bf16 as autocast), so
    the reloaded model's logits equal the trained model's bit for bit in either precision: no tolerance."""
    from kftune.models.infer import load_for_inference

    watch = WatchParameters()
    result = run(
        short_config(tiny_model, small_data, tmp_path / method, precision=precision, **overrides), callbacks=[watch]
    )
    assert result.metrics["precision"] == precision

    changed = {n for n in watch.before if not torch.equal(watch.before[n], watch.after[n])}
    assert watch.trainable and changed == watch.trainable, sorted(watch.trainable ^ changed)[:5]
    if method == "full":
        assert len(watch.trainable) == len(watch.before)
        reloaded, _ = load_for_inference(str(result.output_dir), precision=precision)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=PROBE).logits.float(), watch.logits)
        return
    assert all("lora_" in n for n in watch.trainable)

    import bitsandbytes as bnb
    from peft import PeftModel

    expected_type = {"qlora4": bnb.nn.Linear4bit, "qlora8": bnb.nn.Linear8bitLt}.get(method)
    bases = [m.base_layer for n, m in watch.model.named_modules() if hasattr(m, "base_layer") and n.endswith("q_proj")]
    assert bases and all(type(b) is (expected_type or torch.nn.Linear) for b in bases)

    bits = {"qlora4": 4, "qlora8": 8}.get(method)
    reloaded, _ = load_for_inference(str(tiny_model), str(result.output_dir), bits, precision=precision)
    assert isinstance(reloaded, PeftModel)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=PROBE).logits.float(), watch.logits)


def test_target_discovery_finds_the_guides_seven_projections(tiny_model):
    from kftune.models.loading import load_model, pick_runtime

    assert find_linear_targets(load_model(str(tiny_model), pick_runtime())) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def train_bare(model, steps: int = 3) -> list[str]:
    """A bare torch loop (no trl, no Trainer): the names of the trainable parameters it left unchanged."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):  # LoRA's B starts at zero, so A first gets a gradient on the second step
        ids = torch.randint(0, 1000, (2, 16))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [n for n, p in trainable.items() if torch.equal(before[n], p.detach())]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reentrant_checkpointing_trains_every_weight_without_trl(method, tiny_model, small_data, tmp_path):
    """kftune's own model under reentrant checkpointing, trained by a bare torch loop, changes every trainable weight.

    A reentrant checkpoint passes gradients only through inputs that require them: under a frozen base,
    unless the embedding's output requires grad, no adapter in a checkpointed layer learns (the control below).
    """
    import functools

    from kftune.models.loading import pick_runtime
    from kftune.train.training import build_model

    overrides = {"use_lora": True, "lora_r": 4} if method == "lora" else {}
    cfg = short_config(tiny_model, small_data, tmp_path, gradient_checkpointing=True, **overrides)
    model, _ = build_model(cfg, pick_runtime("fp32"), str(tiny_model))
    layers = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    func = layers[0]._gradient_checkpointing_func
    assert isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is True
    assert train_bare(model) == []
    if method == "lora":
        assert sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_" in n) == 2 * 2 * 7
        # the control: the same model without the input-grad hook trains no adapter inside a checkpointed layer
        control, _ = build_model(cfg, pick_runtime("fp32"), str(tiny_model))
        control.get_input_embeddings()._forward_hooks.clear()  # every input-grad hook, whoever registered it
        assert len(train_bare(control)) == 2 * 2 * 7
