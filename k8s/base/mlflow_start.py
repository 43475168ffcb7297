"""MLflow's start in the cluster: the auth ini from the Secret-fed env, the pipeline's own user, then the server.

Runs in the upstream MLflow image (stdlib and mlflow only): the Deployment mounts this file from a
ConfigMap that kustomize generates from it, and tests/test_mlflow_start.py runs this same file in
front of a real MLflow server.

- MLflow reads its auth settings with `configparser`, which treats `%` as interpolation: a
  percent-encoded database password (`%40`) crash-looped the server. Every value is escaped (`%%`),
  and a value holding a line break (which could add keys) is refused with one line naming it.
- The admin login goes into the ini (memory volume, mode 0600) and not into the server's
  environment; the pipeline's login (`MLFLOW_TRACKING_*`, the kftune-mlflow Secret that tasks read)
  is made a plain user here: with `default_permission = NO_PERMISSIONS` it can use only the
  experiments and registered models it creates (MLflow grants their creator MANAGE).

Usage: python mlflow_start.py mlflow server <flags>   (the command to exec once the ini and user exist)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_PATH = "MLFLOW_AUTH_CONFIG_PATH"
# env var -> ini key (admin login: the kftune-mlflow-admin Secret; database: the overlay)
FROM_ENV = {
    "MLFLOW_AUTH_DATABASE_URI": "database_uri",
    "KFTUNE_MLFLOW_ADMIN_USERNAME": "admin_username",
    "KFTUNE_MLFLOW_ADMIN_PASSWORD": "admin_password",
}
PIPELINE_USER = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# never handed to the server process: the ini holds what it needs
SCRUBBED = (*FROM_ENV, *PIPELINE_USER, "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")


class StartError(Exception):
    """One line for the pod's log, naming the setting and the fix; never a value."""


def ini_value(key: str, value: str) -> str:
    """`value` as configparser reads it back unchanged: `%` doubled; a line break refused."""
    if "\n" in value or "\r" in value:
        raise StartError(
            f"{key} holds a line break, which would add lines to MLflow's auth ini; remove it from its Secret"
        )
    return value.replace("%", "%%")


def auth_ini(values: dict[str, str]) -> str:
    """The [mlflow] section MLflow's basic-auth app reads; nobody sees what they did not create."""
    settings = {"default_permission": "NO_PERMISSIONS", **values}
    return "[mlflow]\n" + "".join(f"{key} = {ini_value(key, value)}\n" for key, value in settings.items())


def required(env: dict[str, str], name: str) -> str:
    if not env.get(name):
        raise StartError(f"{name} is not set: the MLflow Deployment reads it from its Secret; set it there")
    return env[name]


def write_ini(env: dict[str, str]) -> Path:
    path = Path(required(env, CONFIG_PATH))
    text = auth_ini({key: required(env, name) for name, key in FROM_ENV.items()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def ensure_pipeline_user(env: dict[str, str]) -> str:
    """The pipeline's login as a non-admin user with the Secret's password (made, or reset to it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    username, password = (required(env, name) for name in PIPELINE_USER)
    if username == env["KFTUNE_MLFLOW_ADMIN_USERNAME"]:
        raise StartError("MLFLOW_TRACKING_USERNAME is the admin's name: give the pipeline a user of its own")
    store = SqlAlchemyStore()
    store.init_db(env["MLFLOW_AUTH_DATABASE_URI"])
    try:
        if not store.has_user(username, use_primary=True):
            store.create_user(username, password, is_admin=False)
            return username
    except MlflowException:
        if not store.has_user(username, use_primary=True):  # else another replica made it at the same moment
            raise
    store.update_user(username, password=password, is_admin=False)
    return username


def main(argv: list[str], env: dict[str, str]) -> int:
    if not argv:
        raise StartError("usage: mlflow_start.py mlflow server <flags>")
    os.umask(0o077)
    path = write_ini(env)
    user = ensure_pipeline_user(env)
    print(f"mlflow_start: auth settings in {path}; pipeline user {user!r} (not an admin)", flush=True)
    os.execvpe(argv[0], argv, {k: v for k, v in env.items() if k not in SCRUBBED})
    return 0  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:], dict(os.environ)))
    except StartError as e:
        sys.exit(f"mlflow_start: {e}")
