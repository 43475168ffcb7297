"""Switches for kftune's speed and memory levers, so the benchmarks can measure each one on its own.

Every lever computes what the plain path computes (tests/test_levers.py, test_packed_attention.py and
test_lm_head_loss.py hold each one to it); `KFTUNE_LEVERS_OFF=lm_head,dropout` turns those two off. A
benchmark switch, not a user setting: a name it does not know is an error, not a silently mislabelled
ablation, and every run records the levers it had on (`levers_on` in train_metrics.json).
"""

from __future__ import annotations

import os

from kftune.core.errors import KftuneError

ENV = "KFTUNE_LEVERS_OFF"

LEVERS = {
    "lm_head": "kftune.train.lm_head_loss: the LM head's loss a chunk of labelled tokens at a time",
    "bf16_base": "kftune.models.loading.prepare_quantized: QLoRA's frozen parts kept in bf16, not fp32",
    "dropout": "kftune.train.lora_dropout: LoRA dropout's mask from 15-bit lanes of one 64-bit draw",
    "packed_attention": "kftune.train.packed_attention: a padding-free row's attention per conversation",
    "mapped_checkpoint": "kftune.models.loading.own_mapped_weights: a quantized load lets the checkpoint's mapping go",
    "tcmalloc": "kftune.core.allocator: `kftune train` re-executes itself with tcmalloc preloaded where it is installed",
}


def levers_off() -> set[str]:
    """The names in KFTUNE_LEVERS_OFF: comma-separated lever names, nothing else."""
    value = os.environ.get(ENV, "")
    names = value.split(",") if value else []
    wrong = [name for name in names if name not in LEVERS]
    if wrong:
        raise KftuneError(
            f"{ENV}={value!r}: {', '.join(repr(n) for n in wrong)} is not a lever; list lever names separated by "
            f"commas, no spaces, from {','.join(LEVERS)} (or unset it)"
        )
    return set(names)


def levers_on() -> list[str]:
    """The levers a run has on, in LEVERS' order."""
    off = levers_off()
    return [name for name in LEVERS if name not in off]


def lever_on(name: str) -> bool:
    """False when `name` is listed in KFTUNE_LEVERS_OFF."""
    if name not in LEVERS:
        raise KeyError(f"unknown lever {name!r}; kftune's levers are {', '.join(LEVERS)}")
    return name not in levers_off()
