"""MLflow, thinly: runs, model versions, tags, aliases, loading by alias, and where a version's files lie.

A version's source is the MLflow Model kftune.mlflow_model logged (`models:/<model id>`), so
MLflow's own loaders and `mlflow models serve` read it; its run links it to params, metrics and
the evaluation report. What to register and whether it is promoted is decided in kftune.promote
and kftune.gate. This module is also the one way kftune writes MLflow runs (`log_run`).
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError

_HINT = "check that the server runs (`kftune stack status` for the local one) and MLFLOW_TRACKING_URI"


CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    run_url: str  # empty when the tracking URI is not a web server
    source: str
    promoted: bool = False  # this candidate took the champion alias
    reasons: list[str] = field(default_factory=list)  # the gate's reasons, in order
    champion: str = ""  # the version holding `champion` after this registration ("" when none)
    existing: bool = False  # the same artifact was registered before; that version is returned

    def decision(self) -> str:
        verdict = "champion" if self.promoted else "challenger"
        again = " (already registered)" if self.existing else ""
        return f"{self.name} version {self.version}{again}: {verdict}; " + "; ".join(self.reasons)


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, required: without it MLflow writes to a ./mlruns folder that a pod throws away."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise KftuneError(f"MLFLOW_TRACKING_URI is not set; point it at the MLflow server ({_HINT})")
    return uri


def check_reachable(timeout_s: float = 5.0) -> str:
    """The tracking URI, once its server answers /health: fail in seconds, not after the client's minutes of retries."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri  # an embedded store such as sqlite:///mlflow.db needs no server
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise KftuneError(f"MLflow at {uri} is unhealthy (/health answered {exc.code}); {_HINT}") from None
        # 401/403/404: a server answers; authentication is the client's business
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KftuneError(f"cannot reach MLflow at {uri} ({reason}); {_HINT}") from None
    return uri


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    if not uri.startswith(("http://", "https://")):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@contextlib.contextmanager
def mlflow_errors(uri: str, what: str) -> Iterator[None]:
    """MLflow's exceptions as one KftuneError naming the server and what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise KftuneError(f"MLflow at {uri} refused to {what}: {exc.message}") from None


def client():
    """An MlflowClient for the reachable tracking server."""
    from mlflow import MlflowClient

    return MlflowClient(check_reachable())


def log_run(
    mlflow,
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    tags: Mapping[str, str],
    loss_history: Sequence[tuple[int, float]] = (),
    artifacts: Sequence[Path] = (),
    artifact_path: str | None = None,
) -> tuple[str, str]:
    """A finished run with params (None values left out), metrics (finite numbers only), the loss curve, tags
    (`mlflow.parentRunId` makes it a child run) and files under `artifact_path`; returns (run id, URL)."""
    from mlflow.entities import Metric, Param, RunTag

    uri = mlflow.tracking_uri
    with mlflow_errors(uri, f"log a run in experiment {experiment!r}"):
        experiment_id = experiment_id_for(mlflow, experiment)
        run_id = mlflow.create_run(experiment_id, run_name=run_name).info.run_id
        now = int(time.time() * 1000)
        mlflow.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if _number(v)]
            + [Metric("loss", float(loss), now, int(step)) for step, loss in loss_history],
            params=[Param(k, str(v)) for k, v in params.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        for path in artifacts:
            mlflow.log_artifact(run_id, str(path), artifact_path=artifact_path)
        mlflow.set_terminated(run_id)
    return run_id, run_url(uri, experiment_id, run_id)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ensure_model(mlflow, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise KftuneError(
                f"MLflow at {mlflow.tracking_uri} refused to create model {name!r}: {exc.message}"
            ) from None


def find_version(mlflow, name: str, artifact_sha256: str):
    """The version of `name` registered for this artifact (its tag artifact_sha256), or None."""
    with mlflow_errors(mlflow.tracking_uri, f"search versions of {name!r}"):
        found = mlflow.search_model_versions(f"name = '{name}' and tags.artifact_sha256 = '{artifact_sha256}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def version_by_alias(mlflow, name: str, alias: str):
    """The version holding `alias`, or None (search_model_versions leaves aliases empty, so ask by alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise KftuneError(
            f"MLflow at {mlflow.tracking_uri} refused to read alias {alias!r} of {name!r}: {exc.message}"
        ) from None


def create_version(mlflow, name: str, source: str, run_id: str, tags: Mapping[str, Any], model_id: str | None = None):
    """A new version of `name` (created if missing); `model_id`: the LoggedModel it promotes."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    ensure_model(mlflow, name)
    with mlflow_errors(mlflow.tracking_uri, f"register a version of {name!r}"):
        version = mlflow.create_model_version(
            name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, model_id=model_id
        )
        if model_id:  # the LoggedModel lists its versions (as mlflow.register_model records it, for the UI)
            mlflow.set_logged_model_tags(
                model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": str(version.version)}])}
            )
    return version


def tag_version(mlflow, name: str, version: str, tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Set tags on a version (and on its run, so either can be found from the other's facts)."""
    with mlflow_errors(mlflow.tracking_uri, f"tag version {version} of {name!r}"):
        for key, value in tags.items():
            mlflow.set_model_version_tag(name, str(version), key, str(value))
            if run_id:
                mlflow.set_tag(run_id, key, str(value))


def set_alias(mlflow, name: str, alias: str, version: str) -> None:
    with mlflow_errors(mlflow.tracking_uri, f"point alias {alias!r} of {name!r} at version {version}"):
        mlflow.set_registered_model_alias(name, alias, str(version))


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias or models:/name/version -> (name, alias, version)."""
    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise KftuneError(f"{uri!r} is not a registry URI; expected models:/<name>@<alias> or models:/<name>/<version>")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise KftuneError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def resolve_registered(uri: str):
    """The model version a models:/ URI names (via MLflow, which needs no S3 credentials)."""
    name, alias, version = parse_models_uri(uri)
    mlflow = client()
    if alias:
        found = version_by_alias(mlflow, name, alias)
        if found is None:
            raise KftuneError(f"{uri}: model {name!r} has no alias {alias!r} in MLflow at {mlflow.tracking_uri}")
        return found
    with mlflow_errors(mlflow.tracking_uri, f"read version {version} of {name!r}"):
        return mlflow.get_model_version(name, version)


def load_registered(uri: str, allow_template_mismatch: bool = False):
    """(model, tokenizer) for `models:/<name>@<alias>` or `models:/<name>/<version>`, ready to generate.

    A thin wrapper over `mlflow.transformers.load_model`: kftune only resolves the version first,
    verifies the downloaded files against the version's manifest and checks the chat template.
    """
    from kftune.registry.mlflow_model import load

    return load(resolve_registered(uri), allow_template_mismatch=allow_template_mismatch)


def storage_uri(uri: str, artifacts_destination: str | None = None) -> str:
    """Where the HF files of a registered version lie in object storage (a KServe storageUri).

    A server that proxies artifacts (`--artifacts-destination`, as the local stack and k8s/ run it)
    hands out `mlflow-artifacts:/...` locations; they map onto `artifacts_destination` (default:
    s3://$KFTUNE_BUCKET/mlflow, where both put them).
    """
    from kftune.registry.mlflow_model import HF_SUBDIR

    version = resolve_registered(uri)
    if not version.source.startswith("models:/m-"):
        raise KftuneError(
            f"{uri}: version {version.version} has source {version.source}, not a logged MLflow Model; "
            "register the model again"
        )
    mlflow = client()
    with mlflow_errors(mlflow.tracking_uri, f"read the logged model of {uri}"):
        location = mlflow.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    if location.startswith("mlflow-artifacts:"):
        destination = artifacts_destination or (
            f"s3://{os.environ['KFTUNE_BUCKET']}/mlflow" if os.environ.get("KFTUNE_BUCKET") else ""
        )
        if not destination:
            raise KftuneError(
                f"{uri} is stored through the MLflow server ({location}); pass --artifacts-destination "
                "with the server's --artifacts-destination (e.g. s3://kftune/mlflow)"
            )
        location = f"{destination.rstrip('/')}/{location.removeprefix('mlflow-artifacts:').lstrip('/')}"
    return f"{location.rstrip('/')}/{HF_SUBDIR}"


def main(argv: list[str]) -> int:
    """`kftune registry storage-uri models:/NAME@ALIAS`: print where a version's HF files lie."""
    import argparse

    p = argparse.ArgumentParser(prog="kftune registry", description="read facts of registered model versions")
    sub = p.add_subparsers(dest="action", required=True)
    where = sub.add_parser(
        "storage-uri", help="print the object-storage URI of a version's HF files (KServe storageUri)"
    )
    where.add_argument(
        "model", help="models:/NAME@ALIAS or models:/NAME/VERSION (NAME@ALIAS and NAME/VERSION work too)"
    )
    where.add_argument(
        "--artifacts-destination",
        help="the MLflow server's --artifacts-destination (default: s3://$KFTUNE_BUCKET/mlflow)",
    )
    args = p.parse_args(argv)
    model = args.model if args.model.startswith("models:/") else f"models:/{args.model}"
    print(storage_uri(model, args.artifacts_destination))
    return 0


def experiment_id_for(mlflow: Any, name: str) -> str:
    """The id of experiment `name`, created if missing; a concurrent run may create it first, so re-read then.

    Measured: of 16 processes registering at once into a new experiment, one lost that race with
    RESOURCE_ALREADY_EXISTS. (Registered models tolerate it in ensure_model; version numbers are
    assigned by the server, and MLflow's SQLite store waits up to 20 s on a locked database.)
    """
    from mlflow.exceptions import MlflowException

    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (found := mlflow.get_experiment_by_name(name)) is None:
            raise
        return found.experiment_id
