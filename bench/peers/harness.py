"""Runs one tool's own training entry point in this process and records, the same way for every tool:
each step's wall seconds, its real (non-padding) tokens and label tokens, and the loss per step.

Run by bench/peers.py inside the tool's own venv (only the standard library and transformers are
assumed here); the parent measures the process's peak RSS. Usage:

    python harness.py RESULT.json kftune|llamafactory|trl CONFIG
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def instrument(record: dict) -> None:
    """Wrap transformers' Trainer (all three tools train through it) to time steps and count tokens."""
    import transformers

    trainer_cls = transformers.Trainer
    original_step, original_train = trainer_cls.training_step, trainer_cls.train

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        # padded batches carry an attention mask; a padding-free batch is one row of real tokens only
        real = int(mask.sum()) if mask is not None else int(ids.numel())
        record["step_tokens"].append(real)
        record["step_label_tokens"].append(int((inputs["labels"][..., 1:] != -100).sum()))
        record["step_shapes"].append(list(ids.shape))
        return original_step(self, model, inputs, *args, **kwargs)

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.started)

    def train(self, *args, **kwargs):
        self.add_callback(StepTimer())
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        record["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        started = time.perf_counter()
        try:
            return original_train(self, *args, **kwargs)
        finally:
            record["train_seconds"] = time.perf_counter() - started
            record["losses"] = [e["loss"] for e in self.state.log_history if "loss" in e]
            # LLaMA-Factory turns checkpointing on in the model, not in the Trainer's arguments: ask the layers
            record["gradient_checkpointing"] = any(
                getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()
            )
            record["trainable_params"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            import torch

            if torch.cuda.is_available():  # on a GPU the peak that matters is the allocator's, not the RSS
                record["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
                record["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())

    trainer_cls.training_step, trainer_cls.train = training_step, train


def run(tool: str, config: str, record: dict) -> None:
    if tool == "kftune":
        from kftune.core.allocator import prefer_tcmalloc  # as `kftune train` starts (re-executes this process)
        from kftune.core.levers import levers_on

        prefer_tcmalloc()
        from kftune.train.training import main

        record["levers_on"] = levers_on()
        main(["--config_file", config])
    elif tool == "llamafactory":
        from llamafactory.train.tuner import run_exp

        run_exp(json.loads(Path(config).read_text(encoding="utf-8")))
    elif tool == "trl":
        # trl/scripts/sft.py as `trl sft` runs it (the CLI re-launches it under accelerate in a new process)
        from trl.scripts.sft import main, make_parser

        sys.argv = ["sft.py", "--config", config]
        main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))
    else:
        raise SystemExit(f"unknown tool {tool!r}")


def main() -> int:
    out, tool, config = sys.argv[1:4]
    record: dict = {"tool": tool, "step_seconds": [], "step_tokens": [], "step_label_tokens": [], "step_shapes": []}
    instrument(record)
    try:
        run(tool, config, record)
    finally:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
