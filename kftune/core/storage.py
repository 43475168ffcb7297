"""Heavy artifacts in S3-compatible storage, content-addressed and verified.

An artifact is a folder stored at ``s3://bucket/prefix/<sha256>/`` whose ``MANIFEST.json`` lists
every file with its size and sha256. The manifest's own sha256 is the folder name, and it is
written last, so a folder without it is an interrupted upload and a manifest that hashes to its
folder name vouches for every byte below it. Every read checks each file against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from kftune.core import artifacts
from kftune.core.errors import KftuneError

MANIFEST = artifacts.MANIFEST
MiB = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "Forbidden"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)


@dataclass(frozen=True)
class Artifact:
    """Where an artifact lives and the sha256 of its manifest (which names the folder)."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class S3:
    """A boto3 client plus the transfer settings every call here shares."""

    client: Any
    transfer: TransferConfig
    max_attempts: int

    @property
    def endpoint(self) -> str:
        return self.client.meta.endpoint_url


def connect_s3(
    endpoint_url: str | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    max_attempts: int = 4,
    timeout_s: float = 60.0,
    multipart_threshold: int = 64 * MiB,
) -> S3:
    """A client for `endpoint_url` (default: $AWS_ENDPOINT_URL, else AWS) with bounded retries.

    Credentials come from the arguments or boto3's usual chain (the environment). Retries use
    boto3's `standard` mode, which retries throttling and connection errors but not a rejected
    signature, so wrong credentials fail at once instead of in a retry storm. A stopped server
    fails all `max_attempts` in well under a second (backoff 50 ms x 2^i, jittered); a server that
    accepts but never answers costs `timeout_s` per attempt.
    """
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},  # first try included
        connect_timeout=min(5.0, timeout_s),
        read_timeout=timeout_s,
        # S3-compatible servers on a host:port can't do virtual-host bucket addressing.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint_url else None),
        config=config,
    )
    chunk = max(5 * MiB, min(multipart_threshold, 16 * MiB))  # S3 parts: at least 5 MiB; 16 bounds memory
    transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=chunk)
    return S3(client=client, transfer=transfer, max_attempts=max_attempts)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_manifest(local_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Relative POSIX path -> {sha256, size} for every file under `local_dir`."""
    return _manifest(_files(local_dir))


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The one byte form of a manifest, so equal contents always hash equal."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def upload_dir(local_dir: str | Path, dest: str, s3: S3 | None = None) -> Artifact:
    """Upload a folder to `dest`/<sha256>/, manifest last; a folder already there is not sent again."""
    return _upload(_files(local_dir), dest, s3 or connect_s3())


def upload_file(path: str | Path, dest: str, s3: S3 | None = None) -> Artifact:
    """Upload one file as a one-file artifact; the URI names the file inside the artifact folder."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{path} is not a file; pass the file to upload")
    folder = _upload({path.name: path}, dest, s3 or connect_s3())
    return Artifact(uri=f"{folder.uri}/{path.name}", sha256=folder.sha256)


def download_dir(uri: str, local_dir: str | Path, s3: S3 | None = None) -> Path:
    """Download and verify the artifact holding `uri` into `local_dir` (kept if already verified there).

    Files land in a temporary sibling folder that is renamed into place only once every file
    matches the manifest, so `local_dir` is either absent or complete.
    """
    bucket, base, _ = split_artifact_uri(uri)
    sha = base.rsplit("/", 1)[-1]
    local_dir = Path(local_dir)
    if _is_local_copy(local_dir, sha):
        return local_dir
    if local_dir.exists():
        raise KftuneError(f"{local_dir} exists but is not a verified copy of {uri}; remove it or pick another folder")
    s3 = s3 or connect_s3()
    manifest = _read_manifest(s3, bucket, base)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
    try:
        for rel, entry in manifest.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with _s3_errors(s3, f"s3://{bucket}/{base}/{rel}"):
                s3.client.download_file(bucket, f"{base}/{rel}", str(target), Config=s3.transfer)
            _verify(target, entry, f"s3://{bucket}/{base}/{rel}", s3.endpoint)
        (tmp / MANIFEST).write_bytes(canonical_json(manifest))
        _move_into_place(tmp, local_dir, sha)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def default_cache_dir() -> Path:
    """Where verified downloads are kept: `$KFTUNE_CACHE` (the images mount a volume there) or ~/.cache/kftune."""
    return Path(os.environ.get("KFTUNE_CACHE", Path.home() / ".cache" / "kftune"))


def resolve_path(path_or_uri: str, cache_dir: str | Path | None = None, s3: S3 | None = None) -> str:
    """A local path for an `s3://` artifact URI (downloaded and verified once into `cache_dir`).

    Anything else, a local path or a hub id such as `Qwen/Qwen2.5-0.5B-Instruct`, comes back as is.
    """
    if not path_or_uri.startswith("s3://"):
        return path_or_uri
    _, base, member = split_artifact_uri(path_or_uri)
    local = download_dir(path_or_uri, Path(cache_dir or default_cache_dir()) / base.rsplit("/", 1)[-1], s3)
    if member and not (local / member).exists():
        raise KftuneError(f"{path_or_uri}: the artifact holds no {member!r}; check the URI")
    return str(local / member) if member else str(local)


def list_artifacts(prefix: str, s3: S3 | None = None) -> list[str]:
    """URIs of the artifact folders anywhere under `prefix` that hold a manifest (not yet verified).

    A folder whose upload was cut short has no manifest and is not listed.
    """
    s3 = s3 or connect_s3()
    bucket, key = split_uri(prefix)
    found = []
    with _s3_errors(s3, prefix):
        for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/".lstrip("/")):
            for item in page.get("Contents", []):
                folder, _, name = item["Key"].rpartition("/")
                if name == MANIFEST and _SHA256.fullmatch(folder.rsplit("/", 1)[-1]):
                    found.append(f"s3://{bucket}/{folder}")
    return sorted(found)


def delete_tree(prefix: str, s3: S3 | None = None) -> int:
    """Delete every object under `prefix`, manifests first, so no folder ever looks complete while half gone."""
    s3 = s3 or connect_s3()
    bucket, key = split_uri(prefix)
    with _s3_errors(s3, prefix):
        keys = [
            item["Key"]
            for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/".lstrip("/"))
            for item in page.get("Contents", [])
        ]
        keys.sort(key=lambda k: k.rsplit("/", 1)[-1] != MANIFEST)
        for k in keys:  # one by one: manifests must be gone before any file they vouch for
            s3.client.delete_object(Bucket=bucket, Key=k)
    return len(keys)


def _files(local_dir: str | Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file under `local_dir`."""
    root = Path(local_dir)
    if not root.is_dir():
        raise KftuneError(f"{root} is not a folder; pass the folder to upload")
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    if not files:
        raise KftuneError(f"{root} holds no files; there is nothing to upload")
    if MANIFEST in files:
        raise KftuneError(f"{root / MANIFEST} clashes with the artifact manifest's name; rename or remove it")
    return files


def _manifest(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()}


def _upload(files: dict[str, Path], dest: str, s3: S3) -> Artifact:
    manifest = _manifest(files)
    body = canonical_json(manifest)
    sha = hashlib.sha256(body).hexdigest()
    bucket, prefix = split_uri(dest)
    base = f"{prefix}/{sha}".lstrip("/")
    artifact = Artifact(uri=f"s3://{bucket}/{base}", sha256=sha)
    with _s3_errors(s3, artifact.uri):
        if _exists(s3, bucket, f"{base}/{MANIFEST}"):
            return artifact
        for rel, path in files.items():
            s3.client.upload_file(str(path), bucket, f"{base}/{rel}", Config=s3.transfer)
        s3.client.put_object(Bucket=bucket, Key=f"{base}/{MANIFEST}", Body=body, ContentType="application/json")
    return artifact


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise KftuneError(f"{uri!r} is not an S3 URI; expected s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def split_artifact_uri(uri: str) -> tuple[str, str, str]:
    """s3://b/p/<sha>/sub/file -> ("b", "p/<sha>", "sub/file"): the folder is the last sha256 segment."""
    bucket, key = split_uri(uri)
    parts = key.split("/")
    shas = [i for i, part in enumerate(parts) if _SHA256.fullmatch(part)]
    if not shas:
        raise KftuneError(f"{uri} is not a kftune artifact URI; expected s3://bucket/prefix/<sha256>[/file]")
    cut = shas[-1] + 1
    return bucket, "/".join(parts[:cut]), "/".join(parts[cut:])


def _exists(s3: S3, bucket: str, key: str) -> bool:
    try:
        s3.client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def _read_manifest(s3: S3, bucket: str, base: str) -> dict[str, dict[str, Any]]:
    """The manifest of s3://bucket/base, checked against the sha256 that names the folder."""
    where = f"s3://{bucket}/{base}/{MANIFEST}"
    with _s3_errors(s3, where):
        if not _exists(s3, bucket, f"{base}/{MANIFEST}"):
            raise KftuneError(
                f"{where} not found at {s3.endpoint}: the artifact is incomplete (an interrupted upload) "
                "or the URI is wrong; re-run the step that produced it"
            )
        body = s3.client.get_object(Bucket=bucket, Key=f"{base}/{MANIFEST}")["Body"].read()
    expected = base.rsplit("/", 1)[-1]
    if hashlib.sha256(body).hexdigest() != expected:
        raise KftuneError(
            f"{where} does not hash to its folder name {expected}: it was altered; re-upload the artifact"
        )
    manifest = json.loads(body)
    outside = [rel for rel in manifest if rel.startswith("/") or ".." in rel.split("/")]
    if outside:
        raise KftuneError(f"{where} lists {outside[0]!r}, a path outside the artifact; refusing to download it")
    return manifest


def _verify(path: Path, entry: dict[str, Any], where: str, endpoint: str) -> None:
    size = path.stat().st_size
    if size != entry["size"]:
        raise KftuneError(
            f"{where} at {endpoint} has {size} bytes, the manifest says {entry['size']}: "
            "the stored object is corrupt; re-upload the artifact"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise KftuneError(
            f"{where} at {endpoint} has sha256 {digest}, the manifest says {entry['sha256']}: "
            "the stored object is corrupt; re-upload the artifact"
        )


def _is_local_copy(local_dir: Path, sha: str) -> bool:
    """True when `local_dir` holds this artifact's manifest and every file at its size.

    Sizes suffice here: such a folder only ever appears by renaming a fully verified download.
    """
    manifest_path = local_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    body = manifest_path.read_bytes()
    if hashlib.sha256(body).hexdigest() != sha:
        return False
    files = json.loads(body).items()
    return all(
        (local_dir / rel).is_file() and (local_dir / rel).stat().st_size == entry["size"] for rel, entry in files
    )


def _move_into_place(tmp: Path, local_dir: Path, sha: str) -> None:
    """Rename the verified download into place; a concurrent reader that got there first wins."""
    try:
        tmp.rename(local_dir)
    except OSError:
        if not _is_local_copy(local_dir, sha):
            raise


def _cause(exc: BaseException) -> BaseException:
    """The boto error under wrappers such as S3UploadFailedError, which only chain it implicitly."""
    seen = exc
    while not isinstance(seen, (ClientError, NoCredentialsError, *_UNREACHABLE)):
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            return exc
        seen = nxt
    return seen


@contextlib.contextmanager
def _s3_errors(s3: S3, where: str) -> Iterator[None]:
    """Turn boto errors into one KftuneError that names S3, the endpoint and the object, never a secret."""
    try:
        yield
    except KftuneError:
        raise
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, NoCredentialsError):
            raise KftuneError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        if isinstance(cause, _UNREACHABLE):
            raise KftuneError(
                f"cannot reach S3 at {s3.endpoint} after {s3.max_attempts} attempts ({type(cause).__name__}); "
                "check that the service runs (`kftune stack status` for the local one) and AWS_ENDPOINT_URL"
            ) from None
        if not isinstance(cause, ClientError):
            raise
        code = str(cause.response.get("Error", {}).get("Code"))
        if code in _AUTH_CODES:
            raise KftuneError(
                f"S3 at {s3.endpoint} rejected the credentials for {where} ({code}); check AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (the local stack keeps its own in <state-dir>/credentials.env)"
            ) from None
        if code == "NoSuchBucket":
            raise KftuneError(
                f"bucket {where.split('/')[2]} does not exist at S3 {s3.endpoint} (for {where}); "
                "create it or fix the URI"
            ) from None
        if code in {"404", "NoSuchKey", "NotFound"}:
            raise KftuneError(f"{where} not found at S3 {s3.endpoint}; check the URI") from None
        message = cause.response.get("Error", {}).get("Message", "")
        raise KftuneError(f"S3 at {s3.endpoint} refused {where}: {code} {message}".rstrip()) from None
