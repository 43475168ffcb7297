"""LoRA dropout with a cheaper random mask: the same Bernoulli dropout, drawn from 15-bit integers.

peft applies `nn.Dropout` to the input of every adapted layer, and on a CPU torch draws each mask
element with its own Bernoulli sample: at Qwen2.5-0.5B's shape with 1,500 tokens that is 360M draws a
step (twice that with checkpointing, which redraws them). One 64-bit
random integer gives four independent 15-bit lanes; an element is dropped when its lane is below
round(p * 2**15), so it is dropped with probability `drop_probability(p)`, p to within 2**-16 (0.100006
for p = 0.1), and kept ones are scaled by the inverse of the realised keep rate, as `nn.Dropout` scales by
1 / (1 - p): the expected output is the input exactly. The masks come from torch's CPU generator, so a
seed and checkpointing's saved RNG state replay them exactly.

`KFTUNE_LEVERS_OFF=dropout` keeps peft's `nn.Dropout` (the benchmarks measure each lever on its own).
"""

from __future__ import annotations

import torch
from torch import nn

from kftune.core.levers import lever_on

LANE_BITS = 15
LANES = 4  # 15-bit lanes in one 63-bit draw (random_() on int64 leaves the sign bit 0)


def threshold(p: float) -> int:
    """A lane below this is dropped."""
    return round(p * (1 << LANE_BITS))


def drop_probability(p: float) -> float:
    """The probability an element is dropped for the rate p: p to within 2**-16."""
    return threshold(p) / (1 << LANE_BITS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True where an element is kept (probability 1 - drop_probability(p))."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + LANES - 1) // LANES, dtype=torch.int64, device=device).random_()
    lanes = words.view(torch.int16)[:count].bitwise_and_((1 << LANE_BITS) - 1)
    return (lanes >= threshold(p)).view(shape)


class LaneDropout(nn.Dropout):
    """`nn.Dropout` with the mask from `keep_mask`; identical in eval mode and at p = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        scale = 1.0 / (1.0 - drop_probability(self.p))  # unbiased for the rate the lanes realise
        return torch.where(keep_mask(x.shape, self.p, x.device), x * scale, 0)


def install(model) -> int:
    """Swap the `nn.Dropout` of every LoRA layer in `model` for `LaneDropout`; returns how many."""
    if not lever_on("dropout"):
        return 0
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = LaneDropout(dropout.p)
                dropouts[name].train(dropout.training)
                swapped += 1
    return swapped
