"""Inference: a base model plus an optional LoRA adapter; one prompt, a demo set, or an interactive chat.

The chat template comes from the adapter folder when it has tokenizer files (saved at training),
so the model is prompted exactly as it was trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kftune.core.errors import KftuneError
from kftune.models import fingerprint

log = logging.getLogger("kftune")

DEMO_PROMPTS = [
    "为这家店写一篇小红书探店笔记。\n店名：山野咖啡\n品类：咖啡馆\n城市：成都\n亮点：手冲单品、露台、安静适合办公\n人均：45元",
    "为这家店写一篇小红书探店笔记。\n店名：小满烘焙\n品类：面包店\n城市：杭州\n亮点：碱水结、现烤可颂\n人均：38元",
]
CHAT_HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


def has_tokenizer_files(folder: str | None) -> bool:
    return bool(folder) and Path(folder, "tokenizer_config.json").is_file()


def checked_tokenizer(model_dir: str, base: str | None = None, allow_template_mismatch: bool = False):
    """The tokenizer to prompt the model in `model_dir` with: its own saved one, else the base's.

    Every tokenizer involved (that one, and the base's) must match the fingerprint saved with the
    model at training, unless `allow_template_mismatch`; a folder kftune did not train is not checked.
    """
    from kftune.models.loading import load_tokenizer  # heavy: imports torch; loaded when used

    own = has_tokenizer_files(model_dir)
    tokenizer = load_tokenizer(model_dir if own or not base else base)
    where = f"the tokenizer saved in {model_dir}" if own or not base else f"the base model's tokenizer ({base})"
    fingerprint.check(model_dir, tokenizer, where, allow_template_mismatch)
    if base and own and base != model_dir:
        fingerprint.check(
            model_dir, load_tokenizer(base), f"the base model's tokenizer ({base})", allow_template_mismatch
        )
    return tokenizer


def load_for_inference(
    base_model: str,
    lora_model: str | None = None,
    bits: int | None = None,
    precision: str = "auto",
    allow_template_mismatch: bool = False,
):
    """(model, tokenizer) ready for generation; the adapter's saved tokenizer wins over the base's."""
    from kftune.models.loading import (  # heavy: imports torch; loaded when used
        compute_as_in_training,
        load_adapter,
        load_model,
        pick_runtime,
        prepare_quantized,
        resolve_model_location,
    )

    runtime = pick_runtime(precision)
    base = resolve_model_location(base_model)
    adapter = resolve_model_location(lora_model, "--lora_model") if lora_model else None
    if adapter and not Path(adapter, "adapter_config.json").is_file():
        raise KftuneError(f"{lora_model}: no adapter_config.json; --lora_model must be a LoRA output folder")
    tokenizer = (
        checked_tokenizer(adapter, base, allow_template_mismatch)
        if adapter
        else checked_tokenizer(base, None, allow_template_mismatch)
    )
    model = load_model(base, runtime, dtype=None if adapter else trained_weights_dtype(base), quantization_bit=bits)
    if bits:
        model = prepare_quantized(model, runtime.precision)
    if adapter:
        model = load_adapter(model, adapter)
        match_adapter_dtype(model, adapter)
    model.eval()
    return compute_as_in_training(model, runtime), tokenizer


def trained_weights_dtype(folder: str):
    """fp32 for a model kftune fully fine-tuned (it trains fp32 master weights, bf16 only as autocast), else None.

    None loads in the runtime's dtype, as training loads a LoRA/QLoRA base.
    """
    import torch

    from kftune.train.config import TrainConfig

    full = TrainConfig.saved_in(folder) and TrainConfig.load(folder).method == "full"
    return torch.float32 if full else None


def match_adapter_dtype(model, adapter_dir: str) -> None:
    """Compute the adapter in the dtype it was trained and saved in.

    trl trains QLoRA adapters in bf16, and peft upcasts them to fp32 on load (its
    autocast_adapter_dtype=False is ignored for quantized bases), which shifts logits by ~1e-3.
    """
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir, "adapter_model.safetensors")), framework="pt") as f:
        saved = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    if saved == {"BF16"}:
        import torch

        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)


def generate_reply(
    model, tokenizer, messages: list[dict], gen_kwargs: dict, stream: bool = False, tools: list[dict] | None = None
) -> tuple[str, int]:
    """(reply text, prompt length in tokens) for a conversation that ends with the user's (or a tool's) turn;
    `tools` are rendered by the chat template, and a call comes back as the template's text (<tool_call> ...)."""
    import torch
    from transformers import TextStreamer

    inputs = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in tokenizer.get_vocab()
            else tokenizer.eos_token_id,
            **gen_kwargs,
        )
    prompt_len = inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True).strip(), prompt_len


def chat(model, tokenizer, gen_kwargs: dict, system: str | None) -> None:
    """Interactive loop: keeps the history, streams tokens, /reset, /exit, Ctrl-D."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    base_len = len(history)
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("\nuser> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in {"/exit", "/quit"}:
            return
        if line == "/reset":
            del history[base_len:]
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply, prompt_len = generate_reply(model, tokenizer, history, gen_kwargs, stream=True)
        history.append({"role": "assistant", "content": reply})
        turns = (len(history) - base_len) // 2
        print(f"[turn {turns}: {prompt_len} prompt tokens incl. history]", file=sys.stderr)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate with a base model and an optional LoRA adapter.")
    p.add_argument("--base_model", required=True, help="base model: local folder, hub id or s3:// URI")
    p.add_argument("--lora_model", help="LoRA adapter folder (a training output_dir)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load_in_4bit", action="store_true", help="load the base quantized to 4-bit NF4")
    quant.add_argument("--load_in_8bit", action="store_true", help="load the base quantized to 8-bit")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="answer this one prompt, then exit")
    mode.add_argument("--chat", action="store_true", help="interactive chat that keeps history")
    p.add_argument("--system", help="system message (default: the chat template's)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument(
        "--do_sample", choices=["true", "false"], default="true", help="sample (true) or greedy decode (false)"
    )
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    p.add_argument(
        "--allow-template-mismatch",
        "--allow_template_mismatch",
        dest="allow_template_mismatch",
        action="store_true",
        help="go on when the tokenizer or chat template differs from the training one",
    )
    return p


def generation_kwargs(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        raise KftuneError("--max_new_tokens must be >= 1")
    kwargs: dict = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    if args.do_sample == "true":
        if args.temperature <= 0 or not 0 < args.top_p <= 1:
            raise KftuneError(
                "--temperature must be > 0 and --top_p in (0, 1] when sampling; or pass --do_sample false"
            )
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def main(argv: list[str]) -> int:
    args = build_parser("inference_lora.py").parse_args(argv)
    gen_kwargs = generation_kwargs(args)
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    model, tokenizer = load_for_inference(
        args.base_model, args.lora_model, bits, args.precision, args.allow_template_mismatch
    )
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.chat:
        chat(model, tokenizer, gen_kwargs, args.system)
    elif args.prompt:
        print(generate_reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}], gen_kwargs)[0])
    else:
        for prompt in DEMO_PROMPTS:
            print(f"user> {prompt}\nassistant> ", end="", flush=True)
            generate_reply(model, tokenizer, system + [{"role": "user", "content": prompt}], gen_kwargs, stream=True)
            print()
    return 0
