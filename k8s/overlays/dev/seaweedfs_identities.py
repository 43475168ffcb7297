"""SeaweedFS's S3 identities in dev: one per role, each from its own Secret, each allowed only what it needs.

Runs as the SeaweedFS pod's init container (the MLflow image: it has Python) from a ConfigMap that
kustomize generates from this file, and writes the identity file `weed -s3.config` reads into a
memory volume; tests/integration/test_s3_roles.py runs this same file in front of a real `weed mini`.
SeaweedFS scopes an action to a bucket or a key prefix (`Read:bucket/mlflow/*`) and refuses the rest.

Usage: python seaweedfs_identities.py OUT.json   (env: KFTUNE_BUCKET and S3_<ROLE>_ACCESS_KEY_ID /
S3_<ROLE>_SECRET_ACCESS_KEY for each role below)
"""

from __future__ import annotations

import json
import os
import sys

# role -> what it may do; {b} is the bucket. MLflow's server owns mlflow/ (its artifacts and registered
# models); serving reads only there; pipeline tasks read and write the bucket; only admin makes buckets.
ROLES = {
    "admin": ["Admin", "Read", "Write", "List", "Tagging"],  # the bucket Job
    "tasks": ["Read:{b}", "Write:{b}", "List:{b}", "Tagging:{b}"],  # kftune-s3, read by every pipeline task
    "mlflow": ["Read:{b}/mlflow/*", "Write:{b}/mlflow/*", "List:{b}/mlflow/*"],  # the MLflow server
    "serving": ["Read:{b}/mlflow/*", "List:{b}/mlflow/*"],  # KServe's storage initializer: read-only
}


class IdentityError(Exception):
    """One line naming the setting; never a key."""


def identities(env: dict[str, str]) -> dict:
    bucket = env.get("KFTUNE_BUCKET")
    if not bucket:
        raise IdentityError("KFTUNE_BUCKET is not set: it comes from the kftune-storage ConfigMap")
    found, keys = [], {}
    for role, actions in ROLES.items():
        names = [f"S3_{role.upper()}_ACCESS_KEY_ID", f"S3_{role.upper()}_SECRET_ACCESS_KEY"]
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise IdentityError(f"{', '.join(missing)} not set: the {role} role's keys come from its Secret")
        key, secret = (env[n] for n in names)
        if key in keys:
            raise IdentityError(f"the {role} and {keys[key]} roles share an access key: give each its own Secret")
        keys[key] = role
        found.append(
            {
                "name": f"kftune-{role}",
                "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": [a.format(b=bucket) for a in actions],
            }
        )
    return {"identities": found}


def main(argv: list[str], env: dict[str, str]) -> int:
    if len(argv) != 1:
        raise IdentityError("usage: seaweedfs_identities.py OUT.json")
    body = json.dumps(identities(env))
    fd = os.open(argv[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    print(f"seaweedfs_identities: {len(ROLES)} identities ({', '.join(ROLES)}) in {argv[0]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:], dict(os.environ)))
    except IdentityError as e:
        sys.exit(f"seaweedfs_identities: {e}")
