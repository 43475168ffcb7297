"""The model registry under concurrency, against the session's real MLflow server (one worker, SQLite store)."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from kftune.dev.stack import StackInfo
from kftune.registry import tracking as registry
from kftune.registry.tracking import Registration

pytestmark = pytest.mark.integration
PARALLEL = 16


def _register(name: str, candidate: int, stack: StackInfo) -> Registration:
    """The MLflow calls of a registration (kftune.promote.register makes these): a run, then a version."""
    source = f"s3://{stack.bucket}/candidates/{uuid.uuid4().hex}{uuid.uuid4().hex}"  # 64 hex: an artifact URI
    mlflow = registry.client()
    run_id, url = registry.log_run(
        mlflow,
        name,
        f"{name}-{candidate}",
        params={"method": "lora", "candidate": candidate},
        metrics={"eval_loss": 1.0 + candidate},
        tags={"candidate": str(candidate)},
    )
    version = registry.create_version(mlflow, name, source, run_id, {"candidate": str(candidate)})
    return Registration(name, str(version.version), run_id, url, source)


def _server_errors(stack: StackInfo, offset: int) -> list[str]:
    """5xx answers in the MLflow server's access log since `offset`: the client retries them, which would hide them."""
    text = (stack.state_dir / "mlflow.log").read_text(errors="replace")[offset:]
    return [line for line in text.splitlines() if re.search(r'HTTP/1\.1" 5\d\d', line)]


def test_concurrent_registrations_of_distinct_candidates_get_distinct_versions(stack_env: StackInfo) -> None:
    from mlflow import MlflowClient

    name = f"concurrent-{uuid.uuid4().hex[:8]}"  # new model and experiment: creating them is part of the race
    log_offset = len((stack_env.state_dir / "mlflow.log").read_text(errors="replace"))
    start = threading.Barrier(PARALLEL)

    def candidate(i: int) -> Registration:
        start.wait()
        return _register(name, i, stack_env)

    with ThreadPoolExecutor(PARALLEL) as pool:
        registrations = list(pool.map(candidate, range(PARALLEL)))  # re-raises the first error

    assert sorted(int(r.version) for r in registrations) == list(range(1, PARALLEL + 1))
    client = MlflowClient(stack_env.mlflow_url)
    stored = {
        v.version: (v.source, v.run_id, v.tags["candidate"]) for v in client.search_model_versions(f"name='{name}'")
    }
    assert stored == {r.version: (r.source, r.run_id, str(i)) for i, r in enumerate(registrations)}
    runs = [client.get_run(r.run_id) for r in registrations]
    assert len({run.info.experiment_id for run in runs}) == 1  # one experiment, not one per winner of a race
    assert sorted(run.data.params["candidate"] for run in runs) == sorted(str(i) for i in range(PARALLEL))
    assert _server_errors(stack_env, log_offset) == []


def test_polling_the_champion_alias_while_it_moves_sees_a_version_never_an_error(stack_env: StackInfo) -> None:
    from mlflow import MlflowClient

    name = f"alias-{uuid.uuid4().hex[:8]}"
    versions = [_register(name, i, stack_env).version for i in range(3)]
    mover = MlflowClient(stack_env.mlflow_url)
    mover.set_registered_model_alias(name, "champion", versions[0])
    log_offset = len((stack_env.state_dir / "mlflow.log").read_text(errors="replace"))
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def poll() -> None:
        client = MlflowClient(stack_env.mlflow_url)
        while not stop.is_set():
            try:
                seen.append(client.get_model_version_by_alias(name, "champion").version)
            except Exception as exc:
                errors.append(exc)

    readers = [threading.Thread(target=poll) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for move in range(1, 25):
            mover.set_registered_model_alias(name, "champion", versions[move % len(versions)])
    finally:
        stop.set()
        for reader in readers:
            reader.join()

    assert errors == []
    assert set(seen) <= set(versions) and len(set(seen)) >= 2  # the readers saw it move, and only real versions
    assert mover.get_model_version_by_alias(name, "champion").version == versions[24 % len(versions)]
    assert _server_errors(stack_env, log_offset) == []
