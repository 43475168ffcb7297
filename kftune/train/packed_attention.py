"""Attention over a padding-free batch one conversation at a time, instead of over the whole row.

A padding-free batch is one row of several conversations, told apart by `position_ids` restarting at
0. transformers' `sdpa` then builds a block-causal mask over the whole row and torch's CPU kernel
scores every query against every key in it: four conversations of 370 tokens cost a 1,480 x 1,480
attention, four times the 4 x 370 x 370 that matter (measured: 15% of a Qwen2.5-0.5B QLoRA step here).
`packed_sdpa` runs causal SDPA on each conversation's slice and joins the outputs: the same attention,
since the block mask lets no token see another conversation. Anything else (eval mode, a batch of
several rows, a cache, a sliding window, attention dropout) goes to transformers' own `sdpa` with its mask.

`KFTUNE_LEVERS_OFF=packed_attention` keeps `sdpa` (the benchmarks measure each lever on its own).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kftune.core.levers import lever_on

NAME = "kftune_packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each conversation in one padding-free row: a new one begins where positions restart."""
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add_(1).tolist()
    edges = [0, *starts, positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [1, heads, tokens, dim] -> [1, tokens, heads, dim]."""
    position_ids = kwargs.get("position_ids")
    plain = (
        not module.training
        or position_ids is None
        or query.shape[0] != 1
        or key.shape[2] != query.shape[2]
        or kwargs.get("sliding_window") is not None
        or dropout
        or not getattr(module, "is_causal", True)
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    parts = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, 0.0, scaling, is_causal=True
        )[0]
        for s, e in segments(position_ids)
    ]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def register() -> None:
    """Make `NAME` known to transformers, with sdpa's masks for the cases it hands on to sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model) -> bool:
    """Use `packed_sdpa` in `model` (the transformers model) where it runs sdpa; returns whether it did."""
    if not lever_on("packed_attention") or model.config._attn_implementation != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def uninstall(model) -> None:
    """Back to `sdpa`, so a saved config names an implementation any transformers install knows."""
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation("sdpa")
