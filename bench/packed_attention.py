"""Attention over one padding-free row on CPU: which way to honour the conversations' boundaries is fastest.

Times forward + backward of one attention call at Qwen2.5-0.5B's head shape (14 query heads, 2 KV heads,
head dim 64) over a row of several conversations, each way computing the same block-causal attention:

- sdpa, block mask: what transformers' `sdpa` does with a padding-free row (the whole row, masked:
  `sdpa_attention_forward` with the mask `sdpa_mask` builds from the position ids);
- per conversation: causal sdpa on each conversation's slice, the KV heads shared by `enable_gqa`
  (transformers' own call without a mask) or repeated once for the row first;
- flex, document mask: torch's `flex_attention` with a `BlockMask` of the documents, eager and compiled
  (what transformers' `flex_attention` builds from the same position ids).

    python bench/packed_attention.py [--lengths 370,370,370,370 --repeat 5 --out bench/results]

The lever (kftune/train/packed_attention.py) uses the fastest way this prints for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import provenance

HEADS, KV_HEADS, DIM = 14, 2, 64


def inputs(tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(1, HEADS, tokens, DIM), (1, KV_HEADS, tokens, DIM), (1, KV_HEADS, tokens, DIM)]
    return [torch.randn(shape, dtype=dtype).requires_grad_() for shape in shapes]


class Attention(torch.nn.Module):
    """What transformers' attention functions read from the module: GQA groups, causality."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def block_mask_sdpa(lengths: list[int]):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(doc.numel(), doc.numel(), dtype=torch.bool).tril()

    def attend(q, k, v):
        return sdpa_attention_forward(Attention(), q, k, v, mask[None, None])[0].transpose(1, 2)

    return attend


def per_conversation(lengths: list[int], repeat_kv_first: bool):
    edges = torch.tensor([0, *lengths]).cumsum(0).tolist()
    spans = list(zip(edges[:-1], edges[1:]))

    def attend(q, k, v):
        if repeat_kv_first:
            k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
        gqa = not repeat_kv_first
        parts = [
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=gqa)
            for s, e in spans
        ]
        return torch.cat(parts, dim=2)

    return attend


def flex(lengths: list[int], compiled: bool):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block = create_block_mask(document_causal, None, None, doc.numel(), doc.numel(), device="cpu")
    run = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def attend(q, k, v):
        return run(q, k, v, block_mask=block, enable_gqa=True)

    return attend


def fwd_bwd(attend, tensors: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    for t in tensors:
        t.grad = None
    started = time.perf_counter()
    out = attend(*tensors)
    out.float().square().sum().backward()
    return time.perf_counter() - started, out.detach().float()


def compare(ways: dict, tokens: int, dtype: torch.dtype, repeat: int) -> dict[str, dict]:
    """Median seconds of each way, the ways taken in turn each round (a busy box slows them alike).

    The best of the rounds is printed beside the median: on a shared box it is the one least disturbed.
    Round 0 is untimed (it also compiles); a way that cannot run here is reported, not fatal.
    """
    results: dict[str, dict] = {}
    attends = {}
    for way, build in ways.items():
        try:
            attends[way] = build()
            fwd_bwd(attends[way], inputs(tokens, dtype))
        except Exception as exc:
            results[way] = {"error": str(exc).splitlines()[0]}
            attends.pop(way, None)
    seconds: dict[str, list[float]] = {way: [] for way in attends}
    outputs = {}
    for _ in range(repeat):
        for way, attend in attends.items():
            took, outputs[way] = fwd_bwd(attend, inputs(tokens, dtype))
            seconds[way].append(took)
    reference = next(iter(outputs.values()))
    for way in attends:
        ms = [x * 1000 for x in seconds[way]]
        results[way] = {
            "ms": statistics.median(ms),
            "ms_range": [min(ms), max(ms)],
            "max_abs_diff": (outputs[way] - reference).abs().max().item(),
        }
    return {way: results[way] for way in ways}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="370,370,370,370", help="tokens of each conversation in the row")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip compiled flex (needs a C++ compiler)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    ways = {
        "sdpa, block mask (baseline)": lambda: block_mask_sdpa(lengths),
        "per conversation, enable_gqa": lambda: per_conversation(lengths, repeat_kv_first=False),
        "per conversation, KV repeated": lambda: per_conversation(lengths, repeat_kv_first=True),
        "flex, document mask, eager": lambda: flex(lengths, compiled=False),
    }
    if not args.no_compile:
        ways["flex, document mask, compiled"] = lambda: flex(lengths, compiled=True)
    rows = []
    print(f"one row of {len(lengths)} conversations ({sum(lengths)} tokens), {HEADS}/{KV_HEADS} heads x {DIM}, fwd+bwd")
    print(
        f"{'way':32s} {'dtype':9s} {'ms median':>9s} {'ms range':>15s} {'vs baseline':>11s} {'best vs':>10s} {'max |diff|':>10s}"
    )
    for name in args.dtypes.split(","):
        measured = compare(ways, sum(lengths), getattr(torch, name), args.repeat)
        base = next(iter(measured.values()))
        for way, row in measured.items():
            rows.append({"way": way, "dtype": name, **row})
            if "error" in row:
                print(f"{way:32s} {name:9s} failed: {row['error'][:80]}")
                continue
            low, high = row["ms_range"]
            row["speedup"], row["speedup_best"] = base["ms"] / row["ms"], base["ms_range"][0] / low
            print(
                f"{way:32s} {name:9s} {row['ms']:9.1f} {f'{low:.1f}-{high:.1f}':>15s} "
                f"{row['speedup']:10.2f}x {row['speedup_best']:9.2f}x {row['max_abs_diff']:10.2e}"
            )
    result = {
        "lengths": lengths,
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
        "rows": rows,
        **provenance(argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "packed_attention-cpu.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
