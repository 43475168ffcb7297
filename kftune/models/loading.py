"""Load a base model and tokenizer (local folder, hub id or s3:// URI), quantize it, find LoRA targets.

Kept apart from training so inference, merging and evaluation load models exactly the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kftune.core.errors import KftuneError
from kftune.core.levers import lever_on
from kftune.core.storage import resolve_path

log = logging.getLogger("kftune")


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision to compute; decided once per process."""

    device: str  # "cuda" or "cpu"
    precision: str  # "bf16", "fp32" or "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]


def cpu_supports_bf16() -> bool:
    """bf16 is only fast on CPUs with native bf16 instructions that torch uses; elsewhere fp32 is faster and exact.

    torch dispatches to the capability it reports, which ATEN_CPU_CAPABILITY can lower (to avx2, say): then
    bf16 runs without those instructions, as on a CPU that lacks them, and auto picks fp32 as it would there.
    """
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check()) and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def pick_runtime(precision: str = "auto") -> Runtime:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise KftuneError("precision fp16 is not supported on CPU (it is ~400x slower there); use bf16, fp32 or auto")
    return Runtime(device=device, precision=precision)


def compute_as_in_training(model, runtime: Runtime):
    """Run `model`'s forward (and so `generate`) under autocast in the training precision, as the Trainer did.

    Training in bf16 or fp16 is mixed precision: accelerate wraps the model's forward in autocast, so the
    losses training reports, and the logits of its final evaluation, come from that compute path. A model
    loaded for inference computes the same way, so a reloaded adapter reproduces the trained model's
    logits bit for bit rather than to within bf16 rounding. The innermost transformers model is wrapped,
    so a peft model's `generate` (which calls it directly) computes this way too.
    """
    if runtime.precision == "fp32":
        return model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "_kftune_autocast", False):
        inner.forward = torch.autocast(runtime.device, dtype=runtime.dtype)(inner.forward)
        inner._kftune_autocast = True
    return model


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model_location(name: str, flag: str = "--base_model") -> str:
    """A local folder, a downloaded s3:// artifact, or a hub id; a missing local path is an error naming `flag`."""
    if name.startswith("s3://"):
        return resolve_path(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise KftuneError(f"{name}: folder has no config.json or adapter_config.json; check {flag}")
        return str(path)
    if _looks_like_path(name):
        raise KftuneError(f"{name}: model folder not found; check {flag} (a local folder, hub id or s3:// URI)")
    return name  # a hub id such as Qwen/Qwen2.5-0.5B-Instruct


def load_tokenizer(location: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise KftuneError(f"{location}: could not load a tokenizer ({exc}); check the path or hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_bitsandbytes() -> None:
    """Fail early, with what to do, where bitsandbytes cannot run."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load
        raise KftuneError(
            f"quantization needs bitsandbytes, which cannot run here ({type(exc).__name__}: {exc}); "
            "train with use_lora instead of use_qlora, drop --load_in_4bit/--load_in_8bit, "
            "or install bitsandbytes for this platform"
        ) from None


def quantization_config(bits: int, compute_dtype: torch.dtype):
    """NF4 with double quantization for 4-bit (the QLoRA paper's choice), LLM.int8 for 8-bit."""
    from transformers import BitsAndBytesConfig

    check_bitsandbytes()
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    location: str,
    runtime: Runtime,
    *,
    dtype: torch.dtype | None = None,
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
):
    """from_pretrained with an explicit dtype (transformers 5 keeps the checkpoint's otherwise)."""
    from transformers import AutoModelForCausalLM

    check_safetensors(location)
    # use_safetensors: a hub repo without safetensors is refused too, never unpickled
    kwargs: dict = {"dtype": dtype or runtime.dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if quantization_bit:
        compute = torch.float32 if runtime.precision == "fp32" else runtime.dtype
        kwargs["quantization_config"] = quantization_config(quantization_bit, compute)
        kwargs["dtype"] = compute
        # each process of a multi-GPU launch loads onto its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if runtime.device == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise KftuneError(f"{location}: could not load the model ({exc}); check --base_model") from None
    if not quantization_bit:
        model.to(runtime.device)
    if quantization_bit == 4:
        disable_cpu_bf16_repack(model)
    if quantization_bit and lever_on("mapped_checkpoint"):
        own_mapped_weights(model)
    return model


def _mapped_checkpoints() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped .safetensors files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def own_mapped_weights(model) -> int:
    """Copy the tensors that still point into the memory-mapped checkpoint, so the mapping closes.

    After a quantized load the parts left unquantized (embedding, norms, biases) are zero-copy views of
    the safetensors file, and one view keeps the whole file resident: for Qwen2.5-0.5B 0.94 GB of
    mapped pages, of which 0.27 GB is still used. Returns the bytes copied.
    """
    ranges = _mapped_checkpoints()
    copied = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        address = tensor.data_ptr()
        if any(start <= address < end for start, end in ranges):
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def prepare_quantized(model, precision: str, gradient_checkpointing: bool = False):
    """A quantized base as QLoRA trains on it: frozen, its non-quantized parts (embedding, tied head, norms)
    in the training precision. Training and inference both call this, so a reloaded QLoRA adapter computes
    exactly as it trained.

    peft's `prepare_model_for_kbit_training` upcasts every bf16 parameter that is not 4-bit to fp32: on
    Qwen2.5-0.5B that is the embedding, also the tied LM head, at 0.54 GB instead of 0.27 GB, and under bf16
    autocast the head's matmul casts it back on every forward. In bf16 the frozen parts therefore stay bf16,
    as they do for LoRA; the rest of what peft does (freeze, input gradients for checkpointing) is kept.
    `KFTUNE_LEVERS_OFF=bf16_base` keeps peft's upcast (the benchmarks measure each lever on its own).
    """
    from peft import prepare_model_for_kbit_training

    if precision != "bf16" or not lever_on("bf16_base"):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """Reentrant activation checkpointing, safe on a frozen base: the embedding's output requires grad.

    A reentrant checkpoint gives gradients only through inputs that require them; under a frozen base
    (LoRA, QLoRA) the hidden states entering the first layer do not, and without this every adapter inside
    a checkpointed layer would get no gradient (tests/test_train_internals.py trains through it without
    trl). transformers 5.24's own enabling registers that hook too for `input_ids` models; kftune does not
    rely on it (nor on trl, which also does it for its own runs). Reentrant, not torch's default: on the
    0.5B shape's LoRA step it peaked 0.5 GB lower (bench/README.md).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def check_safetensors(location: str, flag: str = "--base_model") -> None:
    """Weights load from safetensors only: unpickling a pytorch_model.bin can run any code it carries."""
    folder = Path(location)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f" (it holds {', '.join(pickles)})" if pickles else ""
    raise KftuneError(
        f"{location}: no .safetensors weights{found}; kftune loads weights from safetensors only, because a pickle "
        f"can run code when loaded. Convert the weights where you trust them (save_pretrained with "
        f"safe_serialization=True) or check {flag}"
    )


def load_adapter(model, location: str):
    """`model` with the LoRA adapter in `location` (a local folder, from its adapter_model.safetensors)."""
    from peft import PeftModel

    check_safetensors(location, "--lora_model")
    return PeftModel.from_pretrained(model, location)


def disable_cpu_bf16_repack(model) -> None:
    """Avoid bitsandbytes' in-place CPU repack of 4-bit weights that breaks the next backward pass.

    On CPUs with AVX512-BF16 an eval-mode forward repacks Linear4bit weights in place, and the
    following training step fails with "a view of a leaf Variable ... in-place operation".
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def find_linear_targets(model) -> list[str]:
    """Names of every linear layer type but the LM head, in model order (the guide's `null` targets)."""
    output_layer = model.get_output_embeddings()
    names: list[str] = []
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output_layer and "lm_head" not in full_name:
            short = full_name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their real element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state") and param.quant_state is not None:
            n = int(torch.Size(param.quant_state.shape).numel())
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
