"""Component: fine-tune with full, LoRA or QLoRA training; runs on a GPU node (see pipelines/finetune.py)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
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
    model: Output[Model],
    lora_target_modules: str = "",
    data_mix: str = "",
):
    """Train on the train split; `model` carries the S3 URI of the adapter or full model.

    lora_target_modules: comma-separated module names; empty: every linear layer but the LM head.
    learning_rate: 0 trains with the guide's rate for the method (full 2e-5, lora 1e-4, qlora 2e-4).
    data_mix: JSON list of {"uri", "weight"} sources mixed into the train split; "" for none."""
    from kftune import steps

    settings = steps.train_settings(locals())  # the TrainConfig keys above (tests/test_settings.py checks them)
    split = steps.from_metadata(steps.DataSplit, data.metadata)
    result = steps.train(split, base_model, method, artifact_root, settings, processes)
    model.metadata.update(steps.write_pointer(model.path, result))
