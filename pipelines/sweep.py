"""The method x rank sweep: validate once, train and evaluate every candidate in parallel branches,
compare them, then merge and register the winner as the fine-tuning DAG registers its model.

The candidates are planned at run time (`plan_sweep`), so methods, ranks and target-module
presets stay pipeline parameters; full fine-tuning is one candidate, not one per rank. Each
branch trains with the fine-tuning DAG's train step (pipelines/finetune.py's `train_step`, on its
own `train_nodes` x `gpus_per_node` GPUs), and a small task forwards its model for the comparison
to collect. `parallelism` caps how many branches, so how many sets of GPU nodes, run at once. KFP
fixes it when compiling, so it is an argument of `build`, not a run parameter.
"""

from typing import List

from kfp import dsl

from components.compare_candidates import compare_candidates
from components.evaluate import evaluate
from components.forward_model import forward_model
from components.plan_sweep import plan_sweep
from components.validate_data import validate_data
from pipelines.finetune import _cpu_task, merge_and_register, train_step

PARALLELISM = 4  # training branches at once on a cluster (`kftune pipeline compile --pipeline sweep --parallelism N`)


def build(parallelism: int = PARALLELISM):
    """The sweep pipeline with at most `parallelism` branches at once (0: no limit)."""

    @dsl.pipeline(
        name="kftune-sweep",
        description="Train and compare full, LoRA and QLoRA candidates over ranks and "
        "target modules; merge and register the winner",
    )
    def sweep_pipeline(
        data_uri: str,
        methods: List[str] = ["lora", "qlora4", "full"],  # noqa: B006 (KFP reads the defaults, never mutates them)
        ranks: List[int] = [8, 16],  # noqa: B006
        target_presets: List[str] = ["all"],  # noqa: B006
        primary_metric: str = "eval_loss",
        base_model: str = "Qwen/Qwen2.5-0.5B-Instruct",
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        learning_rate: float = 0.0,
        max_steps: int = -1,
        num_train_epochs: float = 3.0,
        per_device_train_batch_size: int = 4,
        gradient_accumulation_steps: int = 4,
        max_seq_length: int = 512,
        seed: int = 42,
        train_processes: int = 0,
        train_nodes: int = 1,
        gpus_per_node: str = "1",
        eval_fraction: float = 0.1,
        data_format: str = "auto",
        sample_tokens: int = 256,
        eval_samples: int = 8,
        promotion_margin: float = 0.01,
        registered_model_name: str = "kftune-model",
        experiment_name: str = "kftune",
        artifact_root: str = "s3://kftune/pipeline",
        git_commit: str = "",
        data_mix: str = "",
        benchmarks: str = "",
        benchmark_limit: int = 0,
        guard_max_drop: float = -1.0,
    ) -> None:
        """methods: full, lora, qlora4, qlora8. ranks: LoRA ranks (full trains once). target_presets: all,
        attention, mlp or auto (every linear layer). primary_metric: what the winner is chosen by and the
        promotion gate compares (eval_loss, perplexity, rougeL, chrf, checks_pass_rate, tool_call_name_match,
        tool_call_args_match). The rest is shared by every candidate; training defaults are the guide's
        config for each candidate's method, learning_rate 0 meaning the method's rate (full 2e-5, lora 1e-4, qlora 2e-4).
        train_nodes, gpus_per_node, train_processes: each candidate's nodes, GPUs per node and processes per node,
        as in the fine-tuning pipeline (more than one node: each candidate a TrainJob of its own).
        data_mix, benchmarks, benchmark_limit, guard_max_drop: as in the fine-tuning pipeline, for every candidate."""
        data = _cpu_task(
            validate_data(
                data_uri=data_uri,
                artifact_root=artifact_root,
                eval_fraction=eval_fraction,
                base_model=base_model,
                max_seq_length=max_seq_length,
                data_format=data_format,
            )
        )
        candidates = _cpu_task(plan_sweep(methods=methods, ranks=ranks, target_presets=target_presets))
        with dsl.ParallelFor(candidates.output, parallelism=parallelism, name="candidates") as candidate:
            trained = train_step(
                train_nodes,
                gpus_per_node,
                data=data.output,
                base_model=base_model,
                method=candidate.method,
                artifact_root=artifact_root,
                lora_r=candidate.rank,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                quantization_bit=candidate.bits,
                lora_target_modules=candidate.targets,
                learning_rate=learning_rate,
                max_steps=max_steps,
                num_train_epochs=num_train_epochs,
                per_device_train_batch_size=per_device_train_batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                max_seq_length=max_seq_length,
                seed=seed,
                processes=train_processes,
                data_mix=data_mix,
            )
            scored = _cpu_task(
                evaluate(
                    data=data.output,
                    model=trained,
                    artifact_root=artifact_root,
                    sample_tokens=sample_tokens,
                    eval_samples=eval_samples,
                    benchmarks=benchmarks,
                    benchmark_limit=benchmark_limit,
                    guard_max_drop=guard_max_drop,
                )
            )
            collectable = _cpu_task(forward_model(model=trained))  # KFP cannot collect a dsl.OneOf
        best = _cpu_task(
            compare_candidates(
                data=data.output,
                candidates=candidates.output,
                trained=dsl.Collected(collectable.output),
                evaluations=dsl.Collected(scored.outputs["metrics"]),
                primary_metric=primary_metric,
                experiment_name=experiment_name,
                artifact_root=artifact_root,
            )
        ).set_caching_options(False)  # it logs to MLflow: a cached result would log nothing
        merge_and_register(
            best.outputs["Output"] == "full",
            best.outputs["winner"],
            artifact_root,
            data=data.output,
            evaluation=best.outputs["winner_evaluation"],
            registered_model_name=registered_model_name,
            experiment_name=experiment_name,
            primary_metric=primary_metric,
            promotion_margin=promotion_margin,
            git_commit=git_commit,
            guard_max_drop=guard_max_drop,
        )

    return sweep_pipeline


sweep_pipeline = build()
