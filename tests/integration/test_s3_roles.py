"""Dev's S3 identities (k8s/overlays/dev/seaweedfs_identities.py, the very file SeaweedFS's init container
runs) in front of a real `weed mini`: each role does what it needs and is refused the rest; above all,
serving's read-only keys cannot write or delete, and only the admin makes buckets."""

from __future__ import annotations

import importlib.util
import os
import secrets
import stat
import subprocess
import sys
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from kftune.dev.processes import HOST, free_ports
from kftune.dev.stack import StackConfig, _weed_command
from kftune.dev.weed_ports import remove_weed_sockets, weed_ports

from ..conftest import REPO
from .conftest import stop_process

pytestmark = pytest.mark.integration
SCRIPT = REPO / "k8s" / "overlays" / "dev" / "seaweedfs_identities.py"
_spec = importlib.util.spec_from_file_location("seaweedfs_identities", SCRIPT)
seaweedfs_identities = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seaweedfs_identities)
BUCKET = "kftune"
KEYS = {role: (secrets.token_hex(10).upper(), secrets.token_urlsafe(30)) for role in seaweedfs_identities.ROLES}


def _env() -> dict[str, str]:
    env = {"KFTUNE_BUCKET": BUCKET}
    for role, (key, secret) in KEYS.items():
        env[f"S3_{role.upper()}_ACCESS_KEY_ID"], env[f"S3_{role.upper()}_SECRET_ACCESS_KEY"] = key, secret
    return env


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """A weed mini reading the identity file the script writes; one S3 client per role."""
    tmp = tmp_path_factory.mktemp("s3-roles")
    ids = tmp / "s3.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(ids)], env={**os.environ, **_env()}, capture_output=True)
    assert done.returncode == 0, done.stderr
    s3_port, mlflow_port = free_ports(2)
    cfg = StackConfig(tmp / "state", s3_port, mlflow_port, bucket=BUCKET)
    cfg.state_dir.mkdir()
    ports = weed_ports(None, taken={s3_port, mlflow_port})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with (tmp / "weed.log").open("w") as log:
        weed = subprocess.Popen(_weed_command(cfg, ports, ids), env=env, stdout=log, stderr=subprocess.STDOUT)
    made = {
        role: boto3.client(
            "s3",
            endpoint_url=f"http://{HOST}:{s3_port}",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )
        for role, (key, secret) in KEYS.items()
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                made["admin"].list_buckets()
                break
            except Exception:
                if weed.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"weed mini did not start:\n{(tmp / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield made, ids
    finally:
        stop_process(weed)
        remove_weed_sockets({"s3_port": s3_port, "weed_ports": ports})


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return caught.value.response["Error"]["Code"]


def test_each_role_does_its_work_and_serving_cannot_write(clients):
    made, ids = clients
    assert stat.S_IMODE(ids.stat().st_mode) == 0o600
    admin, tasks, mlflow, serving = (made[r] for r in ("admin", "tasks", "mlflow", "serving"))
    assert _refused(tasks.create_bucket, Bucket=BUCKET) == "AccessDenied"
    admin.create_bucket(Bucket=BUCKET)
    # tasks: the whole bucket; MLflow: its prefix only
    tasks.put_object(Bucket=BUCKET, Key="pipeline/run/data.jsonl", Body=b"rows")
    mlflow.put_object(Bucket=BUCKET, Key="mlflow/1/models/m-1/artifacts/model/config.json", Body=b"{}")
    assert _refused(mlflow.put_object, Bucket=BUCKET, Key="pipeline/run/x", Body=b"x") == "AccessDenied"
    assert _refused(mlflow.get_object, Bucket=BUCKET, Key="pipeline/run/data.jsonl") == "AccessDenied"
    # serving reads registered models, and nothing else; it writes and deletes nothing
    key = "mlflow/1/models/m-1/artifacts/model/config.json"
    assert serving.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"{}"
    listed = serving.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/1/models/m-1/")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert _refused(serving.put_object, Bucket=BUCKET, Key=key, Body=b"tampered") == "AccessDenied"
    assert _refused(serving.put_object, Bucket=BUCKET, Key="mlflow/new", Body=b"x") == "AccessDenied"
    assert _refused(serving.delete_object, Bucket=BUCKET, Key=key) == "AccessDenied"
    assert _refused(serving.get_object, Bucket=BUCKET, Key="pipeline/run/data.jsonl") == "AccessDenied"
    assert _refused(serving.list_objects_v2, Bucket=BUCKET) == "AccessDenied"
    assert tasks.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"{}"  # unchanged


def test_a_missing_or_shared_key_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "s3.json"
    env = {**os.environ, **_env()}
    del env["S3_SERVING_SECRET_ACCESS_KEY"]
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.strip() == (
        "seaweedfs_identities: S3_SERVING_SECRET_ACCESS_KEY not set: the serving role's keys come from its Secret"
    )
    shared = {**_env(), "S3_SERVING_ACCESS_KEY_ID": KEYS["tasks"][0]}
    with pytest.raises(seaweedfs_identities.IdentityError, match="serving and tasks roles share an access key"):
        seaweedfs_identities.identities(shared)
