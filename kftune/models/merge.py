"""Merge a LoRA adapter into its base, in full precision, and prove the merge changed nothing.

Merging into a quantized base rounds the update into 4/8-bit weights and degrades the model, so
the base is always loaded unquantized (a QLoRA adapter merges into the fp32 base it was cut from).
Parity: logits of adapter-on-base and of the merged model on a probe batch must agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kftune.core import artifacts
from kftune.core.atomic import building
from kftune.core.errors import KftuneError
from kftune.models.fingerprint import ALLOW_FLAG
from kftune.models.infer import checked_tokenizer

log = logging.getLogger("kftune")

PROBE_TEXTS = [
    "为这家店写一篇小红书探店笔记。\n店名：山野咖啡\n品类：咖啡馆\n城市：成都\n人均：45元",
    "Write a short post about a bakery in Hangzhou.",
]
DEFAULT_TOLERANCE = 1e-3  # fp32 merges measure ~1e-6; anything near 1e-3 means a broken merge
SAVE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeResult:
    output_dir: Path
    max_abs_logit_diff: float


def probe_batch(tokenizer) -> dict:
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in PROBE_TEXTS
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


def merge(
    base_model: str,
    lora_model: str,
    output_dir: str,
    tolerance: float = DEFAULT_TOLERANCE,
    save_dtype: str = "auto",
    allow_template_mismatch: bool = False,
) -> MergeResult:
    """Merge, check parity, save safetensors + tokenizer; output_dir appears only if parity holds."""
    from kftune.models.loading import (  # heavy: imports torch; loaded when used
        load_adapter,
        load_model,
        pick_runtime,
        resolve_model_location,
    )

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise KftuneError(f"{out}: output_dir already exists and is not empty; choose another --output_dir")
    base = resolve_model_location(base_model)
    adapter = resolve_model_location(lora_model, "--lora_model")
    if not Path(adapter, "adapter_config.json").is_file():
        raise KftuneError(f"{lora_model}: no adapter_config.json; --lora_model must be a LoRA output folder")
    tokenizer = checked_tokenizer(adapter, base, allow_template_mismatch)

    runtime = pick_runtime("fp32")
    model = load_adapter(load_model(base, runtime, dtype=torch.float32), adapter).eval()
    batch = probe_batch(tokenizer).to(model.device)
    with torch.inference_mode():
        adapter_logits = model(**batch).logits.float()
    merged = model.merge_and_unload().eval()
    with torch.inference_mode():
        merged_logits = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = float((adapter_logits - merged_logits).abs()[mask].max())
    log.info("merge parity: max |logit diff| adapter-on-base vs merged = %.3g (bound %.1g)", diff, tolerance)
    if not diff <= tolerance:
        raise KftuneError(
            f"merge parity failed: max |logit difference| {diff:.3g} exceeds {tolerance:g}; "
            f"the adapter in {lora_model} may not belong to {base_model}. Nothing was written."
        )

    dtype = SAVE_DTYPES[save_dtype] or getattr(merged.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with building(out) as staging:
        merged.to(dtype).save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        for carried in (artifacts.CONFIG, artifacts.FINGERPRINT, artifacts.TRAIN_METRICS):
            if Path(adapter, carried).is_file():
                shutil.copy2(Path(adapter, carried), staging / carried)
        report = {
            "base_model": base_model,
            "lora_model": lora_model,
            "max_abs_logit_diff": diff,
            "tolerance": tolerance,
            "saved_dtype": str(dtype).removeprefix("torch."),
        }
        (staging / artifacts.MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("merged model saved to %s", out)
    return MergeResult(out, diff)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kftune merge", description=__doc__.splitlines()[0])
    p.add_argument("--base_model", required=True, help="the base the adapter was trained on (loaded unquantized)")
    p.add_argument("--lora_model", required=True, help="LoRA or QLoRA adapter folder")
    p.add_argument("--output_dir", required=True, help="where the merged model is written")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max |logit difference| allowed")
    p.add_argument("--save_dtype", choices=list(SAVE_DTYPES), default="auto", help="auto keeps the base's dtype")
    p.add_argument(
        ALLOW_FLAG,
        "--allow_template_mismatch",
        dest="allow_template_mismatch",
        action="store_true",
        help="go on when the base's tokenizer or chat template differs from the one the adapter was trained with",
    )
    args = p.parse_args(argv)
    merge(
        args.base_model, args.lora_model, args.output_dir, args.tolerance, args.save_dtype, args.allow_template_mismatch
    )
    return 0
