"""One real SeaweedFS + MLflow stack per pytest session, on free ports in a temporary folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kftune.stack import StackConfig, StackInfo, down, free_ports, up


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
