"""`kftune evaluate`: the base and the tuned model scored on the same held-out data, the same way.

Loss: eval loss and perplexity on assistant tokens only, scored the way training scored them.
Training (trl, `assistant_only_loss=True`) learns only the assistant's tokens of a chat rendered
with a template that marks them with `{% generation %}`; scoring every token would mix in the
prompt, which neither model was asked to predict. So the same template and mask are used here,
and the loss is a token-weighted mean over the whole split (perplexity is its exponential).

Generations: greedy answers to the first N eval prompts, scored against the reference answers
with character-level ROUGE-L and chrF and a set of output checks (kftune.evaluate.scoring). Both models
are prompted with the tokenizer and chat template the tuned model was trained with, checked
against its stored fingerprint. Writes metrics.json, samples.jsonl and report.html.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.atomic import building
from kftune.core.errors import KftuneError
from kftune.core.storage import resolve_path, sha256_file
from kftune.data.formats import Rows, split_sample
from kftune.data.reading import is_text, load_samples, text_blocks
from kftune.evaluate import benchmarks as benchmark
from kftune.evaluate import tool_calls
from kftune.evaluate.report import write_report
from kftune.evaluate.scoring import chrf, load_checks, pass_rates, rouge_l, run_checks
from kftune.models import fingerprint
from kftune.models.infer import generate_reply, has_tokenizer_files, load_for_inference
from kftune.registry.gate import guard_setting
from kftune.train.config import TrainConfig

log = logging.getLogger("kftune")
MASKED = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}  # ids and assistant mask

DEFAULT_MAX_SEQ_LENGTH = 512


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean cross-entropy per assistant token, in nats
    perplexity: float
    tokens: int  # assistant tokens scored
    rows: int


def training_chat_template(tokenizer) -> str | None:
    """The template trl trains with: the tokenizer's own when it marks assistant turns, else trl's patched one."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template:
        raise KftuneError("the tokenizer has no chat template; evaluate an instruct/chat model")
    if has_generation_markers(tokenizer.chat_template):
        return None  # None: apply_chat_template uses the tokenizer's own
    try:
        return get_training_chat_template(tokenizer)
    except ValueError as exc:
        raise KftuneError(f"cannot mask assistant tokens with this tokenizer's chat template ({exc})") from None


def encode(tokenizer, conversations: Rows, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, assistant mask) per row (tools rendered; a text corpus: training's blocks, all scored), cut as trl does."""
    if conversations and is_text(conversations):
        return [(ids, [1] * len(ids)) for ids in text_blocks([s["text"] for s in conversations], tokenizer, max_length)]
    template, encoded = training_chat_template(tokenizer), []
    for sample in conversations:
        messages, tools = split_sample(sample)
        out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, **MASKED)
        encoded.append((list(out["input_ids"])[:max_length], list(out["assistant_masks"])[:max_length]))
    return encoded


def assistant_loss(model, tokenizer, conversations: Rows, max_length: int = 512, batch_size: int = 8) -> LossResult:
    """Mean next-token loss over the assistant tokens of `conversations` (every token of a text corpus)."""
    import torch

    encoded = encode(tokenizer, conversations, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (seq, mask) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            labels[row, : len(seq)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(seq), -100)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        target = labels[:, 1:].to(logits.device)
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        tokens += int((target != -100).sum())
    if tokens == 0:
        raise KftuneError("the eval split has no assistant tokens to score (all truncated away?); raise max_seq_length")
    loss = total / tokens
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, rows=len(encoded))


@dataclass(frozen=True)
class Settings:
    """What decides the numbers besides the models and the data; part of the eval key."""

    max_seq_length: int | None = None  # None: the tuned model's training max_seq_length (else 512)
    samples: int = 8  # greedy generations scored (the first N eval prompts)
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    batch_size: int = 8  # not in the key: it does not change the numbers
    checks: str | None = None  # kftune.scoring.load_checks spec; None: the default checks
    precision: str = "auto"  # resolved (bf16 or fp32 on this device) before the key is made: it moves the numbers

    def key(self, eval_sha256: str) -> str:
        """sha256 of the eval data and every setting that changes a score: equal keys, comparable metrics."""
        fields = {**dataclasses.asdict(self), "checks": [c.name for c in load_checks(self.checks)], "eval": eval_sha256}
        fields.pop("batch_size")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TunedModel:
    """A model to score: a full/merged model folder, or an adapter on `base_model`."""

    folder: Path
    base_model: str  # what the adapter sits on, or the base the model was tuned from
    adapter: bool
    bits: int | None  # a QLoRA adapter is scored on its base quantized as in training
    method: str | None
    max_seq_length: int | None  # from its training config


def describe(model: str, base_model: str | None = None) -> TunedModel:
    """Resolve `model` (adapter folder, merged/full folder or s3:// URI) and what it was trained from."""
    from kftune.models.loading import resolve_model_location  # heavy: imports torch; loaded when used

    folder = Path(resolve_model_location(model, "--model"))
    if not folder.is_dir():
        raise KftuneError(f"--model {model}: not a model folder; give an adapter or model folder or an s3:// URI")
    cfg = TrainConfig.load(folder) if TrainConfig.saved_in(folder) else None
    adapter = (folder / "adapter_config.json").is_file()
    base = base_model or (cfg.base_model if cfg else None)
    if not base:
        raise KftuneError(f"--model {model} records no base model (no {artifacts.CONFIG}); pass --base_model")
    return TunedModel(
        folder,
        base,
        adapter,
        cfg.quantization_bit if cfg and adapter and cfg.use_qlora else None,
        cfg.method if cfg else None,
        cfg.max_seq_length if cfg else None,
    )


def training_tokenizer(candidate: TunedModel, allow_template_mismatch: bool = False):
    """The tokenizer the candidate was trained with, checked against its fingerprint; the base's must match too."""
    from kftune.models.loading import load_tokenizer, resolve_model_location  # heavy: imports torch; loaded when used

    base_location = resolve_model_location(candidate.base_model)
    base_tokenizer = load_tokenizer(base_location)
    fingerprint.check(
        candidate.folder,
        base_tokenizer,
        f"the base model's tokenizer ({candidate.base_model})",
        allow_template_mismatch,
    )
    if not has_tokenizer_files(str(candidate.folder)):
        return base_tokenizer
    tokenizer = load_tokenizer(str(candidate.folder))
    fingerprint.check(
        candidate.folder, tokenizer, f"the tokenizer saved in {candidate.folder}", allow_template_mismatch
    )
    return tokenizer


def score(model, tokenizer, conversations: Rows, settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """(metrics, generated outputs) of one loaded model: answers to the first `samples` prompts, then tool calls."""
    loss = assistant_loss(model, tokenizer, list(conversations), settings.max_seq_length, settings.batch_size)
    gen = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": False,
        "repetition_penalty": settings.repetition_penalty,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    prompts = [] if is_text(conversations) else [split_sample(c) for c in conversations[: settings.samples]]
    outputs = [generate_reply(model, tokenizer, m[:-1], gen, tools=t)[0] for m, t in prompts]
    metrics: dict[str, Any] = {"eval_loss": loss.loss, "perplexity": loss.perplexity, "eval_tokens": loss.tokens}
    if outputs:
        references = [m[-1]["content"] for m, _ in prompts]
        checks = load_checks(settings.checks)
        rouge = rouge_l(outputs, references)
        metrics["rougeL"] = sum(rouge) / len(rouge)
        metrics["chrf"] = chrf(outputs, references)[0]
        rates = pass_rates([run_checks(checks, o) for o in outputs], checks)
        metrics["checks"] = rates
        metrics["checks_pass_rate"] = rates.get("all", 0.0)
    tool_metrics, calls = tool_calls.generate(model, tokenizer, conversations, settings.samples, gen)
    return metrics | tool_metrics, outputs + calls


def score_candidate(
    candidate: TunedModel,
    tokenizer,
    conversations: Rows,
    settings: Settings,
    as_base: bool = False,
    benchmarks: benchmark.Plan | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Load the candidate (or, with `as_base`, its base alone, quantized the same way), score it (and run the
    `benchmarks` on the same loaded model: no second load), free it."""
    adapter = str(candidate.folder) if candidate.adapter else None
    location = candidate.base_model if (as_base or adapter) else str(candidate.folder)
    model, _ = load_for_inference(location, None if as_base else adapter, candidate.bits, settings.precision)
    try:
        metrics, outputs = score(model, tokenizer, conversations, settings)
        if benchmarks is not None:
            metrics["benchmarks"] = benchmark.run(benchmarks, model, tokenizer, settings.batch_size)
        return metrics, outputs
    finally:
        del model
        gc.collect()


def evaluate(
    model: str,
    eval_data: str,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    settings: Settings | None = None,
    validation: str | None = None,
    allow_template_mismatch: bool = False,
    benchmarks: str = "",
    benchmark_limit: int | None = None,
    guard_max_drop: float | None = None,
) -> dict[str, Any]:
    """Score the base and the tuned model; write metrics.json, samples.jsonl and report.html into `output_dir`.

    `validation`: the validation step's report.json (or its folder), for the report's token-length histogram.
    `benchmarks`: lm-eval task names and task folders run on both models (`benchmark_limit` examples each);
    `guard_max_drop` only marks the report's drops beyond the guard (the gate applies it at registration).
    """
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise KftuneError(f"{out}: output_dir already exists and is not empty; choose another --output_dir")
    candidate = describe(model, base_model)
    settings = settings or Settings()
    if settings.max_seq_length is None:
        settings = dataclasses.replace(settings, max_seq_length=candidate.max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
    from kftune.models.loading import pick_runtime

    settings = dataclasses.replace(settings, precision=pick_runtime(settings.precision).precision)
    if settings.samples < 0 or settings.max_new_tokens < 1 or settings.max_seq_length < 1:
        raise KftuneError("--samples must be >= 0, --max_new_tokens and --max_seq_length >= 1")
    eval_path = resolve_path(eval_data)
    conversations = load_samples(eval_path)
    tasks = benchmark.plan(benchmarks, benchmark_limit)  # names and data checked before any model loads
    tokenizer = training_tokenizer(candidate, allow_template_mismatch)
    eval_sha256 = sha256_file(eval_path)

    log.info("scoring the base model %s on %d eval rows", candidate.base_model, len(conversations))
    base, base_outputs = score_candidate(candidate, tokenizer, conversations, settings, as_base=True, benchmarks=tasks)
    log.info("scoring the tuned model %s", model)
    tuned, tuned_outputs = score_candidate(candidate, tokenizer, conversations, settings, benchmarks=tasks)

    checks = load_checks(settings.checks)
    prompts = [] if is_text(conversations) else [split_sample(c)[0] for c in conversations[: settings.samples]]
    samples = [
        {
            "prompt": c[:-1],
            "reference": c[-1]["content"],
            "base_output": b,
            "tuned_output": t,
            "base_checks": run_checks(checks, b),
            "tuned_checks": run_checks(checks, t),
        }
        for c, b, t in zip(prompts, base_outputs[: len(prompts)], tuned_outputs[: len(prompts)], strict=True)
    ] + tool_calls.records(conversations, settings.samples, base_outputs[len(prompts) :], tuned_outputs[len(prompts) :])
    metrics = {
        "model": model,
        "base_model": candidate.base_model,
        "kind": "adapter" if candidate.adapter else "model",
        "method": candidate.method,
        "eval_data": eval_data,
        "eval_sha256": eval_sha256,
        "eval_rows": len(conversations),
        "eval_kind": "text" if is_text(conversations) else "chat",  # text: perplexity on held-out documents
        "eval_key": settings.key(eval_sha256),
        "settings": {**dataclasses.asdict(settings), "check_names": [c.name for c in checks]},
        "template_fingerprint": fingerprint.compute(tokenizer)["fingerprint"],
        "base": base,
        "tuned": tuned,
        "reference_checks": pass_rates([run_checks(checks, c[-1]["content"]) for c in prompts], checks),
    }
    if tasks is not None:
        metrics["benchmarks"] = benchmark.compare(base.pop("benchmarks"), tuned.pop("benchmarks"))
        metrics["benchmark_settings"] = tasks.settings() | {"guard_max_drop": guard_setting(guard_max_drop)}
    training = candidate.folder / artifacts.TRAIN_METRICS
    with building(out) as staging:
        (staging / artifacts.EVAL_METRICS).write_text(
            json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (staging / artifacts.SAMPLES).write_text(
            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8"
        )
        write_report(
            staging / artifacts.REPORT,
            metrics,
            samples,
            training=json.loads(training.read_text(encoding="utf-8")) if training.is_file() else None,
            validation=_validation_report(validation),
        )
    log.info("eval loss base %.4f -> tuned %.4f; written to %s", base["eval_loss"], tuned["eval_loss"], out)
    return metrics


def rescore_model(model: str, evaluation: dict[str, Any], base_model: str | None = None) -> dict[str, Any]:
    """The tuned-side metrics of `model` on the eval data and with the settings an earlier evaluation recorded,
    so a registered champion can be compared with a new candidate like for like."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    recorded = {k: v for k, v in evaluation["settings"].items() if k in fields}
    settings = Settings(**recorded)
    candidate = describe(model, base_model)
    conversations = load_samples(resolve_path(evaluation["eval_data"]))
    tokenizer = training_tokenizer(candidate)
    return score_candidate(candidate, tokenizer, conversations, settings)[0]


def _validation_report(location: str | None) -> dict[str, Any] | None:
    if not location:
        return None

    path = Path(resolve_path(location))
    path = path / artifacts.VALIDATION_REPORT if path.is_dir() else path
    if not path.is_file():
        raise KftuneError(f"--validation {location}: no report.json there; give the validate-data output folder")
    return json.loads(path.read_text(encoding="utf-8"))
