"""The local stack against real processes: health, idempotence, secrets, ports, exact shutdown."""

from __future__ import annotations

import json
import secrets
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from kftune.cli import main as cli_main
from kftune.core.errors import KftuneError
from kftune.core.storage import connect_s3
from kftune.dev.stack import CREDENTIALS, StackConfig, StackInfo, down, free_ports, port_in_use, status, up

pytestmark = pytest.mark.integration


def _family(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleeper() -> subprocess.Popen:
    """A process nobody recorded, which `down` must leave alone."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)


def test_up_is_healthy_and_a_second_up_changes_nothing(stack: StackInfo, stack_config: StackConfig) -> None:
    before = status(stack.state_dir)
    assert before.running
    started = time.monotonic()
    assert up(stack_config) == stack
    assert time.monotonic() - started < 3
    assert status(stack.state_dir).services == before.services  # same pids


def test_status_shows_urls_and_never_a_key(stack: StackInfo, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["stack", "status", "--state-dir", str(stack.state_dir)]) == 0
    out = capsys.readouterr().out
    for text in (stack.s3_endpoint, stack.mlflow_url, stack.bucket):
        assert text in out
    assert out.count(" up (pid ") == 2
    for key in (stack.access_key, stack.secret_key):
        assert key not in out
        assert key not in repr(stack)


def test_only_the_private_files_hold_the_secret(stack: StackInfo) -> None:
    private = {CREDENTIALS, "s3-identities.json"}
    for name in private:
        assert stat.S_IMODE((stack.state_dir / name).stat().st_mode) == 0o600
    others = [p for p in stack.state_dir.iterdir() if p.is_file() and p.name not in private]
    assert {p.name for p in others} >= {"stack.json", "weed.log", "mlflow.log", "weed.pid", "mlflow.pid"}
    for path in others:
        assert stack.secret_key not in path.read_text(errors="replace"), path


def test_every_listener_is_on_loopback(stack: StackInfo) -> None:
    for service in status(stack.state_dir).services:
        listening = [
            c.laddr for p in _family(service.pid) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening, service.label
        assert {addr.ip for addr in listening} == {"127.0.0.1"}, service.label
    weed = status(stack.state_dir).services[0]
    weed_ports = {
        c.laddr.port for c in psutil.Process(weed.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN
    }
    assert int(stack.s3_endpoint.rsplit(":", 1)[1]) in weed_ports
    assert len(weed_ports) == 10  # S3, master, volume, filer, admin, each with its gRPC twin


@pytest.mark.parametrize("busy_flag", ["--s3-port", "--mlflow-port"])
def test_busy_port_is_refused_before_anything_starts(
    busy_flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"--s3-port": free_ports(1)[0], "--mlflow-port": free_ports(1)[0], busy_flag: busy}
        argv = ["stack", "up", "--state-dir", str(tmp_path)] + [str(x) for kv in ports.items() for x in kv]
        assert cli_main(argv) == 2
    service = "SeaweedFS S3" if busy_flag == "--s3-port" else "MLflow"
    assert capsys.readouterr().err == (
        f"error: port {busy} on 127.0.0.1 is in use (needed for {service}); stop what holds it or pass {busy_flag}\n"
    )
    assert not list(tmp_path.glob("*.pid"))


def test_down_stops_exactly_the_recorded_processes(
    stack: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, secret = "KFTUNETESTKEY0000001", secrets.token_hex(20)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = StackConfig(tmp_path / "throwaway", *free_ports(2))
    bystander = _sleeper()
    try:
        info = up(cfg)
        assert (info.access_key, info.secret_key) == (key, secret)  # the environment's keys win
        recorded = {s.pid for s in status(cfg.state_dir).services}
        family = [p for pid in recorded for p in _family(pid)]
        assert len(family) >= 3  # weed, mlflow and its uvicorn worker

        assert set(down(cfg.state_dir).values()) == recorded
        assert all(_gone(p) for p in family)
        assert not list(cfg.state_dir.glob("*.pid"))
        assert bystander.poll() is None
        assert status(stack.state_dir).running  # the session's stack is untouched
        assert down(cfg.state_dir) == {}
    finally:
        down(cfg.state_dir)
        bystander.kill()
        bystander.wait()


def test_failed_start_shows_the_log_tail_and_leaves_nothing_running(tmp_path: Path) -> None:
    cfg = StackConfig(tmp_path / "doomed", *free_ports(2))
    # with no time at all, whichever service is checked first fails (weed may answer on its first probe)
    expected = r"(SeaweedFS S3|MLflow) did not become healthy in time; the last lines of \S+(weed|mlflow)\.log:\n--- kftune stack up"
    with pytest.raises(KftuneError, match=expected):
        up(cfg, timeout_s=0)
    assert not list(cfg.state_dir.glob("*.pid"))
    assert not port_in_use(cfg.s3_port) and not port_in_use(cfg.mlflow_port)


def test_down_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    bystander = _sleeper()
    try:
        (tmp_path / "weed.pid").write_text(json.dumps({"pid": bystander.pid, "create_time": 1.0}))
        assert down(tmp_path) == {}
        assert bystander.poll() is None
        assert not (tmp_path / "weed.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_mlflow_server_keeps_runs_and_puts_artifacts_in_s3(stack_env: StackInfo, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment(f"integration-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=1)
    (tmp_path / "report.txt").write_text("eval report")
    client.log_artifact(run_id, str(tmp_path / "report.txt"))
    client.set_terminated(run_id)

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.25)]
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="report.txt", dst_path=str(tmp_path / "back")
    )
    assert Path(local).read_text() == "eval report"
    listed = connect_s3().client.list_objects_v2(Bucket=stack_env.bucket, Prefix="mlflow/")
    assert any(o["Key"].endswith(f"{run_id}/artifacts/report.txt") for o in listed.get("Contents", []))
