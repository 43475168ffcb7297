"""Each speed or memory lever computes what the plain path computes (the chunked LM head has its own file).

LoRA dropout: the same Bernoulli dropout from a cheaper mask; packed attention: the same attention as
sdpa's block-causal mask over a padding-free row; mapped weights: the same values, without keeping the
checkpoint's file mapped. Precision is a dimension where rounding can differ: fp32 and bf16 both run.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from kftune.core.errors import KftuneError
from kftune.core.levers import LEVERS, lever_on, levers_on
from kftune.train import lora_dropout
from kftune.train.lora_dropout import LANES, LaneDropout, drop_probability, keep_mask

PRECISIONS = [torch.float32, torch.bfloat16]


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def test_levers_are_named_and_switch_off_one_at_a_time(monkeypatch):
    monkeypatch.setenv("KFTUNE_LEVERS_OFF", "dropout,lm_head")
    assert [name for name in LEVERS if not lever_on(name)] == ["lm_head", "dropout"]
    assert levers_on() == [name for name in LEVERS if name not in ("dropout", "lm_head")]
    with pytest.raises(KeyError, match="unknown lever"):
        lever_on("dropuot")
    monkeypatch.setenv("KFTUNE_LEVERS_OFF", "")
    assert levers_on() == list(LEVERS)


@pytest.mark.parametrize(
    ("value", "wrong"), [("dropout, lm_head", "' lm_head'"), ("dropuot", "'dropuot'"), (",", "''")]
)
def test_a_name_that_is_no_lever_is_an_error_not_a_silent_ablation(monkeypatch, value, wrong):
    monkeypatch.setenv("KFTUNE_LEVERS_OFF", value)
    with pytest.raises(KftuneError, match=f"{wrong} is not a lever"):
        lever_on("dropout")


# -- LoRA dropout ---------------------------------------------------------------------------------


def test_keep_mask_drops_each_lane_with_probability_p_independently():
    n, p = 4_000_000, 0.1
    dropped = ~keep_mask(torch.Size([n]), p, torch.device("cpu"))
    q = drop_probability(p)  # what the lane threshold realises: 0.100006
    lanes = [dropped[lane::LANES].float() for lane in range(LANES)]  # the sign-bit lane included
    for lane, x in enumerate(lanes):
        assert abs(x.mean().item() - q) < 6 * math.sqrt(q * (1 - q) / x.numel()), lane
    # every pair of lanes of one 64-bit draw is independent: both dropped with probability q^2
    for a, b in itertools.combinations(range(LANES), 2):
        both = (lanes[a] * lanes[b]).mean().item()
        assert abs(both - q**2) < 6 * math.sqrt(q**2 * (1 - q**2) / lanes[a].numel()), (a, b, both)
    # and so is a lane with the same lane of the next draw
    first = lanes[0]
    assert abs((first[:-1] * first[1:]).mean().item() - q**2) < 6 * math.sqrt(q**2 / first.numel())
    assert keep_mask(torch.Size([3, 5]), p, torch.device("cpu")).shape == (3, 5)  # not a multiple of the lanes


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_lane_dropout_is_dropout_with_its_mask(dtype):
    """Given the mask it drew, the output and the gradient are exactly nn.Dropout's formula."""
    torch.manual_seed(3)
    x = (torch.rand(64, 96) + 0.5).to(dtype).requires_grad_()  # no zeros: the mask shows in the output
    layer = LaneDropout(0.1)
    out = layer(x)
    kept = out != 0
    assert 0.8 < kept.float().mean().item() < 0.97
    scale = 1.0 / (1.0 - drop_probability(0.1))  # the realised keep rate's inverse: unbiased
    assert torch.equal(out, torch.where(kept, x * scale, 0).to(dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, 0).to(dtype))
    layer.eval()
    assert torch.equal(layer(x), x)  # eval mode is the identity, as nn.Dropout's


def test_lane_dropout_replays_under_a_seed_and_under_checkpointing():
    """checkpointing's saved RNG state redraws the same masks: the gradients match without it, bit for bit."""
    layer = LaneDropout(0.1)
    torch.manual_seed(5)
    first = layer(torch.ones(1000))
    torch.manual_seed(5)
    assert torch.equal(first, layer(torch.ones(1000)))

    weight = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(16, 32)

    def block(inputs):
        return layer(inputs @ weight).square().sum()

    grads = []
    for checkpointed in (False, True):
        weight.grad = None
        torch.manual_seed(11)
        loss = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        loss.backward()
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    return get_peft_model(tiny_qwen2(), config)


def test_install_swaps_every_lora_dropout_and_only_those(monkeypatch):
    model = lora_model(0.1)
    adapted = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict))
    assert adapted == 2 * 7  # two layers, seven linear layers each
    assert lora_dropout.install(model) == adapted
    swapped = [d for m in model.modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert all(type(d) is LaneDropout and d.p == 0.1 and d.training for d in swapped)
    assert lora_dropout.install(lora_model(0.0)) == 0  # p = 0 is peft's Identity: nothing to swap
    monkeypatch.setenv("KFTUNE_LEVERS_OFF", "dropout")
    assert lora_dropout.install(lora_model(0.1)) == 0


# -- the checkpoint's file mapping ----------------------------------------------------------------


def mapped_files() -> set[str]:
    return {line.split()[5] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) > 5}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_quantized_load_keeps_no_view_of_the_mapped_checkpoint(tmp_path):
    """The unquantized parts are copied out of the safetensors mapping, with the same values, and it closes."""
    from safetensors.torch import load_file

    from kftune.models.loading import check_bitsandbytes, load_model, pick_runtime

    try:
        check_bitsandbytes()
    except Exception as exc:
        pytest.skip(f"bitsandbytes cannot run here: {exc}")
    folder = tmp_path / "bf16"
    tiny_qwen2().to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk, as Qwen ships: views are possible
    weights = folder / "model.safetensors"
    model = load_model(str(folder), pick_runtime("bf16"), quantization_bit=4)
    import gc

    gc.collect()
    assert str(weights) not in mapped_files()
    on_disk = load_file(weights)
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding, on_disk["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, on_disk["model.norm.weight"])
