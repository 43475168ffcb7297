"""The cluster's MLflow start script (k8s/base/mlflow_start.py, the very file the Deployment runs from
a generated ConfigMap) in front of a real `mlflow server --app-name basic-auth`, with logins that
hold `%`, `@`, `:` and `/`: configparser reads the ini back unchanged (unescaped, `%40` raised
InterpolationSyntaxError and the server crash-looped), the admin logs in with the hostile password,
and the pipeline's login is a plain user that can use only what it creates."""

from __future__ import annotations

import configparser
import importlib.util
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from kftune.dev.processes import HOST, executable, free_ports

from ..conftest import REPO
from .conftest import stop_process

pytestmark = pytest.mark.integration
SCRIPT = REPO / "k8s" / "base" / "mlflow_start.py"
_spec = importlib.util.spec_from_file_location("mlflow_start", SCRIPT)
mlflow_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlflow_start)

HOSTILE = "p%40ss@host:5432/db%%x%"  # a percent-encoded '@', a bare one, ':', '/', '%%' and a trailing '%'
ADMIN = ("admin", f"Admin-{HOSTILE}")
PIPELINE = ("kftune-pipeline", f"Pipe-{HOSTILE}")
PG_URI = "postgresql://mlflow:" + "s3cr%40t%2Fpw" + "@postgres.example.internal:5432/mlflow_auth"


def _read_back(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return dict(parser["mlflow"])


def test_every_ini_value_reads_back_unchanged_and_a_line_break_is_refused():
    values = {"database_uri": PG_URI, "admin_username": ADMIN[0], "admin_password": ADMIN[1]}
    back = _read_back(mlflow_start.auth_ini(values))
    assert back == {"default_permission": "NO_PERMISSIONS", **values}
    with pytest.raises(configparser.InterpolationSyntaxError):  # what MLflow hit before the escaping
        dict(_read_back(f"[mlflow]\ndatabase_uri = {PG_URI}\n"))
    with pytest.raises(mlflow_start.StartError, match="^admin_password holds a line break") as caught:
        mlflow_start.auth_ini({"admin_password": "long-password\ndefault_permission = MANAGE"})
    assert "long-password" not in str(caught.value)


def test_a_missing_setting_is_named_without_starting_anything(tmp_path):
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")}
    env.pop("KFTUNE_MLFLOW_ADMIN_PASSWORD", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "true"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("mlflow_start: MLFLOW_AUTH_DATABASE_URI is not set")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The script as the Deployment runs it, exec'ing a real MLflow server with the basic-auth app."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp / 'basic_auth.db'}",
        "KFTUNE_MLFLOW_ADMIN_USERNAME": ADMIN[0],
        "KFTUNE_MLFLOW_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_TRACKING_USERNAME": PIPELINE[0],
        "MLFLOW_TRACKING_PASSWORD": PIPELINE[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [sys.executable, str(SCRIPT), executable("mlflow", "mlflow"), "server", "--app-name", "basic-auth"]
    command += ["--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "art")]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    log = (tmp / "mlflow.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow did not start (exit {proc.poll()}):\n{(tmp / 'mlflow.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, tmp
    finally:
        stop_process(proc)
        log.close()


def _api(url: str, login: tuple[str, str], method: str, path: str, **body) -> requests.Response:
    call = requests.get if method == "GET" else requests.post
    payload = {"params": body} if method == "GET" else {"json": body}
    return call(f"{url}/api/2.0/mlflow/{path}", auth=login, timeout=30, **payload)


def test_the_ini_is_private_and_the_server_holds_no_login_in_its_environment(server):
    url, proc, tmp = server
    ini = tmp / "basic_auth.ini"
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert _read_back(ini.read_text())["admin_password"] == ADMIN[1]
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()  # the exec'd server, same pid as the script
    assert b"MLFLOW_AUTH_CONFIG_PATH=" in environ
    assert ADMIN[1].encode() not in environ and PIPELINE[1].encode() not in environ


def test_the_admin_logs_in_with_the_hostile_password_and_the_pipeline_user_is_no_admin(server):
    url, _, _ = server
    got = _api(url, ADMIN, "GET", "users/get", username=PIPELINE[0])
    assert got.status_code == 200, got.text
    assert got.json()["user"]["is_admin"] is False
    assert _api(url, (ADMIN[0], "wrong-password-123"), "GET", "users/get", username=ADMIN[0]).status_code == 401


def test_the_pipeline_user_uses_what_it_creates_and_nothing_else(server):
    url, _, _ = server
    made = _api(url, PIPELINE, "POST", "experiments/create", name="kftune-pipeline-runs")
    assert made.status_code == 200, made.text
    run = _api(url, PIPELINE, "POST", "runs/create", experiment_id=made.json()["experiment_id"])
    assert run.status_code == 200, run.text
    assert _api(url, PIPELINE, "POST", "registered-models/create", name="kftune-model").status_code == 200
    # the admin's own experiment and model are invisible to it, and it administers nobody
    theirs = _api(url, ADMIN, "POST", "experiments/create", name="someone-elses").json()["experiment_id"]
    assert _api(url, ADMIN, "POST", "registered-models/create", name="someone-elses-model").status_code == 200
    assert _api(url, PIPELINE, "GET", "experiments/get", experiment_id=theirs).status_code == 403
    assert _api(url, PIPELINE, "GET", "registered-models/get", name="someone-elses-model").status_code == 403
    assert _api(url, PIPELINE, "POST", "users/create", username="intruder", password="x" * 16).status_code == 403
    assert _api(url, PIPELINE, "GET", "users/get", username=ADMIN[0]).status_code == 403
