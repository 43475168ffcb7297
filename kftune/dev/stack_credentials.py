"""The local stack's S3 keys: taken from the environment, else kept (mode 0600) in its state folder, else made.

Only two files hold the secret, both written here: credentials.env and the identity file SeaweedFS reads.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from kftune.core.errors import KftuneError

CREDENTIALS = "credentials.env"


def credentials(state: Path) -> tuple[str, str]:
    """The environment's keys if both are set, else the ones kept here, else new ones; kept 0600 here."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        path = state / CREDENTIALS
        fresh = (secrets.token_hex(10).upper(), secrets.token_hex(20))
        key, secret = read_credentials(path) if path.exists() else fresh
    write_private(state / CREDENTIALS, f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}\n")
    return key, secret


def read_credentials(path: Path) -> tuple[str, str]:
    try:
        pairs = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return pairs["AWS_ACCESS_KEY_ID"], pairs["AWS_SECRET_ACCESS_KEY"]
    except (OSError, KeyError):
        raise KftuneError(
            f"{path} is missing or lacks AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; "
            "run `kftune stack down`, remove it and run `kftune stack up` to make new ones"
        ) from None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any older copy atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp may carry looser bits
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_identities(state: Path, key: str, secret: str) -> Path:
    """SeaweedFS's S3 identity file: one admin identity with the stack's keys."""
    path = state / "s3-identities.json"
    identity = {
        "name": "kftune",
        "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    write_private(path, json.dumps({"identities": [identity]}))
    return path
