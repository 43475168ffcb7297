"""How a run on other machines hands its output back: rank 0 uploads it, then names it in published.json.

On a cluster the train step starts the training as a TrainJob and cannot see its nodes' disks; it reads
`<publish_to>/published.json` once the job completes. The pointer is written after the upload, whose own
manifest is written last, so a pointer always names a complete artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.errors import KftuneError
from kftune.core.storage import connect_s3, split_uri, upload_dir

POINTER = "published.json"


@dataclass(frozen=True)
class Published:
    """What rank 0 uploaded: the output folder's artifact and its train_metrics.json."""

    uri: str
    sha256: str
    metrics: dict[str, Any]


def _where(publish_to: str) -> tuple[str, str]:
    """(bucket, key) of the pointer under `publish_to` (config.py has checked it is an s3:// prefix)."""
    bucket, prefix = split_uri(publish_to)
    return bucket, f"{prefix}/{POINTER}".lstrip("/")


def publish(out: Path, publish_to: str) -> Published:
    """Upload the finished output folder under `<publish_to>/model/` and name it in the pointer."""
    s3 = connect_s3()
    artifact = upload_dir(out, f"{publish_to.rstrip('/')}/model", s3)
    metrics = json.loads((out / artifacts.TRAIN_METRICS).read_text(encoding="utf-8"))
    published = Published(artifact.uri, artifact.sha256, metrics)
    bucket, key = _where(publish_to)
    body = json.dumps({"uri": published.uri, "sha256": published.sha256, "metrics": metrics}, ensure_ascii=False)
    s3.client.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")
    return published


def read_published(publish_to: str) -> Published:
    """The output a finished run named; a clear error when the run ended without publishing one."""
    s3 = connect_s3()
    bucket, key = _where(publish_to)
    try:
        body = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.client.exceptions.NoSuchKey:
        raise KftuneError(
            f"{publish_to}/{POINTER} does not exist: the training job ended without publishing its output; "
            "see its log (node 0) for why"
        ) from None
    found = json.loads(body)
    return Published(found["uri"], found["sha256"], found["metrics"])


def forget(publish_to: str) -> None:
    """Remove the pointer an earlier run under this prefix left, before a new run starts there."""
    s3 = connect_s3()
    bucket, key = _where(publish_to)
    s3.client.delete_object(Bucket=bucket, Key=key)
