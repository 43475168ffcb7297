"""MLflow, thinly: runs, model versions whose source is an S3 artifact, tags, aliases, and loading by alias.

MLflow 3 cannot register a plain folder through `runs:/<id>/path`, and copying a model into
MLflow's artifact store would store it twice; so a version's source is the content-addressed
S3 URI kftune uploaded, and its run links it to params, metrics and the evaluation report.
What to register and whether it is promoted is decided in kftune.registry.promote and kftune.registry.gate.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.core.storage import resolve_path
from kftune.models.infer import load_for_inference

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


def log_run(mlflow, experiment: str, run_name: str, *, params: Mapping[str, Any], metrics: Mapping[str, float],
            tags: Mapping[str, str], loss_history: Sequence[tuple[int, float]] = (),
            artifacts: Sequence[Path] = ()) -> tuple[str, str]:
    """A finished run with params (None values left out), metrics, the loss curve, tags and files; (run id, URL)."""
    from mlflow.entities import Metric, Param, RunTag

    uri = mlflow.tracking_uri
    with mlflow_errors(uri, f"log a run in experiment {experiment!r}"):
        experiment_id = experiment_id_for(mlflow, experiment)
        run_id = mlflow.create_run(experiment_id, run_name=run_name).info.run_id
        now = int(time.time() * 1000)
        mlflow.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
            + [Metric("loss", float(loss), now, int(step)) for step, loss in loss_history],
            params=[Param(k, str(v)) for k, v in params.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        for path in artifacts:
            mlflow.log_artifact(run_id, str(path))
        mlflow.set_terminated(run_id)
    return run_id, run_url(uri, experiment_id, run_id)


def ensure_model(mlflow, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise KftuneError(f"MLflow at {mlflow.tracking_uri} refused to create model {name!r}: {exc.message}") from None


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
        raise KftuneError(f"MLflow at {mlflow.tracking_uri} refused to read alias {alias!r} of {name!r}: {exc.message}") from None


def create_version(mlflow, name: str, source: str, run_id: str, tags: Mapping[str, Any]):
    ensure_model(mlflow, name)
    with mlflow_errors(mlflow.tracking_uri, f"register a version of {name!r}"):
        return mlflow.create_model_version(name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})


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

    The version's source is a kftune S3 artifact: it is downloaded and verified (S3 credentials
    from the environment), then loaded with transformers (a full or merged model) or with peft on
    the base named by the version's `base_model` tag (an adapter).
    """
    version = resolve_registered(uri)
    folder = resolve_path(version.source)
    if Path(folder, "adapter_config.json").is_file():
        base = version.tags.get("base_model")
        if not base:
            raise KftuneError(f"{uri}: version {version.version} is an adapter without a base_model tag; cannot load its base")
        return load_for_inference(base, folder, allow_template_mismatch=allow_template_mismatch)
    return load_for_inference(folder, allow_template_mismatch=allow_template_mismatch)


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
