"""Switches for kftune's speed and memory levers, so the benchmarks can measure each one on its own.

Every lever computes what the plain path computes (tests/test_levers.py and test_lm_head_loss.py hold
each one to it); `KFTUNE_LEVERS_OFF=lm_head,dropout` turns those two off. A benchmark switch, not a
user setting.
"""

from __future__ import annotations

import os

LEVERS = {
    "lm_head": "kftune.train.lm_head_loss: the LM head's loss a chunk of labelled tokens at a time",
    "bf16_base": "kftune.models.loading.prepare_quantized: QLoRA's frozen parts kept in bf16, not fp32",
    "dropout": "kftune.train.lora_dropout: LoRA dropout's mask from 15-bit lanes of one 64-bit draw",
    "packed_attention": "kftune.train.packed_attention: a padding-free row's attention per conversation",
    "mapped_checkpoint": "kftune.models.loading.own_mapped_weights: a quantized load lets the checkpoint's mapping go",
}


def lever_on(name: str) -> bool:
    """False when `name` is listed in KFTUNE_LEVERS_OFF."""
    if name not in LEVERS:
        raise KeyError(f"unknown lever {name!r}; kftune's levers are {', '.join(LEVERS)}")
    return name not in os.environ.get("KFTUNE_LEVERS_OFF", "").split(",")
