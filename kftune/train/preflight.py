"""Memory pre-flight: estimate a training run's peak memory from numbers alone, before loading anything.

A run that cannot fit should fail in a second with what would fit, not after minutes of loading
and a kernel OOM kill. The estimate is a pure function of the model config (sizes only), the
method, bits, rank, batch, sequence length, checkpointing and precision:

    weights (fp32 master weights for full; the frozen base in the compute dtype, 4-bit or 8-bit
    for LoRA / QLoRA) + trainable state (parameters, gradients, AdamW's two moments)
    + activations saved for backward (per token and layer) + runtime (CPU: the process itself)

Activation sizes per token and layer were measured on Qwen2 decoders of several widths (the bytes
of every tensor autograd saves, with trl's chunked LM head, which never holds the full logits);
`bench/memory_table.py` and tests/test_preflight.py compare the total with measured peaks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kftune.core.errors import KftuneError

if TYPE_CHECKING:
    from kftune.models.loading import Runtime
    from kftune.train.config import TrainConfig

log = logging.getLogger("kftune")

GiB = 2**30
# torch + transformers + peft + trl + datasets imported, plus the trainer's own buffers: what a CPU
# training process holds before its model (measured RSS; on CUDA the process lives in host memory)
CPU_RUNTIME_BYTES = int(0.55 * GiB)
# the CUDA context and allocator slack outside torch.cuda.max_memory_allocated
CUDA_RESERVE_BYTES = int(0.6 * GiB)
LM_HEAD_CHUNK_ELEMENTS = 2**25  # kftune.train.lm_head_loss.CHUNK_ELEMENTS: logits held per chunk of tokens
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Activation bytes saved per token per decoder layer: a*hidden + b*intermediate + c*kv_width
# (kv_width = head_dim * kv_heads), by method and compute dtype. LoRA adds its dropout copies.
_ACTIVATIONS = {
    ("full", 4): (32, 16, 8),
    ("lora", 4): (62, 21, 8),
    ("qlora", 4): (39, 17, 8),
    ("full", 2): (34, 14, 8),
    ("lora", 2): (50, 12.5, 4),
    ("qlora", 2): (37, 16, 4),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.head_dim * self.kv_heads

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, f, kv = self.hidden, self.intermediate, self.kv_width
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' projections: what QLoRA quantizes."""
        return self.layers * sum(i * o for i, o in self.linear_dims().values())

    @property
    def other_params(self) -> int:
        """Embedding (+ LM head when untied), norms and the q/k/v biases: kept in floating point."""
        per_layer = 2 * self.hidden + self.hidden + 2 * self.kv_width
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * per_layer + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, rank: int, targets: list[str] | None) -> int:
        dims = self.linear_dims()
        names = [t for t in (targets or PROJECTIONS) if t in dims]
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in names)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (or anything with its attribute names)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            vocab=text.vocab_size,
            tied=bool(getattr(text, "tie_word_embeddings", True)),
        )


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # what -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def render(self) -> str:
        parts = ", ".join(f"{name} {size / GiB:.2f}" for name, size in self.parts.items() if size)
        return f"{self.total / GiB:.2f} GiB ({parts})"


def estimate(
    shape: ModelShape,
    *,
    method: str,
    batch: int,
    seq: int,
    precision: str = "fp32",
    bits: int | None = None,
    lora_r: int = 64,
    targets: list[str] | None = None,
    checkpointing: bool = False,
    device: str = "cpu",
) -> Estimate:
    """Peak memory of one training process, in bytes by part. `device` cpu counts the process itself."""
    compute = 4 if precision == "fp32" else 2
    lora = shape.lora_params(lora_r, targets) if method != "full" else 0
    if method == "full":
        weights = 4 * shape.params  # fp32 master weights; bf16 runs as autocast
        if compute == 2:
            weights += 2 * (
                shape.linear_params + shape.vocab * shape.hidden
            )  # autocast's bf16 copies, kept for backward
        optimizer, gradients = 8 * shape.params, 4 * shape.params  # AdamW's two moments and the gradients, fp32
    elif method == "lora":
        weights = compute * shape.params + 4 * lora  # peft keeps adapters in fp32
        optimizer, gradients = 8 * lora, 4 * lora
    else:
        per_weight = 0.5 + 1 / 64 + 4 / (64 * 256) if bits == 4 else 1 + 4 / shape.hidden  # NF4 + double-quant scales
        # what is not quantized stays in the training precision (kftune.models.loading.prepare_quantized); trl makes adapters bf16
        weights = int(per_weight * shape.linear_params) + compute * shape.other_params + 2 * lora
        optimizer, gradients = 4 * lora, 2 * lora
    a, b, c = _ACTIVATIONS[(method if method in ("full", "lora") else "qlora", compute)]
    per_layer = a * shape.hidden + b * shape.intermediate + c * shape.kv_width
    if method == "lora":
        per_layer += 4 * len(targets or PROJECTIONS) * lora_r  # each adapter's rank-r intermediate
    tokens = batch * seq
    activations = tokens * (shape.layers + 1) * per_layer  # plus about one layer's gradients in flight in backward
    if checkpointing:  # each layer keeps its input and one layer is rebuilt at a time (kftune checkpoints
        # reentrantly; transformers' non-reentrant default kept about a quarter more on the 0.5B shape)
        activations = tokens * (shape.layers * compute * shape.hidden + 2 * per_layer)
    activations += tokens * 24 * shape.hidden  # embeddings, final norm, hidden states into the LM head
    # kftune.train.lm_head_loss: a chunk of tokens' fp32 logits and their exponent at a time, plus the
    # matmul's own output when it computes in bf16 (half an fp32 buffer)
    copies = 2.0 if compute == 4 else 2.5
    head = int(copies * min(tokens, max(1, LM_HEAD_CHUNK_ELEMENTS // shape.vocab)) * shape.vocab * 4)
    # backward frees activations as it fills the gradients (set to None after each step): the peak holds
    # the larger of the two, so gradients count only beyond the activations
    parts = {
        "weights": int(weights),
        "optimizer": int(optimizer),
        "activations": int(activations),
        "lm head": head,
        "gradients": int(max(0, gradients - activations - head)),
        "runtime": CPU_RUNTIME_BYTES if device == "cpu" else 0,
    }
    return Estimate(parts)


def estimate_for(cfg: TrainConfig, location: str, device: str = "cpu", precision: str | None = None) -> Estimate:
    """The estimate for a config and a model folder or hub id (reads only its config.json)."""
    from kftune.models.loading import pick_runtime  # heavy: imports torch; loaded when used

    return estimate(
        model_shape(location, cfg.trust_remote_code),
        method=cfg.method,
        batch=cfg.per_device_train_batch_size,
        seq=cfg.max_seq_length,
        precision=precision or pick_runtime(cfg.precision).precision,
        bits=cfg.quantization_bit if cfg.use_qlora else None,
        lora_r=cfg.lora_r,
        targets=cfg.target_modules(),
        checkpointing=cfg.gradient_checkpointing,
        device=device,
    )


def model_shape(location: str, trust_remote_code: bool = False) -> ModelShape:
    """The sizes in a model's config.json (a local folder, or a hub id's config alone)."""
    from transformers import AutoConfig

    try:
        return ModelShape.from_config(AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code))
    except (OSError, ValueError, AttributeError) as exc:
        raise KftuneError(f"{location}: could not read the model's sizes from its config ({exc})") from None


def device_memory(device: str) -> tuple[int, str]:
    """(bytes this process may use, where that number comes from)."""
    if device == "cuda":
        import torch

        gpu = int(
            os.environ.get("LOCAL_RANK", "0")
        )  # this process's GPU under `kftune launch`, as load_model places it
        free, total = torch.cuda.mem_get_info(gpu)
        return free - CUDA_RESERVE_BYTES, f"free memory of GPU {gpu} ({total / GiB:.1f} GiB in all)"
    import psutil

    own = psutil.Process().memory_info().rss
    available, where = psutil.virtual_memory().available + own, "available RAM"
    limit = _cgroup_room()
    if limit is not None and limit + own < available:
        available, where = limit + own, "the container's memory limit"
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes of one `kftune launch` share the RAM
    if share > 1:
        available, where = available // share, f"{where}, shared by {share} processes"
    return available, where


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (a Kubernetes pod's), or None without one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def alternatives(cfg: TrainConfig, fits) -> list[str]:
    """Flag sets that would fit (`fits(cfg) -> Estimate | None`), cheapest change first."""
    options: list[tuple[str, TrainConfig]] = []
    if not cfg.gradient_checkpointing:
        options.append(("--gradient_checkpointing true", replace(cfg, gradient_checkpointing=True)))
    batch, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    while batch > 1:
        batch //= 2
        accum *= 2
        flags = f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accum}"
        options.append(
            (
                flags,
                replace(
                    cfg,
                    per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accum,
                    gradient_checkpointing=True,
                ),
            )
        )
        if not cfg.gradient_checkpointing:
            options[-1] = (f"{flags} --gradient_checkpointing true", options[-1][1])
    if cfg.method != "qlora":
        options.append(
            ("--use_qlora true --quantization_bit 4", replace(cfg, use_lora=False, use_qlora=True, quantization_bit=4))
        )
        options.append(
            (
                "--use_qlora true --quantization_bit 4 --gradient_checkpointing true",
                replace(cfg, use_lora=False, use_qlora=True, quantization_bit=4, gradient_checkpointing=True),
            )
        )
    found = []
    for flags, candidate in options:
        result = fits(candidate)
        if result is not None:
            found.append(f"{flags} (~{result.total / GiB:.1f} GiB)")
    return found[:3]


def check(cfg: TrainConfig, location: str, runtime: Runtime) -> TrainConfig:
    """Log the estimate; turn on checkpointing when only that makes it fit; refuse what cannot fit unless `force`.

    Returns the config to train with (the same one, or with gradient_checkpointing on).
    """
    try:
        shape = model_shape(location, cfg.trust_remote_code)
    except KftuneError as exc:  # an architecture without the usual size names: loading will tell
        log.warning("memory pre-flight skipped: %s", exc)
        return cfg

    def estimate_of(candidate: TrainConfig) -> Estimate:
        return estimate(
            shape,
            method=candidate.method,
            batch=candidate.per_device_train_batch_size,
            seq=candidate.max_seq_length,
            precision=runtime.precision,
            bits=candidate.quantization_bit if candidate.use_qlora else None,
            lora_r=candidate.lora_r,
            targets=candidate.target_modules(),
            checkpointing=candidate.gradient_checkpointing,
            device=runtime.device,
        )

    need = estimate_of(cfg)
    room, where = device_memory(runtime.device)
    log.info(
        "memory pre-flight: estimated peak %s for %s, batch %d x %d tokens; %s: %.2f GiB",
        need.render(),
        cfg.method,
        cfg.per_device_train_batch_size,
        cfg.max_seq_length,
        where,
        room / GiB,
    )
    if need.total <= room:
        return cfg
    if not cfg.gradient_checkpointing:
        with_checkpoints = replace(cfg, gradient_checkpointing=True)
        if estimate_of(with_checkpoints).total <= room:
            log.info(
                "memory pre-flight: turning on gradient_checkpointing, which brings the estimate to %s",
                estimate_of(with_checkpoints).render(),
            )
            return with_checkpoints
    if cfg.force:
        log.warning("memory pre-flight: the estimate exceeds %s; training anyway (force)", where)
        return cfg

    def fits(candidate: TrainConfig) -> Estimate | None:
        result = estimate_of(candidate)
        return result if result.total <= room else None

    fitting = alternatives(cfg, fits)
    hint = (
        ("; settings that would fit: " + "; ".join(fitting)) if fitting else "; no smaller setting of this method fits"
    )
    raise KftuneError(
        f"memory pre-flight: this run needs about {need.total / GiB:.1f} GiB ({cfg.method}, batch "
        f"{cfg.per_device_train_batch_size} x {cfg.max_seq_length} tokens) but {where} is {room / GiB:.1f} GiB"
        f"{hint}; or pass --force true to try anyway"
    )
