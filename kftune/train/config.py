"""The one training config: the guide's keys are its field names; defaults < JSON file < flags.

Every problem (unknown key, wrong type, out-of-range value, contradiction) is collected and
raised once as a ConfigError, so a user fixes a config in one pass, not one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.errors import ConfigError, KftuneError

SEVEN_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PRECISIONS = ("auto", "bf16", "fp32", "fp16")


def _f(default: Any, help_: str) -> Any:
    return field(default=default, metadata={"help": help_})


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names are the user's guide's config keys."""

    base_model: str = _f("Qwen/Qwen2.5-0.5B-Instruct", "base model: hub id, local folder or s3:// URI")
    data_path: str = _f(
        "data/store_xhs_sft_samples.jsonl",
        "training data: JSONL or a JSON array in one format (alpaca, messages, sharegpt, prompt_completion, text)",
    )
    eval_data_path: str | None = _f(None, "optional held-out data, same formats; enables eval_steps")
    output_dir: str = _f("./output_qwen", "where the adapter or model is written (complete or absent)")
    overwrite_output_dir: bool = _f(False, "replace an existing output_dir instead of refusing")

    use_lora: bool = _f(False, "train LoRA adapters instead of all parameters")
    use_qlora: bool = _f(False, "QLoRA: LoRA on a base quantized to quantization_bit bits")
    quantization_bit: int = _f(4, "QLoRA bits: 4 (NF4, double quantization) or 8")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA scaling (alpha / r scales the update)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA path, 0 <= p < 1")
    lora_target_modules: str | list[str] | None = _f(
        None, "comma list of module names, or null to use every linear layer but the LM head"
    )

    learning_rate: float = _f(1e-4, "peak learning rate")
    num_train_epochs: float = _f(3.0, "epochs over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps to run; -1 means use num_train_epochs")
    per_device_train_batch_size: int = _f(4, "sequences per device per micro-batch")
    gradient_accumulation_steps: int = _f(4, "micro-batches per optimizer step")
    max_seq_length: int = _f(512, "tokens per sample after the chat template; longer samples are truncated")
    warmup_ratio: float = _f(0.03, "share of steps with a linear learning-rate warm-up")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name (cosine, linear, constant, ...)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    seed: int = _f(42, "seed for weights, data order and dropout")
    gradient_checkpointing: bool = _f(
        False, "recompute activations to save memory at ~30% more compute; turned on by itself when only that fits"
    )
    padding_free: bool = _f(True, "flatten each batch into one row without padding (position ids keep sequences apart)")
    force: bool = _f(False, "train even when the memory pre-flight estimates that the run does not fit")
    precision: str = _f("auto", "auto (bf16 where the device supports it, else fp32), bf16, fp32 or fp16 (CUDA only)")
    logging_steps: int = _f(10, "steps between loss log lines")
    save_steps: int = _f(200, "steps between checkpoints")
    checkpoint_uri: str | None = _f(
        None,
        "s3:// prefix or local folder where each checkpoint is kept; a restart resumes from the newest complete one",
    )
    eval_steps: int = _f(0, "steps between evaluations on eval_data_path; 0 evaluates only at the end")
    data_mix: str = _f(
        "",
        'JSON list of {"uri", "weight"} sources mixed into data_path\'s rows, each weight its share of training rows '
        '(each source passes the validation gate); "" for none',
    )
    trust_remote_code: bool = _f(False, "allow custom model code from the model folder (off: safer)")
    ddp_timeout: int = _f(
        300,
        "seconds a collective may wait for the other processes before the run fails (torch's defaults: 1800 gloo, "
        "600 NCCL); bounds a hang when a node is lost on several nodes",
    )
    publish_to: str = _f(
        "",
        "s3:// prefix or folder: when training ends, the world's rank 0 uploads output_dir there as a content-"
        "addressed artifact and writes published.json naming it (how a multi-node run hands back its output)",
    )

    @property
    def method(self) -> str:
        """full, lora or qlora: QLoRA is LoRA plus a quantization config."""
        if self.use_qlora:
            return "qlora"
        return "lora" if self.use_lora else "full"

    @property
    def uses_adapter(self) -> bool:
        return self.use_lora or self.use_qlora

    def target_modules(self) -> list[str] | None:
        """The LoRA targets as a list, or None for automatic discovery."""
        value = self.lora_target_modules
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        names = [n.strip() for n in items if n.strip()]
        return names or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / artifacts.CONFIG
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TrainConfig:
        """The config a model folder was trained with (written by `save`); keys this version does not know are skipped."""
        path = Path(directory) / artifacts.CONFIG
        if not path.is_file():
            raise KftuneError(f"{directory} has no {artifacts.CONFIG}; pass a model that kftune trained")
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in saved.items() if k in FIELDS})

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        return (Path(directory) / artifacts.CONFIG).is_file()


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
METHODS = ("full", "lora", "qlora")
# The guide's config for each method (configs/train_config_*.json): TrainConfig's defaults are the LoRA
# config's, and this is where the others differ. The pipelines' defaults come from here (tests/test_settings.py).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"learning_rate": 2e-5},
    "lora": {},
    "qlora": {"learning_rate": 2e-4, "gradient_checkpointing": True},
}
# A pipeline trains any method from one set of parameters; where the guide's value differs by method, the
# parameter's default is this placeholder, and training uses the method's value.
BY_METHOD = 0


def method_default(method: str, key: str) -> Any:
    """The guide's value of `key` for `method` (full, lora, qlora)."""
    return METHOD_DEFAULTS[method].get(key, FIELDS[key].default)


BY_METHOD_KEYS = frozenset(k for k in FIELDS if len({method_default(m, k) for m in METHODS}) > 1) - {
    "gradient_checkpointing"
}  # not a pipeline parameter: the memory pre-flight turns it on when only that fits


def with_method_defaults(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with each BY_METHOD placeholder replaced by the guide's value for `method`."""
    return {k: method_default(method, k) if v == BY_METHOD and k in BY_METHOD_KEYS else v for k, v in settings.items()}


_HINTS = typing.get_type_hints(TrainConfig)


def _allowed_types(name: str) -> tuple[type, ...]:
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
    return (hint,)


def _type_name(types_: tuple[type, ...]) -> str:
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in types_)


def check_type(name: str, value: Any) -> tuple[Any, str | None]:
    """Return (coerced value, problem). Ints are accepted where floats are; bools never pass as numbers."""
    allowed = _allowed_types(name)
    if value is None:
        return (
            (None, None)
            if type(None) in allowed
            else (value, f"{name}: null is not allowed, expected {_type_name(allowed)}")
        )
    if isinstance(value, bool):
        return (
            (value, None)
            if bool in allowed
            else (value, f"{name}: got {json.dumps(value)}, expected {_type_name(allowed)}")
        )
    if isinstance(value, int) and int not in allowed and float in allowed:
        return float(value), None
    if isinstance(value, list) and list in allowed:
        if all(isinstance(v, str) for v in value):
            return value, None
        return value, f"{name}: every list item must be a string"
    if type(value) in allowed:
        return value, None
    return value, f"{name}: got {json.dumps(value, ensure_ascii=False)}, expected {_type_name(allowed)}"


def unknown_key_problem(key: str, source: str, prefix: str = "") -> str:
    """Name the unknown key or flag and the closest valid one."""
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else "; see `kftune train --help` for the keys"
    kind = "flag" if prefix else "key"
    return f"{source}: unknown {kind} {prefix}{key}{hint}"


def range_problems(cfg: TrainConfig, explicit: set[str]) -> list[str]:
    """Out-of-range values and contradictions; `explicit` are the keys the user set."""
    p: list[str] = []
    if cfg.lora_r < 1:
        p.append(f"lora_r: must be >= 1, got {cfg.lora_r}")
    if cfg.lora_alpha <= 0:
        p.append(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        p.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.quantization_bit not in (4, 8):
        p.append(f"quantization_bit: must be 4 or 8, got {cfg.quantization_bit}")
    if cfg.learning_rate <= 0 or cfg.learning_rate >= 1:
        p.append(f"learning_rate: must be in (0, 1), got {cfg.learning_rate}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        p.append(f"max_steps: must be -1 (use num_train_epochs) or >= 1, got {cfg.max_steps}")
    if cfg.max_steps == -1 and cfg.num_train_epochs <= 0:
        p.append(f"num_train_epochs: must be > 0 when max_steps is -1, got {cfg.num_train_epochs}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(cfg, key) < 1:
            p.append(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_seq_length < 16:
        p.append(f"max_seq_length: must be >= 16, got {cfg.max_seq_length}")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.eval_steps < 0:
        p.append(f"eval_steps: must be >= 0, got {cfg.eval_steps}")
    if cfg.publish_to and not cfg.publish_to.startswith("s3://"):
        p.append(f"publish_to: must be an s3:// prefix or empty, got {cfg.publish_to!r}")
    if cfg.ddp_timeout < 10:
        p.append(f"ddp_timeout: must be >= 10 seconds, got {cfg.ddp_timeout}")
    if cfg.precision not in PRECISIONS:
        p.append(f"precision: must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.lora_target_modules is not None and cfg.target_modules() is None:
        p.append("lora_target_modules: empty; give module names or null for automatic discovery")
    if cfg.data_mix:
        from kftune.data.mixing import parse as parse_mix

        try:
            parse_mix(cfg.data_mix)
        except KftuneError as exc:
            p.append(str(exc))
    if not cfg.data_path:
        p.append("data_path: required")
    if not cfg.output_dir:
        p.append("output_dir: required")
    if cfg.checkpoint_uri is not None and not cfg.checkpoint_uri.strip("/ "):
        p.append("checkpoint_uri: empty; give an s3:// prefix or a local folder, or null for no checkpoints kept")
    # contradictions: settings that only mean something with another one
    if cfg.eval_steps > 0 and not cfg.eval_data_path:
        p.append("eval_steps is > 0 but eval_data_path is not set: give eval_data_path or set eval_steps to 0")
    if "quantization_bit" in explicit and not cfg.use_qlora:
        p.append("quantization_bit is set but use_qlora is false: set use_qlora to true or remove quantization_bit")
    lora_keys = sorted(k for k in explicit if k.startswith("lora_"))
    if lora_keys and not cfg.uses_adapter:
        p.append(
            f"{', '.join(lora_keys)} set but neither use_lora nor use_qlora is true: "
            "add use_lora (or use_qlora), or remove the LoRA keys for full fine-tuning"
        )
    return p


def load_json_file(path: str | Path) -> dict[str, Any]:
    if str(path).startswith("s3://"):  # a multi-node run's config: one artifact every node reads
        from kftune.core.storage import resolve_path

        path = resolve_path(str(path))
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{path}: config file not found; check --config_file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KftuneError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise KftuneError(f"{path}: a config must be a JSON object of key: value pairs")
    return data


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any], file_label: str = "config file") -> TrainConfig:
    """Merge defaults < file < flags, validate everything, raise one ConfigError listing every problem."""
    problems: list[str] = []
    merged: dict[str, Any] = {}
    for source, values in ((file_label, file_values), ("flags", flag_values)):
        for key, value in values.items():
            if key.startswith("_") or key.startswith("#"):
                continue  # comment keys such as "_comment" are allowed in JSON configs
            if key not in FIELDS:
                problems.append(unknown_key_problem(key, source))
                continue
            if key == "data_mix" and isinstance(value, list):
                value = json.dumps(value)  # a JSON config may hold the list itself; the config keeps its text
            coerced, problem = check_type(key, value)
            if problem:
                problems.append(f"{source}: {problem}")
            else:
                merged[key] = coerced
    cfg = TrainConfig(**merged)
    problems += range_problems(cfg, explicit=set(merged))
    if problems:
        raise ConfigError(problems)
    return cfg


def _convert_flag(name: str, raw: str) -> Any:
    """Turn a flag's text into the field's type; leave it as text when that fails so check_type reports it."""
    allowed = _allowed_types(name)
    if type(None) in allowed and raw.lower() in {"null", "none"}:
        return None
    if bool in allowed:
        lowered = raw.lower()
        if lowered in {"true", "1", "yes"}:
            return True
        if lowered in {"false", "0", "no"}:
            return False
        return raw
    for kind in (int, float):
        if kind in allowed:
            try:
                return kind(raw)
            except ValueError:
                if kind is int and float in allowed:
                    continue
                return raw
    return raw


def build_parser(prog: str, description: str):
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config_file", help="JSON config; flags override its keys")
    for name, f in FIELDS.items():
        help_ = f"{f.metadata['help']} (default: {json.dumps(f.default)})".replace("%", "%%")
        if bool in _allowed_types(name):
            parser.add_argument(f"--{name}", nargs="?", const="true", metavar="true|false", help=help_)
        else:
            parser.add_argument(f"--{name}", metavar=name.upper(), help=help_)
    return parser


def parse_args(argv: list[str], prog: str = "kftune train", description: str = "") -> TrainConfig:
    """Read `--config_file` and flags into a validated TrainConfig (every problem reported at once)."""
    parser = build_parser(prog, description)
    ns, unknown = parser.parse_known_args(argv)
    problems = []
    for i, token in enumerate(unknown):
        if token.startswith("--"):
            problems.append(unknown_key_problem(token[2:].split("=", 1)[0], "flags", prefix="--"))
        elif i == 0 or not unknown[i - 1].startswith("--"):
            problems.append(f"flags: unexpected argument {token!r}")
    values = {k: _convert_flag(k, v) for k, v in vars(ns).items() if k != "config_file" and v is not None}
    file_values = load_json_file(ns.config_file) if ns.config_file else {}
    try:
        cfg = resolve(file_values, values, file_label=ns.config_file or "config file")
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg
