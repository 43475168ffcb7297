"""No credential value in anything a full pipeline run leaves behind.

One `kftune pipeline run` (LoRA, two steps on the tiny model) through kfp.local against the session
stack, with an MLflow username and password set as a cluster's Secret would set them (the local
server has no auth and ignores them; the client sends them with every request). Then every place a
value could end up is read back: the CLI's stdout and stderr, every file under the pipeline root
(kfp.local's task records and logs) and the download cache, the stack's logs and data files (MLflow's
SQLite database, SeaweedFS's volumes), the compiled YAML, the MLflow run, model and versions (params,
tags, metrics, sources) and every object the run stored in S3. Planting a value in three of those
places shows the search would see one.
"""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import pytest

from kftune.core.storage import S3, connect_s3
from kftune.dev.stack import CREDENTIALS, StackInfo

from ..conftest import run_cli

pytestmark = pytest.mark.integration
PRIVATE = {CREDENTIALS, "s3-identities.json"}  # the stack's two 0600 files, which hold the keys by design
QUICK = [
    "--method",
    "lora",
    "--max-steps",
    "2",
    "--lora-r",
    "8",
    "--lora-alpha",
    "16",
    "--max-seq-length",
    "256",
    "--per-device-train-batch-size",
    "4",
    "--gradient-accumulation-steps",
    "1",
    "--eval-fraction",
    "0.25",
    "--sample-tokens",
    "8",
]


def _files(root: Path, skip: set[str] = frozenset()) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _mlflow(stack: StackInfo, model: str, run_id: str) -> dict[str, bytes]:
    """The run, the registered model and each of its versions, as MLflow serves them."""
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(run_id)
    found = {
        "mlflow run": {
            "params": run.data.params,
            "tags": run.data.tags,
            "metrics": run.data.metrics,
            "info": str(run.info),
        },
        "mlflow model": {
            "tags": client.get_registered_model(model).tags,
            "description": client.get_registered_model(model).description,
        },
    }
    for version in client.search_model_versions(f"name='{model}'"):
        full = client.get_model_version(model, version.version)
        found[f"mlflow version {version.version}"] = {
            "tags": full.tags,
            "source": full.source,
            "description": full.description,
            "run_link": full.run_link,
        }
    return {where: json.dumps(value, default=str).encode() for where, value in found.items()}


def _objects(s3: S3, bucket: str, prefixes: list[str]) -> dict[str, bytes]:
    found = {}
    for prefix in prefixes:
        for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[f"s3://{bucket}/{obj['Key']}"] = s3.client.get_object(Bucket=bucket, Key=obj["Key"])[
                    "Body"
                ].read()
    return found


def _leaks(outputs: dict[str, bytes], values: dict[str, str]) -> list[tuple[str, str]]:
    """(where, which credential) for every output that holds a credential value."""
    return [
        (where, name) for where, data in outputs.items() for name, value in values.items() if value.encode() in data
    ]


@pytest.fixture(scope="module")
def credentials(stack: StackInfo) -> dict[str, str]:
    return {
        "AWS_SECRET_ACCESS_KEY": stack.secret_key,
        "AWS_ACCESS_KEY_ID": stack.access_key,
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16),
    }


def test_no_credential_in_any_output_of_a_pipeline_run(
    stack: StackInfo, credentials: dict[str, str], tiny_model: Path, small_data: Path, tmp_path: Path
) -> None:
    model, root = f"secrets-{uuid.uuid4().hex[:8]}", f"secrets/{uuid.uuid4().hex[:8]}"
    env = {
        **stack.env(),
        "MLFLOW_TRACKING_USERNAME": "kftune",
        "MLFLOW_TRACKING_PASSWORD": credentials["MLFLOW_TRACKING_PASSWORD"],
        "KFTUNE_CACHE": str(tmp_path / "cache"),
    }
    run = run_cli(
        "-m",
        "kftune.cli",
        "pipeline",
        "run",
        "--state-dir",
        str(stack.state_dir),
        "--pipeline-root",
        str(tmp_path / "runs"),
        "--base-model",
        str(tiny_model),
        "--data-uri",
        str(small_data),
        "--registered-model-name",
        model,
        "--artifact-root",
        f"s3://{stack.bucket}/{root}",
        *QUICK,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = run_cli("-m", "kftune.cli", "pipeline", "compile", "-o", str(tmp_path / "finetune.yaml"), env=env)
    assert compiled.returncode == 0, compiled.stderr
    run_id = next(line.rsplit("/", 1)[1] for line in run.stdout.splitlines() if line.startswith("MLflow run"))
    s3 = connect_s3(stack.s3_endpoint, access_key=stack.access_key, secret_key=stack.secret_key)
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_run(run_id).info.experiment_id

    def outputs() -> dict[str, bytes]:
        return {
            "stdout": run.stdout.encode(),
            "stderr": run.stderr.encode(),
            "compile output": (compiled.stdout + compiled.stderr).encode(),
            **_files(tmp_path),
            **_files(stack.state_dir, skip=PRIVATE),
            **_mlflow(stack, model, run_id),
            **_objects(s3, stack.bucket, [f"{root}/", f"mlflow/{experiment}/{run_id}/"]),
        }

    found = outputs()
    kinds = {
        "tasks.log",
        "executor_output.json",
        "finetune.yaml",
        "mlflow.log",
        "weed.log",
        "metrics.json",
        "samples.jsonl",
        "report.html",
        "report.json",
        "adapter_model.safetensors",
        "mlflow run",
        "mlflow version 1",
    }
    assert kinds <= {where.rsplit("/", 1)[-1] for where in found}  # the search does reach each kind of output
    assert _leaks(found, credentials) == []

    planted = tmp_path / "runs" / "deep" / "inside" / "task.log"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"\x00binary\xff" + credentials["AWS_SECRET_ACCESS_KEY"].encode() + b"\n")
    s3.client.put_object(Bucket=stack.bucket, Key=f"{root}/leak.txt", Body=f"key={credentials['AWS_ACCESS_KEY_ID']}")
    client.set_tag(run_id, "oops", credentials["MLFLOW_TRACKING_PASSWORD"])
    leaks = set(_leaks(outputs(), credentials))
    assert leaks >= {
        (str(planted), "AWS_SECRET_ACCESS_KEY"),
        ("mlflow run", "MLFLOW_TRACKING_PASSWORD"),
        (f"s3://{stack.bucket}/{root}/leak.txt", "AWS_ACCESS_KEY_ID"),
    }
    stores = (stack.state_dir / "mlflow.db", stack.state_dir / "weed")  # the servers' own data files hold them too
    assert all(where.startswith(("s3://", "mlflow ", str(planted), *map(str, stores))) for where, _ in leaks)
