"""Attention over a padding-free batch one conversation at a time, instead of over the whole row.

A padding-free batch is one row of several conversations; trl's collator marks where each begins
(`cu_seq_lens_q`) and restarts `position_ids` at 0. transformers' `sdpa` builds a block-causal mask over
the whole row and scores every query against every key in it: four conversations of 370 tokens cost a
1,480 x 1,480 attention, four times the 4 x 370 x 370 that matter. `packed_sdpa` runs causal SDPA on each
conversation's slice and joins the outputs: the same attention, since the block mask lets no token see
another conversation. On CPU flex attention with a document mask cannot run backward at all, and the
slices made a 0.5B step faster than the masked row (bench/README.md; `python bench/packed_attention.py`
times one attention call each way).

The boundaries are read once per forward, by a hook on the decoder, from the collator's `cu_seq_lens_q`
(else from where `position_ids` restart): one host sync a step, not one per layer. The hook hands them
to every layer as an argument, so checkpointing's recomputation sees the same ones. Anything the slices
would not compute exactly as sdpa does (eval mode, several rows, an attention mask, a cache, a sliding
window, attention dropout, an attention argument it does not know such as `softcap` or `s_aux`) goes to
transformers' own `sdpa` with its mask, and `counts` says how often each happened. Only the
architectures in `TESTED` get the lever; where `flash_attention_2` is installed on CUDA, transformers'
own varlen kernel reads the collator's boundaries instead.

`KFTUNE_LEVERS_OFF=packed_attention` keeps `sdpa` (the benchmarks measure each lever on its own).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kftune.core.levers import lever_on

NAME = "kftune_packed_sdpa"
BOUNDS = "kftune_conversation_bounds"  # the argument the decoder's hook adds: a tuple of slice edges
TESTED = ("qwen2", "llama")  # model types whose attention passes these arguments (tests/test_packed_attention.py)
# attention arguments the slices honour or that carry nothing for them (the boundaries themselves)
KNOWN = frozenset(
    {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "use_cache"}
)
VARLEN = ("flash_attention_2", "flash_attention_3")  # transformers' kernels that read cu_seq_lens themselves

counts: Counter[str] = Counter()  # "packed" per attention call on slices; "declined: <why>" per call handed on
log = logging.getLogger("kftune")


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each conversation in one padding-free row: a new one begins where positions restart."""
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add_(1).tolist()
    edges = [0, *starts, positions.numel()]
    return list(zip(edges[:-1], edges[1:]))


def bounds_of(kwargs: dict, tokens: int) -> tuple[int, ...] | None:
    """The row's slice edges (0, ..., tokens) from the collator's cu_seq_lens_q, else from the position ids."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        edges = tuple(cu.tolist())
        if edges[0] == 0 and edges[-1] == tokens and all(a < b for a, b in zip(edges, edges[1:])):
            return edges
        return None
    if kwargs.get("position_ids") is None:
        return None  # one conversation: sdpa's causal attention is already all it needs
    return (0, *(end for _, end in segments(kwargs["position_ids"])))


def _find_bounds(decoder, args: tuple, kwargs: dict):
    """Forward pre-hook on the decoder: adds the boundaries when a training forward is one padding-free row."""
    kwargs.pop(BOUNDS, None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    rows = ids if ids is not None else embeds
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(decoder.config, "use_cache", False) if use_cache is None else use_cache
    # with a cache (given or about to be made) sdpa's mask ignores the conversations: so must the slices
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (
        decoder.training
        and rows is not None
        and rows.shape[0] == 1
        and kwargs.get("attention_mask", args[1] if len(args) > 1 else None) is None
        and cache is None
        and not use_cache
    ):
        bounds = bounds_of(kwargs, rows.shape[1])
        if bounds is not None:
            kwargs[BOUNDS] = bounds
    return args, kwargs


def declined(module, query, key, bounds, dropout, kwargs) -> str | None:
    """Why this call cannot run on slices (it then goes to sdpa), or None."""
    if bounds is None:
        return "no boundaries (eval, several rows, an attention mask or a cache)"
    if not module.training or query.shape[0] != 1 or key.shape[2] != query.shape[2] or bounds[-1] != query.shape[2]:
        return "not one training row of the hook's length"
    if dropout or kwargs.get("sliding_window") is not None or not getattr(module, "is_causal", True):
        return "attention dropout, a sliding window or non-causal attention"
    unknown = sorted(
        k for k, v in kwargs.items() if k not in KNOWN | {"sliding_window"} and v is not None and v is not False
    )
    return f"attention argument {', '.join(unknown)}" if unknown else None


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [1, heads, tokens, dim] -> [1, tokens, heads, dim]."""
    bounds = kwargs.pop(BOUNDS, None)
    why = declined(module, query, key, bounds, dropout, kwargs)
    if why:
        counts[f"declined: {why}"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    counts["packed"] += 1
    parts = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, 0.0, scaling, is_causal=True
        )[0]
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def register() -> None:
    """Make `NAME` known to transformers, with sdpa's masks for the cases it hands on to sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model) -> str | None:
    """Give `model` (a transformers model) attention that honours conversations; returns the path taken or None."""
    if not lever_on("packed_attention"):
        return None
    kind, attention = model.config.model_type, model.config._attn_implementation
    if kind not in TESTED:
        log.info("packed attention: not tested on model type %s (only %s); sdpa's mask stays", kind, ",".join(TESTED))
        return None
    if attention in VARLEN:
        return attention  # transformers' varlen kernel already reads the collator's cu_seq_lens
    if attention != "sdpa":
        log.info("packed attention: %s attention is left as it is (the lever replaces sdpa)", attention)
        return None
    from transformers.utils import is_flash_attn_2_available

    model._kftune_attention_before = attention
    if model.device.type == "cuda" and is_flash_attn_2_available():
        model.set_attn_implementation("flash_attention_2")
        return "flash_attention_2"
    register()
    model.set_attn_implementation(NAME)
    model._kftune_bounds_hook = model.base_model.register_forward_pre_hook(_find_bounds, with_kwargs=True)
    return NAME


def uninstall(model) -> None:
    """Back to `sdpa`, so a saved config names an implementation any transformers install knows."""
    hook = getattr(model, "_kftune_bounds_hook", None)
    if hook is not None:
        hook.remove()
        del model._kftune_bounds_hook
    before = getattr(model, "_kftune_attention_before", None)
    if before is not None:
        model.set_attn_implementation(before)
        del model._kftune_attention_before
