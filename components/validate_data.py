"""Component: check the data's schema and write a deterministic train/eval split to S3."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(data_uri: str, artifact_root: str, eval_fraction: float, data: Output[Dataset]):
    """Split `data_uri` (local path or s3:// artifact) into train/eval; `data` carries the S3 URIs."""
    from kftune import steps

    result = steps.validate_data(data_uri, artifact_root, eval_fraction)
    data.metadata.update(steps.write_pointer(data.path, result))
