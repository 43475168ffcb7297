"""Content-addressed artifacts against the real SeaweedFS S3 of the session stack."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kftune.core.errors import KftuneError
from kftune.core.storage import (
    MANIFEST,
    S3,
    MiB,
    canonical_json,
    connect_s3,
    download_dir,
    resolve_path,
    tree_manifest,
    upload_dir,
    upload_file,
)
from kftune.dev.stack import StackConfig, StackInfo, down, free_ports, up

pytestmark = pytest.mark.integration
WRITES = {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}


@pytest.fixture
def s3(stack_env: StackInfo) -> S3:
    return connect_s3(multipart_threshold=5 * MiB)


@pytest.fixture
def dest(stack_env: StackInfo, request: pytest.FixtureRequest) -> str:
    return f"s3://{stack_env.bucket}/tests/{request.node.name}"


def _tree(root: Path, weights: int = 64 * 1024) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"r": 8}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(weights))
    return root


def _calls(s3: S3, event: str = "before-parameter-build.s3") -> list[tuple[str, str]]:
    """(operation, key) of each call the real client makes, seen through boto3's own event hooks."""
    seen: list[tuple[str, str]] = []

    def record(params: dict | None = None, model: object = None, **_: object) -> None:
        seen.append((getattr(model, "name", ""), (params or {}).get("Key", "")))

    s3.client.meta.events.register(event, record)
    return seen


def _failure(attempt: Callable[[], object], sent: list) -> tuple[str, float, int]:
    """Run `attempt`, which must raise KftuneError: its message, the seconds it took and the requests sent."""
    sent.clear()
    started = time.monotonic()
    with pytest.raises(KftuneError) as caught:
        attempt()
    return str(caught.value), time.monotonic() - started, len(sent)


def _key(uri: str) -> str:
    return uri.split("/", 3)[3]


def test_round_trip_uses_multipart_for_large_files(s3: S3, dest: str, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", weights=12 * MiB)
    art = upload_dir(src, dest, s3)

    assert art.uri == f"{dest}/{art.sha256}"
    assert art.sha256 == hashlib.sha256(canonical_json(tree_manifest(src))).hexdigest()
    etag = s3.client.head_object(Bucket=dest.split("/")[2], Key=f"{_key(art.uri)}/sub/weights.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three 5 MiB parts
    out = download_dir(art.uri, tmp_path / "out", s3)
    for rel in ("config.json", "sub/weights.bin"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()


def test_same_content_same_uri_and_no_second_upload(s3: S3, dest: str, tmp_path: Path) -> None:
    first = upload_dir(_tree(tmp_path / "a"), dest, s3)
    copy = shutil.copytree(tmp_path / "a", tmp_path / "b")
    calls = _calls(s3)
    assert upload_dir(copy, dest, s3) == first
    assert not [c for c in calls if c[0] in WRITES]
    (copy / "config.json").write_text('{"r": 16}')
    assert upload_dir(copy, dest, s3).uri != first.uri


def test_manifest_is_written_last(s3: S3, dest: str, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    calls = _calls(s3)
    art = upload_dir(src, dest, s3)

    written = [key for op, key in calls if op in {"PutObject", "CompleteMultipartUpload"}]
    assert len(written) == 3 and written[-1] == f"{_key(art.uri)}/{MANIFEST}"
    listed = s3.client.list_objects_v2(Bucket=dest.split("/")[2], Prefix=f"{_key(art.uri)}/")["Contents"]
    names = sorted(o["Key"].rsplit(f"{art.sha256}/", 1)[1] for o in listed)
    assert names == [MANIFEST, "config.json", "sub/weights.bin"]
    body = s3.client.get_object(Bucket=dest.split("/")[2], Key=written[-1])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == art.sha256
    assert json.loads(body) == tree_manifest(src)


def test_flipped_byte_is_caught_and_nothing_is_left(s3: S3, dest: str, tmp_path: Path) -> None:
    art = upload_dir(_tree(tmp_path / "src"), dest, s3)
    bucket, key = dest.split("/")[2], f"{_key(art.uri)}/sub/weights.bin"
    body = bytearray(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF  # same size: only the sha256 can tell
    s3.client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    expected = rf"{art.uri}/sub/weights\.bin at http://127\.0\.0\.1:\d+ has sha256 [0-9a-f]{{64}}, the manifest says .* corrupt"
    with pytest.raises(KftuneError, match=expected):
        download_dir(art.uri, tmp_path / "out", s3)
    cache = tmp_path / "cache"
    with pytest.raises(KftuneError, match=expected):
        resolve_path(f"{art.uri}/config.json", cache, s3)  # config.json itself is intact: the whole artifact is refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "src"]  # no partial or temporary folder
    assert list(cache.iterdir()) == []


def test_artifact_without_manifest_is_refused(s3: S3, dest: str, tmp_path: Path) -> None:
    art = upload_dir(_tree(tmp_path / "src"), dest, s3)
    s3.client.delete_object(Bucket=dest.split("/")[2], Key=f"{_key(art.uri)}/{MANIFEST}")
    with pytest.raises(KftuneError, match="MANIFEST.json not found .* incomplete"):
        download_dir(art.uri, tmp_path / "out", s3)
    assert not (tmp_path / "out").exists()


def test_altered_manifest_is_refused(s3: S3, dest: str, tmp_path: Path) -> None:
    art = upload_dir(_tree(tmp_path / "src"), dest, s3)
    manifest = tree_manifest(tmp_path / "src")
    manifest["config.json"]["size"] += 1
    s3.client.put_object(Bucket=dest.split("/")[2], Key=f"{_key(art.uri)}/{MANIFEST}", Body=canonical_json(manifest))
    with pytest.raises(KftuneError, match="does not hash to its folder name"):
        download_dir(art.uri, tmp_path / "out", s3)


def test_resolve_path_downloads_once_into_the_cache(s3: S3, dest: str, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    art = upload_file(data, dest, s3)
    assert art.uri.endswith(f"/{art.sha256}/train.jsonl")

    cache = tmp_path / "cache"
    local = resolve_path(art.uri, cache, s3)
    assert local == str(cache / art.sha256 / "train.jsonl")
    assert Path(local).read_bytes() == data.read_bytes()
    calls = _calls(s3)
    assert resolve_path(art.uri, cache, s3) == local
    assert calls == []  # served from the verified cache
    for unchanged in (str(data), "Qwen/Qwen2.5-0.5B-Instruct"):
        assert resolve_path(unchanged, cache) == unchanged


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_are_one_clear_error_without_retries(
    variable: str, stack_env: StackInfo, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "x.txt"
    data.write_text("x")
    uploaded = upload_file(data, dest)
    wrong = secrets.token_hex(20) if variable == "AWS_SECRET_ACCESS_KEY" else "KFTUNE" + secrets.token_hex(7).upper()
    monkeypatch.setenv(variable, wrong)
    s3 = connect_s3()
    sent = _calls(s3, "before-send.s3")

    attempts = (
        lambda: upload_file(data, f"{dest}-other", s3),
        lambda: download_dir(uploaded.uri, tmp_path / "out", s3),
    )
    for attempt in attempts:
        message, seconds, requests = _failure(attempt, sent)
        assert seconds < 3 and requests == 1  # not retried
        assert f"S3 at {stack_env.s3_endpoint} rejected the credentials" in message
        for value in (wrong, stack_env.secret_key, stack_env.access_key):
            assert value not in message
    assert not (tmp_path / "out").exists()


def test_a_stopped_s3_server_gives_bounded_retries_then_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A throwaway stack, since the session's must stay up: upload, stop it for real, then read and write."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cfg = StackConfig(tmp_path / "stack", *free_ports(2))
    try:
        info = up(cfg)
        s3 = connect_s3(info.s3_endpoint, access_key=info.access_key, secret_key=info.secret_key)
        src = _tree(tmp_path / "src")
        art = upload_dir(src, f"s3://{info.bucket}/models", s3)
        assert "weed" in down(cfg.state_dir)  # SeaweedFS is stopped (its port closes), not just unreachable
        sent = _calls(s3, "before-send.s3")

        (src / "config.json").write_text('{"r": 4}')  # new content: the upload has to reach the server
        attempts = (
            lambda: download_dir(art.uri, tmp_path / "out", s3),
            lambda: upload_dir(src, f"s3://{info.bucket}/models", s3),
        )
        for attempt in attempts:
            message, seconds, requests = _failure(attempt, sent)
            assert seconds < 30 and requests == 4  # the first try and three retries, with backoff between them
            assert message.startswith(
                f"cannot reach S3 at {info.s3_endpoint} after 4 attempts "
                "(EndpointConnectionError); check that the service runs"
            )
            assert info.secret_key not in message and info.access_key not in message
        assert not (tmp_path / "out").exists()
    finally:
        down(cfg.state_dir)


# Runs in a child process that the test kills: parts go one at a time, and each finished call is reported.
_UPLOADER = """
import dataclasses, sys
from boto3.s3.transfer import TransferConfig
from kftune.core.storage import MiB, connect_s3, upload_dir
s3 = connect_s3()
s3 = dataclasses.replace(s3, transfer=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                                     max_concurrency=1))
s3.client.meta.events.register("after-call.s3", lambda model, **_: print(model.name, flush=True))
upload_dir(sys.argv[1], sys.argv[2], s3)
"""


def test_an_upload_killed_midway_is_invisible_to_readers_and_the_next_run_uploads_again(
    s3: S3, dest: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, size in (("a.bin", 64 * 1024), ("big.bin", 20 * MiB), ("c.bin", 64 * 1024)):  # uploaded in this order
        (src / name).write_bytes(os.urandom(size))
    sha = hashlib.sha256(canonical_json(tree_manifest(src))).hexdigest()
    uri, bucket = f"{dest}/{sha}", dest.split("/")[2]

    child = subprocess.Popen([sys.executable, "-c", _UPLOADER, str(src), dest], stdout=subprocess.PIPE, text=True)
    done = []
    for line in child.stdout:
        done.append(line.strip())
        if done[-1] == "UploadPart":  # the first of big.bin's four parts is stored
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert done == ["HeadObject", "PutObject", "CreateMultipartUpload", "UploadPart"]

    stored = s3.client.list_objects_v2(Bucket=bucket, Prefix=f"{_key(uri)}/").get("Contents", [])
    assert [o["Key"].rsplit("/", 1)[1] for o in stored] == ["a.bin"]  # no big.bin, no c.bin, no manifest
    pending = s3.client.list_multipart_uploads(Bucket=bucket, Prefix=f"{_key(uri)}/").get("Uploads", [])
    assert [u["Key"].rsplit("/", 1)[1] for u in pending] == ["big.bin"]  # killed inside it
    cache = tmp_path / "cache"
    with pytest.raises(KftuneError, match=rf"{uri}/MANIFEST\.json not found .* incomplete \(an interrupted upload\)"):
        resolve_path(f"{uri}/a.bin", cache, s3)  # a.bin is complete, but only the manifest vouches for it
    assert not cache.exists() or list(cache.iterdir()) == []

    calls = _calls(s3)
    assert upload_dir(src, dest, s3).uri == uri
    written = [key.rsplit("/", 1)[1] for op, key in calls if op in {"PutObject", "CompleteMultipartUpload"}]
    assert written == ["a.bin", "big.bin", "c.bin", MANIFEST]  # all again, manifest last
    out = download_dir(uri, tmp_path / "out", s3)
    assert all((out / name).read_bytes() == (src / name).read_bytes() for name in ("a.bin", "big.bin", "c.bin"))
    for upload in pending:  # what the killed process left: a real bucket would expire it by a lifecycle rule
        s3.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def test_missing_bucket_and_missing_artifact_are_named(s3: S3, stack_env: StackInfo, tmp_path: Path) -> None:
    data = tmp_path / "x.txt"
    data.write_text("x")
    with pytest.raises(KftuneError, match="bucket kftune-no-such-bucket does not exist"):
        upload_file(data, "s3://kftune-no-such-bucket/p", s3)
    with pytest.raises(KftuneError, match="incomplete"):
        download_dir(f"s3://{stack_env.bucket}/nowhere/{'0' * 64}", tmp_path / "out", s3)
    with pytest.raises(KftuneError, match="not a kftune artifact URI"):
        resolve_path(f"s3://{stack_env.bucket}/some/file.txt", tmp_path / "cache", s3)
