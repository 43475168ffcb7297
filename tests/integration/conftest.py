"""One real SeaweedFS + MLflow stack per pytest session, on free ports in a temporary folder."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kftune.core.storage import S3, connect_s3, upload_dir, upload_file
from kftune.dev.stack import StackConfig, StackInfo, down, free_ports, up


@pytest.fixture(scope="session")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    s3_port, mlflow_port = free_ports(2)
    return StackConfig(tmp_path_factory.mktemp("stack"), s3_port, mlflow_port, bucket="kftune-test")


@pytest.fixture(scope="session")
def stack(stack_config: StackConfig) -> Iterator[StackInfo]:
    """The session's stack, with generated credentials (never the developer's AWS keys)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        mp.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        info = up(stack_config)
    try:
        yield info
    finally:
        down(stack_config.state_dir)


@pytest.fixture
def stack_env(stack: StackInfo, monkeypatch: pytest.MonkeyPatch) -> StackInfo:
    """Point boto3 and MLflow in this test at the session stack, as `kftune` child processes are."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    return stack


@pytest.fixture(scope="module")
def s3(stack: StackInfo) -> S3:
    return connect_s3(stack.s3_endpoint, access_key=stack.access_key, secret_key=stack.secret_key)


def stage_inputs(stack: StackInfo, s3: S3, model: Path, data: Path, name: str = "") -> dict[str, str]:
    """A model and a data file in the stack's bucket (under `name`, when given): what a pipeline run reads."""
    bucket = f"s3://{stack.bucket}"
    return {
        "base_model": upload_dir(model, f"{bucket}/inputs/{name}models", s3).uri,
        "data_uri": upload_file(data, f"{bucket}/inputs/{name}data", s3).uri,
        "artifact_root": f"{bucket}/{name}pipeline",
    }


@pytest.fixture(scope="module")
def inputs(stack: StackInfo, s3: S3, tiny_model: Path, small_data: Path) -> dict[str, str]:
    """The tiny model and the small data set in the stack's bucket: what a pipeline run reads."""
    return stage_inputs(stack, s3, tiny_model, small_data)


@pytest.fixture(scope="module")
def task_env(stack: StackInfo, tmp_path_factory) -> dict[str, str]:
    """The environment pipeline tasks run with: the stack's endpoints and keys, and a cache of their own."""
    return {**stack.env(), "KFTUNE_CACHE": str(tmp_path_factory.mktemp("cache"))}


def stop_process(proc: subprocess.Popen) -> None:
    """A server a test started: terminated, killed if it lingers, always reaped."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
