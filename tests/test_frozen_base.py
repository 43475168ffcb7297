"""QLoRA in bf16 keeps the frozen embedding, tied head and norms in bf16 (peft upcasts them to fp32):
the same values, half the bytes, and the same loss and adapter gradients up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from kftune.models.loading import check_bitsandbytes, load_model, pick_runtime, prepare_quantized


def qlora(tiny_model, upcast: bool):
    from peft import LoraConfig, get_peft_model

    runtime = pick_runtime("bf16")
    model = load_model(str(tiny_model), runtime, quantization_bit=4)
    model = prepare_quantized(
        model, "fp32" if upcast else "bf16", gradient_checkpointing=False
    )  # "fp32": peft's own function
    torch.manual_seed(0)
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )


def test_bf16_qlora_keeps_the_frozen_parts_bf16_with_the_same_values_loss_and_gradients(tiny_model):
    try:
        check_bitsandbytes()
    except Exception as exc:
        pytest.skip(f"bitsandbytes cannot run here: {exc}")
    kept, upcast = qlora(tiny_model, upcast=False), qlora(tiny_model, upcast=True)
    embed_kept = kept.get_input_embeddings().weight
    embed_up = upcast.get_input_embeddings().weight
    assert embed_kept.dtype == torch.bfloat16 and embed_up.dtype == torch.float32  # peft's upcast, which this avoids
    assert torch.equal(embed_kept.float(), embed_up)  # bf16 -> fp32 is exact: the same values
    assert not any(p.requires_grad for n, p in kept.named_parameters() if "lora_" not in n)
    frozen_bytes = {
        m: sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "lora_" not in n)
        for m in (kept, upcast)
    }
    assert frozen_bytes[kept] < frozen_bytes[upcast]

    ids = torch.randint(0, 1000, (2, 32))
    labels = ids.clone()
    labels[:, :10] = -100
    results = []
    for model in (kept, upcast):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads))
    (loss_kept, g_kept), (loss_up, g_up) = results
    # The two differ only where the upcast model computes in fp32 and this one rounds to bf16 (u = 2^-8): the
    # residual stream after the embedding and after each of the 2 layers' 2 blocks, 5 roundings; each moves the
    # loss and the gradients by at most about u relative, so 5u (x2 for the gradients' second-order terms).
    u = 2.0**-8
    assert abs(loss_kept - loss_up) <= 5 * u * abs(loss_up), (loss_kept, loss_up)
    for name, g in g_up.items():
        rel = float((g_kept[name] - g).norm() / g.norm())
        assert rel <= 10 * u, f"{name}: relative gradient difference {rel:.3g}"
