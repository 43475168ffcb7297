"""Component: the data validation gate; writes its report and a deterministic train/eval split to S3."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(
    data_uri: str,
    artifact_root: str,
    eval_fraction: float,
    base_model: str,
    max_seq_length: int,
    data: Output[Dataset],
    data_format: str = "auto",
):
    """Validate `data_uri` (local path or s3:// artifact); fails the run when the gate fails; `data` carries the S3 URIs."""
    from kftune import steps

    result = steps.validate_data(data_uri, artifact_root, eval_fraction, base_model, max_seq_length, data_format)
    data.metadata.update(steps.write_pointer(data.path, result))
