"""`--runner container`: the whole DAG with every task in its component's image (kfp.local's DockerRunner
over docker's or podman's Docker API), as pods run them, against the session's real SeaweedFS and MLflow.

Marker `container`: skipped, saying why, where no engine runs or the images are not built (building them
takes ~15 minutes cold, so a test builds them only when KFTUNE_BUILD_IMAGES=1 asks)."""

from __future__ import annotations

import re

import pytest

from components.images import CPU_IMAGE, TRAINER_IMAGE
from kftune.core.errors import KftuneError
from pipelines.local import RunSummary, run

from ..containers import require_images
from .test_pipeline_run import QUICK

pytestmark = [pytest.mark.integration, pytest.mark.container]
IMAGE_OF = {
    "validate-data": CPU_IMAGE,
    "train": TRAINER_IMAGE,
    "evaluate": CPU_IMAGE,
    "merge-adapter": CPU_IMAGE,
    "register-model": CPU_IMAGE,
}


@pytest.fixture(scope="module")
def finished(inputs, task_env, tmp_path_factory) -> RunSummary:
    require_images()
    arguments = {**inputs, **QUICK, "max_steps": 2, "method": "lora", "registered_model_name": "test-containers"}
    return run(arguments, task_env, tmp_path_factory.mktemp("root-containers"), progress=None, runner="container")


def test_every_task_ran_in_its_image_and_a_version_was_registered(finished, stack):
    import mlflow

    assert list(finished.seconds) == ["validate-data", "train", "evaluate", "merge-adapter", "register-model"]
    log = finished.log.read_text(encoding="utf-8", errors="replace")
    started = re.findall(r"\[container\] (\S+) as (\S+), read-only root: True", log)
    assert [image for image, _ in started] == list(IMAGE_OF.values()), started
    assert {user for _, user in started} == {"10001:10001"}
    reg = finished.registration
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    version = client.get_model_version(reg.name, reg.version)
    assert version.source == reg.source and reg.source.startswith("models:/m-")  # the MLflow LoggedModel
    assert finished.trained.metrics["global_steps"] == 2


def test_a_failing_task_fails_the_run_with_its_own_error(inputs, task_env, stack, tmp_path):
    """kfp.local's own container runner reports a task that exits non-zero under podman as a success."""
    require_images()
    env = {**task_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    with pytest.raises(KftuneError) as caught:
        run({**inputs, **QUICK, "method": "lora"}, env, tmp_path, progress=None, runner="container")
    message = str(caught.value)
    assert f"S3 at {stack.s3_endpoint} rejected the credentials" in message and "validate-data" in message
    assert "not-the-secret" not in message
    assert not list(tmp_path.glob("run-*/*/train"))
