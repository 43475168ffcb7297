"""QLoRA's frozen, non-quantized parameters (embedding, tied LM head, norms) kept in the training precision.

peft's `prepare_model_for_kbit_training` upcasts every bf16 parameter that is not 4-bit to fp32: on
Qwen2.5-0.5B that is the 136M-row embedding, which is also the tied LM head, at 0.54 GB instead of
0.27 GB, and under bf16 autocast the head's matmul then casts it back to bf16 on every forward (another
0.27 GB). Training in bf16, the frozen parts stay bf16, as they do for LoRA; the rest of what peft
does (freeze, input gradients for checkpointing) is unchanged. In fp32 peft's function runs as is.

`KFTUNE_LEVERS_OFF=bf16_base` keeps peft's upcast (the benchmarks measure each lever on its own).
"""

from __future__ import annotations

from kftune.lm_head_loss import lever_on


def prepare_quantized(model, precision: str, checkpointing: bool):
    from peft import prepare_model_for_kbit_training

    if precision != "bf16" or not lever_on("bf16_base"):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:  # as peft does it: reentrant checkpoints need an input that requires grad
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model
