"""The fine-tuning DAG: validate -> train -> evaluate -> merge (LoRA/QLoRA only) -> register.

Heavy artifacts live in S3 under `artifact_root`; KFP artifacts only carry their URIs and
sha256s. Credentials reach every task from Kubernetes Secrets as environment variables and are
never pipeline parameters, so they appear in no compiled YAML, run record or log. Only the
training asks for GPUs; the Kubernetes settings below are ignored by kfp.local.

`train_step` is the train step of both pipelines (this one and the sweep): on one node (`train_nodes`
1) the train task trains in its own pod on `gpus_per_node` GPUs; on more, a small CPU task launches a
Kubeflow Trainer TrainJob that trains on them (components/train_across_nodes.py). Both are run-time
parameters: one compiled pipeline serves every size.
"""

from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl.pipeline_channel import ConditionOperation, PipelineChannel

from components.evaluate import evaluate
from components.images import CACHE_DIR, IMAGE_UID, TRAINER_IMAGE
from components.merge_adapter import merge_adapter
from components.register_model import register_model
from components.train import train
from components.train_across_nodes import train_across_nodes
from components.validate_data import validate_data
from kftune.core.cluster import GPU_NODE_LABEL, GPU_RESOURCE, SECRETS  # shared with the TrainJob's nodes

TRAIN_RESOURCES = {"cpu": ("4", "8"), "memory": ("32G", "64G")}  # (request, limit) of each training node
CPU_TASK_RESOURCES = {"cpu": ("1", "4"), "memory": ("4G", "16G")}
TRAIN_RETRIES = 2  # a preempted GPU node is worth a retry; content-addressed uploads make it idempotent


def _resources(task: dsl.PipelineTask, spec: dict[str, tuple[str, str]]) -> dsl.PipelineTask:
    (cpu_req, cpu_lim), (mem_req, mem_lim) = spec["cpu"], spec["memory"]
    return task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)


def _secured(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Credentials as environment variables from Secrets; the images' non-root user (restricted Pod Security)."""
    for name, keys in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys)
    return kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)


def _cpu_task(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return _secured(_resources(task, CPU_TASK_RESOURCES))


def _on_gpu_nodes(task: dsl.PipelineTask, gpus: PipelineChannel) -> dsl.PipelineTask:
    """A training node's settings: the train task's own pod takes them, the launcher hands them to its TrainJob.

    `gpus` is a string pipeline parameter, read at run time (the driver reads no other kind for a resource
    limit). KFP 2.17 does not pass a parameter used only in a resource setting into the If/Else group around
    the task (the compiled task reads an input its group never declares), so it is registered as one of the
    task's inputs as well.
    """
    _secured(_resources(task, TRAIN_RESOURCES))
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    task.register_pipeline_channels([gpus])
    task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="30s", backoff_factor=2.0)
    kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


def _gpu_task(task: dsl.PipelineTask, gpus: PipelineChannel) -> dsl.PipelineTask:
    """A task that trains in its own pod, on `gpus` GPUs of one node, with a cache volume for the base model."""
    kubernetes.empty_dir_mount(task, volume_name="kftune-cache", mount_path=CACHE_DIR, size_limit="100Gi")
    return _on_gpu_nodes(task, gpus)


def train_step(train_nodes: PipelineChannel, gpus_per_node: PipelineChannel, **arguments: Any) -> PipelineChannel:
    """The train step of both pipelines, added to the current DAG; returns the trained model.

    `arguments`: the train component's (components/train.py). With `train_nodes` 1 the train task trains
    in its own pod on `gpus_per_node` GPUs, as it always has; with more, train_across_nodes launches a
    TrainJob of that many nodes and hands it the same pod settings (the launcher's own pod asks for no
    resources). The result is a dsl.OneOf of the two branches' `model`, the train component's contract
    either way, so evaluate, merge and register take it as they took the train task's; a cluster resolves
    a OneOf of artifacts from KFP 2.17 on, kfp.local through pipelines/local_oneof.py. The branch is chosen
    by a pipeline parameter: kfp.local resolves a condition on a NamedTuple field to false without a word.
    """
    with dsl.If(train_nodes == 1, name="one-node"):
        one = _gpu_task(train(**arguments), gpus_per_node)
    with dsl.Else(name="across-nodes"):
        launcher = train_across_nodes(
            **arguments,
            nodes=train_nodes,
            gpus_per_node=gpus_per_node,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            image=TRAINER_IMAGE,
        )
        across = _on_gpu_nodes(launcher, gpus_per_node)  # passed through to the TrainJob, all but the env
    return dsl.OneOf(one.outputs["model"], across.outputs["model"])


def merge_and_register(
    is_full: ConditionOperation,
    trained: PipelineChannel,
    artifact_root: PipelineChannel,
    **registration: PipelineChannel,
) -> None:
    """Register the trained model when `is_full`, else merge the adapter into its base first and register that.

    `registration`: the register_model arguments besides the model (data, evaluation, the gate's settings).
    `is_full` compares a pipeline parameter or a task's return value: kfp.local resolves a condition
    on a NamedTuple field to false without a word.
    """
    registration |= {
        "trained": trained,
        "artifact_root": artifact_root,
        "pipeline_run": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    }
    with dsl.If(is_full, name="full-model"):
        _cpu_task(register_model(**registration)).set_caching_options(False)
    with dsl.Else(name="adapter"):
        merged = _cpu_task(merge_adapter(model=trained, artifact_root=artifact_root))
        _cpu_task(register_model(**registration, merged=merged.output)).set_caching_options(False)


@dsl.pipeline(
    name="kftune-finetune", description="Fine-tune a causal LM (full, LoRA or QLoRA), evaluate, merge, register"
)
def finetune_pipeline(
    data_uri: str,
    method: str = "lora",
    base_model: str = "Qwen/Qwen2.5-0.5B-Instruct",
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    quantization_bit: int = 4,
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
    primary_metric: str = "eval_loss",
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
    """method: full | lora | qlora (quantization_bit 4 or 8); lora_* and quantization_bit apply where the method uses them.
    Training defaults are the guide's config for the method (configs/train_config_*.json); learning_rate 0 means
    the method's rate (full 2e-5, lora 1e-4, qlora 2e-4).
    data_uri: JSONL/JSON data, an s3:// artifact URI or a path the task can read; data_format: auto (each file's
    own: alpaca, messages, sharegpt, prompt_completion or text) or the one format every row must be in.
    train_nodes: nodes to train on; 1 trains in the train task's own pod, more as a Kubeflow Trainer TrainJob
    started by a small CPU task (the cluster needs Trainer v2.3+ and the kftune-torch runtime of k8s/base).
    gpus_per_node: the GPUs each training node asks for on a cluster (1 to 16), a whole number written as a
    string: KFP 2.17's driver reads a resource limit only from a string parameter (GetStringValue), so an
    integer one would leave the pod without a GPU limit, silently.
    train_processes: processes per node; 0 (the default) trains with one per GPU of the node (DDP), one
    where it has none (2 on a CPU stands in for two GPUs: two gloo processes).
    eval_samples: prompts answered greedily by base and tuned model and scored (ROUGE-L, chrF, checks).
    primary_metric, promotion_margin: `champion` moves to the new version only when it beats its base by the
    margin (a fraction of the base's value) and the current champion on this metric.
    data_mix: JSON list of {"uri", "weight"} sources mixed into the training rows (each weight its share).
    benchmarks: lm-eval task names / task folders run on base and tuned (benchmark_limit examples each, 0: all);
    guard_max_drop: every benchmark metric must stay within this fraction of its base to promote (negative: no guard)."""
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
    trained = train_step(
        train_nodes,
        gpus_per_node,
        data=data.output,
        base_model=base_model,
        method=method,
        artifact_root=artifact_root,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantization_bit=quantization_bit,
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
    merge_and_register(
        method == "full",
        trained,
        artifact_root,
        data=data.output,
        evaluation=scored.outputs["metrics"],
        registered_model_name=registered_model_name,
        experiment_name=experiment_name,
        primary_metric=primary_metric,
        promotion_margin=promotion_margin,
        git_commit=git_commit,
        guard_max_drop=guard_max_drop,
    )
