"""Training: full, LoRA and QLoRA on one path (QLoRA = LoRA + a quantization config).

Reads top to bottom: resolve config -> load data -> load model -> wrap with LoRA -> train with
trl's SFTTrainer (loss on assistant tokens only) -> save into a staging folder -> move into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kftune.core import allocator, artifacts
from kftune.core.atomic import building, staging_dir
from kftune.core.errors import KftuneError
from kftune.core.levers import levers_on
from kftune.data.reading import is_text, load_samples, text_dataset, to_dataset
from kftune.data.rules import Options
from kftune.models import fingerprint
from kftune.train.config import TrainConfig, parse_args
from kftune.train.handback import publish
from kftune.train.measure import peak_memory, reset_peak_memory
from kftune.train.mixed_rows import mixed_training_rows
from kftune.train.nodes import (
    Place,
    count_tokens,
    join_cpu_group,
    local_data,
    lost_peer,
    once_per_node,
    parallelism,
)
from kftune.train.preflight import check as memory_preflight

log = logging.getLogger("kftune")


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


def check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        raise KftuneError(
            f"{out}: output_dir already exists and is not empty; choose another --output_dir "
            "or pass --overwrite_output_dir to replace it"
        )
    return out


def build_model(cfg: TrainConfig, runtime, location: str):
    """The model to train: full-precision for full fine-tuning, frozen (maybe quantized) base + LoRA otherwise."""
    import torch

    from kftune.models.loading import (  # heavy: imports torch; loaded when used
        enable_checkpointing,
        find_linear_targets,
        load_model,
        prepare_quantized,
    )

    if cfg.method == "full":
        # fp32 master weights; bf16 runs as autocast so optimizer updates stay exact
        model = load_model(location, runtime, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        return model, []
    from peft import LoraConfig, get_peft_model

    from kftune.train.lora_dropout import install as install_dropout

    bits = cfg.quantization_bit if cfg.use_qlora else None
    model = load_model(location, runtime, quantization_bit=bits, trust_remote_code=cfg.trust_remote_code)
    if bits:
        model = prepare_quantized(model, runtime.precision, cfg.gradient_checkpointing)
    targets = cfg.target_modules()
    if targets is None:
        targets = find_linear_targets(model)
        log.info("lora_target_modules: null -> found linear layers %s", ",".join(targets))
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n, _ in model.named_modules())]
    if missing:
        raise KftuneError(
            f"lora_target_modules: {', '.join(missing)} not found in {cfg.base_model}; "
            f"its linear layers are {','.join(find_linear_targets(model))}"
        )
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "").rsplit(".", 1)[-1]
    if head in targets:
        raise KftuneError(
            f"lora_target_modules: {head} is {cfg.base_model}'s output head, which trl's loss reads directly and "
            f"refuses LoRA on; leave it out (null targets every linear layer but the head: "
            f"{','.join(find_linear_targets(model))})"
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing and not bits:
        enable_checkpointing(model)  # kftune's own, not left to trl or peft: see enable_checkpointing
    install_dropout(model)  # the same dropout from a cheaper mask (CPU)
    return model, targets


def sft_config(cfg: TrainConfig, runtime, checkpoint_dir: Path, has_eval: bool, text: bool = False):
    from transformers.utils import is_liger_kernel_available
    from trl import SFTConfig

    # Padding-free batches come from `data_collator` below: trl's own `padding_free` flag refuses a
    # max_length without packing, although it truncates to max_length all the same.
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        max_length=cfg.max_seq_length,
        assistant_only_loss=not text,  # a text corpus (continued pretraining) learns every token
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio in transformers 5
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # build_model turns checkpointing on itself (kftune.models.loading.enable_checkpointing), reentrant
        gradient_checkpointing=False,
        bf16=runtime.precision == "bf16",
        fp16=runtime.precision == "fp16",
        use_cpu=runtime.device == "cpu",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # real tokens trained on, for tokens/s
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under torchrun: every trainable parameter gets a gradient
        ddp_timeout=cfg.ddp_timeout,  # a lost or silent node fails the run in this time, not torch's 30 minutes
        # FSDP2 (one unit per transformer block, gathered to rank 0 to save) or replicas (DDP): nodes.parallelism
        fsdp=parallelism(cfg.method, runtime.device) == "fsdp",
        fsdp_config={"state_dict_type": "FULL_STATE_DICT"},
        # fused Triton kernels (less memory, faster) when a liger-kernel version the Trainer accepts is installed
        use_liger_kernel=runtime.device == "cuda" and is_liger_kernel_available(),
    )


def data_collator(cfg: TrainConfig, tokenizer):
    """Padding-free batches (no compute spent on padding): a batch's sequences side by side in one row.

    Position ids restart at 0 for each sequence, so attention never crosses from one sequence into
    the next (transformers builds a block-diagonal causal mask from them) and each first token is
    not predicted from its neighbour. None keeps trl's padded batches.
    """
    if not cfg.padding_free:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)


def check_rows_kept(cfg: TrainConfig, flag: str, rows: int, kept: int) -> None:
    """trl drops a row whose answer is cut off entirely by max_seq_length; all of them dropped is an error."""
    if kept == rows:
        return
    where = f"{getattr(cfg, flag)} (--{flag})"
    if kept == 0:
        raise KftuneError(
            f"{where}: none of its {rows} rows has an answer token left within max_seq_length="
            f"{cfg.max_seq_length} (the prompts alone are longer); raise --max_seq_length "
            "(`kftune validate-data DATA --base_model M` prints the token lengths)"
        )
    log.warning(
        "%s: %d of %d rows had no answer token left within max_seq_length=%d and were dropped",
        where,
        rows - kept,
        rows,
        cfg.max_seq_length,
    )


def check_template(cfg: TrainConfig, tokenizer, rows: list, text: bool) -> None:
    """Chat rows need the tokenizer's chat template, and rows with tools a template that renders them;
    a text corpus needs neither (a base model without a template is fine)."""
    from kftune.data.token_counting import template_renders_tools

    if text:
        return
    if not tokenizer.chat_template:
        raise KftuneError(
            f"{cfg.base_model}: the tokenizer has no chat template; use an instruct/chat model, "
            'or train on {"text"} rows (continued pretraining)'
        )
    if any(r.get("tools") for r in rows) and not template_renders_tools(tokenizer):
        raise KftuneError(
            f"{cfg.base_model}: the chat template ignores `tools`, so the tool rows in {cfg.data_path} would train "
            "without their function schemas; use a base model whose template renders tools (Qwen2.5's does)"
        )


def loss_history(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def run(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train per `cfg`; the output_dir appears only when everything is saved.

    `callbacks` are transformers TrainerCallbacks (tests use them to watch parameters).
    """
    from kftune.models.loading import (  # heavy: imports torch; loaded when used
        count_parameters,
        load_tokenizer,
        pick_runtime,
        resolve_model_location,
    )

    # everything that can fail on bad input is checked before anything heavy is imported or written
    levers = levers_on()  # refuses a KFTUNE_LEVERS_OFF that names no lever
    out = check_output_dir(cfg)
    cfg = local_data(cfg)  # s3:// data (a multi-node run's config names the split's artifacts): downloaded once
    runtime = pick_runtime(cfg.precision)
    train_rows = load_samples(cfg.data_path)
    eval_rows = load_samples(cfg.eval_data_path) if cfg.eval_data_path else None
    text = is_text(train_rows)
    if eval_rows and is_text(eval_rows) != text:
        raise KftuneError(
            f"{cfg.eval_data_path} (--eval_data_path) is {'text' if not text else 'chat'} rows while "
            f"{cfg.data_path} (--data_path) is not; give both in one format"
        )
    location = resolve_model_location(cfg.base_model)
    mix_reports = Path(tempfile.mkdtemp(prefix="kftune-mix-"))
    train_rows, mix_record = mixed_training_rows(
        train_rows,
        cfg.data_mix,
        cfg.seed,
        Options(tokenizer=location, max_seq_length=cfg.max_seq_length, eval_fraction=0.0),
        mix_reports,
    )  # the gate on every source before the model loads; the eval rows stay the task's own
    cfg = memory_preflight(cfg, location, runtime)  # may turn on checkpointing; refuses what cannot fit
    if cfg.use_qlora:
        from kftune.models.loading import check_bitsandbytes  # heavy: imports torch; loaded when used

        check_bitsandbytes()
    from trl import SFTTrainer

    from kftune.train import packed_attention
    from kftune.train.checkpoints import PublishCheckpoints, Store, step_of  # imports transformers' Trainer: seconds
    from kftune.train.lm_head_loss import (
        install as install_lm_head,  # chunked head on labelled positions (trl's is patched first)
    )

    tokenizer = load_tokenizer(location, cfg.trust_remote_code)
    check_template(cfg, tokenizer, train_rows, text)

    log.info("method %s on %s (%s), %d training rows", cfg.method, runtime.device, runtime.precision, len(train_rows))
    reset_peak_memory(runtime.device)  # the peak of loading and training this model, nothing before
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's initial weights are random: seeded, a run is reproducible (and a restart matches it)
    model, targets = build_model(cfg, runtime, location)
    trainable, total = count_parameters(model)
    log.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    # under torchrun (one node or several) every process trains, only the world's process zero writes
    main = Place.from_env().rank == 0
    store = Store.for_run(cfg) if cfg.checkpoint_uri else None
    with (
        building(out) if main else contextlib.nullcontext(staging_dir(out)) as staging,
        tempfile.TemporaryDirectory(prefix="kftune-resume-") as downloads,
    ):
        join_cpu_group(cfg.ddp_timeout, runtime.device)
        args = sft_config(cfg, runtime, staging / "checkpoints", eval_rows is not None, text)  # joins the group
        # each node's local rank 0 downloads; refuses a checkpoint that is unsafe to load
        resume = once_per_node(lambda: store.latest(Path(downloads))) if store else None
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=text_dataset(train_rows, tokenizer, cfg.max_seq_length) if text else to_dataset(train_rows),
            eval_dataset=(text_dataset(eval_rows, tokenizer, cfg.max_seq_length) if text else to_dataset(eval_rows))
            if eval_rows
            else None,
            processing_class=tokenizer,
            data_collator=data_collator(cfg, tokenizer),
            callbacks=[*(callbacks or []), *([PublishCheckpoints(store)] if store else [])],
        )
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        applied = {
            "lm_head": install_lm_head(base),
            "packed_attention": packed_attention.install(base),  # one conversation at a time, padding-free
        }
        if not text:  # documents are cut into blocks: every token is kept
            check_rows_kept(cfg, "data_path", len(train_rows), len(trainer.train_dataset))
        if eval_rows and not text:
            check_rows_kept(cfg, "eval_data_path", len(eval_rows), len(trainer.eval_dataset))
        started, own_tokens = time.perf_counter(), count_tokens(trainer.model)
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            packed_attention.uninstall(base)
        elapsed = time.perf_counter() - started
        log.info("%s trained on %d tokens of its own", Place.from_env().describe(), own_tokens())
        peak, tokens = peak_memory(runtime.device), trainer.state.num_input_tokens_seen
        eval_metrics = trainer.evaluate() if eval_rows else {}

        trainer.save_model(str(staging))  # every process takes part (FSDP gathers); process zero writes
        trainer.accelerator.wait_for_everyone()  # no process still writes a checkpoint when it is removed
        history = loss_history(trainer.state.log_history)
        metrics = {
            "method": cfg.method,
            "quantization_bit": cfg.quantization_bit if cfg.use_qlora else None,
            "lora_r": cfg.lora_r if cfg.uses_adapter else None,
            "target_modules": targets,
            "device": runtime.device,
            "precision": runtime.precision,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total,
            "train_rows": len(train_rows),
            "data_mix": mix_record,  # [] without a mix; else per source: uri, sha256, weight, rows drawn
            "data_kind": "text" if text else "chat",  # text: continued pretraining, loss on every token
            "processes": trainer.args.world_size,
            "parallelism": "fsdp" if trainer.is_fsdp_enabled else "ddp" if trainer.args.world_size > 1 else None,
            "global_steps": result.global_step,
            "resumed_from_step": step_of(resume) if resume else None,
            "train_loss": result.training_loss,
            "first_loss": history[0][1] if history else None,
            "last_loss": history[-1][1] if history else None,
            "loss_history": history,
            "eval_loss_history": loss_history(trainer.state.log_history, "eval_loss"),
            "train_seconds": round(elapsed, 3),
            "train_tokens": tokens,  # non-padding input tokens, all processes
            "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
            "peak_memory_bytes": peak.bytes,  # this process's (process zero's device's) peak
            "peak_memory_source": peak.source,
            "levers_on": levers,  # KFTUNE_LEVERS_OFF's complement (kftune.core.levers)
            "levers_applied": applied | {"allocator": allocator.in_use()},  # head, attention path, malloc
            **{k: v for k, v in eval_metrics.items() if k in ("eval_loss",)},
        }
        if main:
            tokenizer.save_pretrained(str(staging))
            # infer/merge/evaluate refuse another template; the mix drawn is recorded beside it
            fingerprint.write(staging, tokenizer, cfg.base_model, data_mix=mix_record)
            for report in mix_reports.glob("source-*/report.*"):  # each source's own gate report
                (staging / "data_mix" / report.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(report, staging / "data_mix" / report.parent.name / report.name)
            shutil.rmtree(staging / "checkpoints", ignore_errors=True)
            # a pickle (unsafe to load) and peft's placeholder card: neither belongs in a published model
            for leftover in ("training_args.bin", "README.md"):
                (staging / leftover).unlink(missing_ok=True)
            cfg.save(staging)
            (staging / artifacts.TRAIN_METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(mix_reports, ignore_errors=True)
    if main and cfg.publish_to:
        published = publish(out, cfg.publish_to)  # how a run on other machines hands its output back
        log.info("published the output to %s", published.uri)
    if main and store:
        store.clear()  # the output is in place: the run's checkpoints have served their purpose
    if main:
        log.info(
            "saved %s run to %s (loss %.4f -> %.4f)",
            cfg.method,
            out,
            metrics["first_loss"] or 0,
            metrics["last_loss"] or 0,
        )
    return TrainResult(out, metrics)


def main(argv: list[str]) -> int:
    cfg = parse_args(
        argv, prog="fine_tune_qwen.py", description="Fine-tune a causal LM with full, LoRA or QLoRA training."
    )
    try:
        run(cfg)
    except Exception as exc:  # a lost node: one line naming this node, not a collective's traceback
        lost = lost_peer(exc, cfg.ddp_timeout)
        if lost is None:
            raise
        raise lost from None
    return 0
