"""Component: train on several nodes as a Kubeflow Trainer TrainJob, from a small CPU pod that launches and follows it.

Its task is given the training pod's settings (GPU limit, CPU and memory, GPU node selector and toleration,
the Secrets as environment variables; pipelines/finetune.py), but the task-config passthroughs below hand
them to the TrainJob through `task_config` instead of reserving them for this pod. Only the environment
applies to this pod too: it reads and writes S3 and needs the credentials. Under kfp.local `task_config`
arrives empty. Its `model` output is the same contract as the train component's.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import TRAINER_IMAGE

PASSTHROUGHS = [
    dsl.TaskConfigField.RESOURCES,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
]


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False, task_config_passthroughs=PASSTHROUGHS)
def train_across_nodes(
    data: Input[Dataset],
    base_model: str,
    method: str,
    artifact_root: str,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    quantization_bit: int,
    learning_rate: float,
    max_steps: int,
    num_train_epochs: float,
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    max_seq_length: int,
    seed: int,
    processes: int,
    nodes: int,
    gpus_per_node: str,
    run_id: str,
    task_name: str,
    image: str,
    task_config: dsl.TaskConfig,
    model: Output[Model],
    lora_target_modules: str = "",
    data_mix: str = "",
):
    """Train on `nodes` nodes x `gpus_per_node` GPUs; `model` carries the S3 URI of the adapter or full model.

    run_id, task_name: KFP's run id and this task's name, which name the TrainJob, so a retry of this task
    adopts its TrainJob instead of starting a second. A sweep runs this task once per candidate under one
    name, so what the candidate trains (method, rank, bits, targets) is part of the job's name too.
    image: the TrainJob's image (the trainer image this pipeline was compiled with).
    gpus_per_node: a whole number as a string, as the pipeline parameter is (pipelines/finetune.py says why).
    The other parameters are the train component's (components/train.py)."""
    import dataclasses

    from kftune import steps
    from kftune.train import trainjob

    settings = steps.train_settings(locals())  # the TrainConfig keys above (tests/test_settings.py checks them)
    split = steps.from_metadata(steps.DataSplit, data.metadata)
    task = "-".join(map(str, (task_name, method, lora_r, quantization_bit, lora_target_modules)))
    result = steps.train(
        split,
        base_model,
        method,
        artifact_root,
        settings,
        processes,
        nodes=nodes,
        gpus_per_node=int(gpus_per_node),
        placement=dataclasses.asdict(task_config),
        job_name=trainjob.job_name(run_id, task),
        image=image,
    )
    model.metadata.update(steps.write_pointer(model.path, result))
