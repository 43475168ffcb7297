"""Packed attention computes sdpa's block-mask attention, runs where it says it runs, and declines the rest.

The batches come from trl's own padding-free collator (the one kftune trains with), so the boundaries
the lever reads are the ones a run gives it. Each comparison is against the same model on transformers'
`sdpa` with its block-causal mask; the tolerance is derived from the precision itself: both paths are
compared with a float64 run of the model, and the lever may differ from sdpa by at most the error sdpa
itself makes there, times four (each path's rounding error, twice, with room for the order of sums).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kftune.train import packed_attention
from kftune.train.packed_attention import NAME, counts, packed_sdpa

ARCHITECTURES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
PRECISIONS = [torch.float32, torch.bfloat16]
LENGTHS = [37, 50, 1, 29]  # a one-token conversation too
LAYERS = 2


def small_lm(kind: str = "qwen2", seed: int = 0, classes=None):
    config_cls, model_cls = classes or ARCHITECTURES[kind]
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="sdpa",
    )
    return model_cls(config).train()  # no dropout in these models: train mode is deterministic


def packed_batch(vocab: int, lengths=LENGTHS, device="cpu") -> dict:
    """One padding-free row as trl's collator builds it: input_ids, position_ids, cu_seq_lens_q/k, ..."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(7)
    rows = [{"input_ids": torch.randint(0, vocab, (n,)).tolist()} for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    batch.pop("labels")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_backward(model, batch: dict, dtype: torch.dtype, **extra):
    """Logits and every parameter's gradient of a fixed function of the logits."""
    model.zero_grad()
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(**batch, use_cache=extra.pop("use_cache", False), **extra).logits
    logits.float().square().mean().backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), grads


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def fresh_counts():
    counts.clear()
    yield
    counts.clear()


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_packed_attention_equals_sdpa_block_mask(kind, dtype):
    model = small_lm(kind)
    batch = packed_batch(model.config.vocab_size)
    exact = forward_backward(small_lm(kind).double(), batch, torch.float64)
    plain = forward_backward(model, batch, dtype)
    assert packed_attention.install(model) == NAME
    packed = forward_backward(model, batch, dtype)
    assert dict(counts) == {"packed": LAYERS}  # every layer ran on slices: no silent fall back to sdpa
    packed_attention.uninstall(model)
    assert model.config._attn_implementation == "sdpa"
    for name, i in (("logits", 0), ("gradients", 1)):
        floor = error(plain[i], exact[i].float())  # what this precision itself costs sdpa
        assert error(packed[i], plain[i]) <= 4 * floor + 1e-12, (name, error(packed[i], plain[i]), floor)
    # the comparison can fail: attention across conversations (what a cache's missing block mask gives) is far off
    leaked, _ = forward_backward(model, batch, dtype, use_cache=True)
    assert error(leaked, plain[0]) > 100 * error(plain[0], exact[0].float())


def test_boundaries_are_read_once_per_forward_and_replayed_under_checkpointing(monkeypatch):
    """One host read of the collator's cu_seq_lens a forward (not one per layer); reentrant recompute reuses it."""
    model = small_lm()
    batch = packed_batch(model.config.vocab_size)
    packed_attention.install(model)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or original(self))
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    forward_backward(model, batch, torch.float32)
    assert reads == [batch["cu_seq_lens_q"].shape]
    assert dict(counts) == {"packed": 2 * LAYERS}  # the forward and checkpointing's recomputation


def test_boundaries_come_from_position_ids_without_the_collators_keys():
    model = small_lm()
    batch = packed_batch(model.config.vocab_size)
    plain, _ = forward_backward(model, batch, torch.float32)
    packed_attention.install(model)
    positions_only = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    packed, _ = forward_backward(model, positions_only, torch.float32)
    assert dict(counts) == {"packed": LAYERS}
    assert error(packed, plain) <= 1e-5 * plain.abs().max().item()


def test_packed_attention_equals_each_conversation_alone():
    model = small_lm()
    batch = packed_batch(model.config.vocab_size)
    edges = batch["cu_seq_lens_q"].tolist()
    ids = batch["input_ids"]
    with torch.no_grad():
        alone = torch.cat([model.eval()(input_ids=ids[:, s:e]).logits for s, e in zip(edges[:-1], edges[1:])], 1)
        packed_attention.install(model)
        packed = model.train()(**batch, use_cache=False).logits
    assert counts["packed"] == LAYERS
    assert error(packed, alone) <= 1e-5 * alone.abs().max().item()


def test_segments_follow_the_restarting_positions():
    positions = packed_batch(10)["position_ids"]
    assert packed_attention.segments(positions) == [(0, 37), (37, 87), (87, 88), (88, 117)]
    assert packed_attention.segments(torch.arange(5).unsqueeze(0)) == [(0, 5)]


def test_other_batches_go_to_sdpa_unchanged():
    """Eval mode, padded batches of several rows and a one-row batch with an attention mask: sdpa's exact result."""
    model = small_lm()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    one_row_mask = torch.ones(1, 12, dtype=torch.long)
    one_row_mask[0, :3] = 0
    outputs = []
    for install in (False, True):
        if install:
            packed_attention.install(model)
        with torch.no_grad():
            outputs += [
                model.train()(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                model.train()(input_ids=ids[1:], attention_mask=one_row_mask, use_cache=False).logits,
                model.eval()(input_ids=ids).logits,
            ]
    assert all(torch.equal(a, b) for a, b in zip(outputs[:3], outputs[3:]))
    assert counts["packed"] == 0 and sum(counts.values()) == 3 * LAYERS
    assert "kftune" not in model.config.to_json_string()  # a saved config never names it


class Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("argument", ["s_aux", "softcap", "position_bias"])
def test_an_attention_argument_it_does_not_know_goes_to_sdpa(argument):
    """An argument the slices would drop is sdpa's to honour (or to refuse, as sdpa refuses softcap)."""
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    extra = {"s_aux": torch.zeros(4), "softcap": 30.0, "position_bias": torch.randn(1, 4, 10, 10)}[argument]
    bounds = {packed_attention.BOUNDS: (0, 4, 10)}
    if argument == "softcap":
        with pytest.raises(ValueError, match="softcap"):
            packed_sdpa(Attention().train(), q, k, v, None, **bounds, softcap=extra)
    else:
        out, _ = packed_sdpa(Attention().train(), q, k, v, None, **bounds, **{argument: extra})
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        assert torch.equal(out, sdpa_attention_forward(Attention().train(), q, k, v, None, **{argument: extra})[0])
    assert dict(counts) == {f"declined: attention argument {argument}": 1}


def test_an_architecture_it_was_not_tested_on_keeps_sdpa(caplog):
    model = small_lm(classes=(MistralConfig, MistralForCausalLM))
    with caplog.at_level(logging.INFO, logger="kftune"):
        assert packed_attention.install(model) is None
    assert model.config._attn_implementation == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "packed attention: not tested on model type mistral (only qwen2,llama); sdpa's mask stays"
    ]


def test_packed_attention_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KFTUNE_LEVERS_OFF", "packed_attention")
    model = small_lm()
    assert packed_attention.install(model) is None
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_packed_attention_equals_sdpa_on_cuda(kind):
    """On a GPU in bf16: the same attention as sdpa's block mask, by slices or by transformers' flash varlen kernel."""
    model = small_lm(kind).cuda()
    batch = packed_batch(model.config.vocab_size, device="cuda")
    exact = forward_backward(small_lm(kind).double().cuda(), batch, torch.float64)
    plain = forward_backward(model, batch, torch.bfloat16)
    path = packed_attention.install(model)
    packed = forward_backward(model, batch, torch.bfloat16)
    if path == NAME:
        assert dict(counts) == {"packed": LAYERS}
    else:
        assert path == "flash_attention_2"
    packed_attention.uninstall(model)
    for i in (0, 1):
        assert error(packed[i], plain[i]) <= 4 * error(plain[i], exact[i].float()) + 1e-12
