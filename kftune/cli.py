"""`kftune` entry point: each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
import logging
import sys

from kftune.core.errors import KftuneError

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-data": (
        "kftune.data.validate",
        "check a data set row by row, write accepted/rejected rows, a train/eval split and a report",
    ),
    "train": ("kftune.train.training", "fine-tune a model (full, LoRA or QLoRA); same as fine_tune_qwen.py"),
    "launch": ("kftune.train.launch", "train with one process per GPU of this node (accelerate launch: DDP, or FSDP)"),
    "infer": ("kftune.models.infer", "generate with a base model and optional adapter; same as inference_lora.py"),
    "merge": ("kftune.models.merge", "merge a LoRA adapter into its full-precision base, with a parity check"),
    "evaluate": (
        "kftune.evaluate.command",
        "score a base and a tuned model on held-out data: loss, ROUGE-L/chrF, checks, report",
    ),
    "register": ("kftune.registry.promote", "register a candidate in MLflow; move `champion` to it only when it wins"),
    "registry": (
        "kftune.registry.tracking",
        "facts of registered versions: `storage-uri NAME@ALIAS` (where its HF files lie)",
    ),
    "tiny-model": (
        "kftune.dev.tiny_model",
        "build a small random Qwen2 model and tokenizer for offline demos and tests",
    ),
    "sample-data": ("kftune.dev.sample_data", "write the deterministic synthetic Xiaohongshu SFT data set"),
    "stack": ("kftune.dev.stack", "start, stop or show the local SeaweedFS S3 + MLflow stack"),
    "pipeline": ("pipelines.cli", "run the Kubeflow pipeline locally (kfp.local) or compile it for a cluster"),
}


def setup_logging() -> None:
    """kftune's own progress lines on stderr, once per process; library deprecation noise off."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logger = logging.getLogger("kftune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[kftune] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: kftune COMMAND [ARGS...]\n\ncommands:\n{rows}\n\nRun `kftune COMMAND --help` for a command's flags."


def run_command(module: str, argv: list[str]) -> int:
    """Run one command's `main`, turning user-facing errors into one line on stderr and exit code 2."""
    setup_logging()
    try:
        if module == "kftune.train.training":  # an allocator is chosen at start: re-executes once where it applies
            from kftune.core.allocator import prefer_tcmalloc

            prefer_tcmalloc()
        return importlib.import_module(module).main(argv) or 0
    except KftuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
