"""MLflow: one run per pipeline run (params, metrics) and a model version whose source is the S3 artifact.

MLflow 3 cannot register a plain folder through `runs:/<id>/path`, and copying a model into
MLflow's artifact store would store it twice; so the version's source is the content-addressed
S3 URI the pipeline already uploaded, and the run links it to its params and metrics.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kftune.errors import KftuneError

_HINT = "check that the server runs (`kftune stack status` for the local one) and MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    run_url: str  # empty when the tracking URI is not a web server
    source: str


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


def register(
    name: str,
    source: str,
    *,
    experiment: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    loss_history: list[tuple[int, float]] = (),
) -> Registration:
    """Log a finished run and create version N+1 of model `name` pointing at `source`.

    `params` with value None are left out (a full fine-tune has no LoRA rank); `tags` go on both
    the run and the version, so either can be found from the other's facts.
    """
    uri = check_reachable()
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(uri)
        experiment_id = experiment_id_for(client, experiment)
        run = client.create_run(experiment_id, run_name=f"{name}-{params.get('method', 'model')}")
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
            + [Metric("loss", float(loss), now, int(step)) for step, loss in loss_history],
            params=[Param(k, str(v)) for k, v in params.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        client.set_terminated(run_id)
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    except MlflowException as exc:
        raise KftuneError(f"MLflow at {uri} refused to register model {name!r}: {exc.message}") from None
    return Registration(name, str(version.version), run_id, run_url(uri, experiment_id, run_id), source)


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment `name`, created if missing; a concurrent run may create it first, so re-read then.

    Measured: of 16 processes registering at once into a new experiment, one lost that race with
    RESOURCE_ALREADY_EXISTS. (Registered models already tolerate it below; version numbers are
    assigned by the server, and MLflow's SQLite store waits up to 20 s on a locked database.)
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or (found := client.get_experiment_by_name(name)) is None:
            raise
        return found.experiment_id
