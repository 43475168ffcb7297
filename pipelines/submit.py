"""Submit the fine-tuning DAG (or the sweep) to a Kubeflow Pipelines cluster, once per idempotency key.

The pipeline is uploaded once and versioned by the sha256 of its compiled YAML, so an unchanged
DAG adds no version. Every run carries an idempotency key, sha256(git commit + dataset sha256 +
config hash)[:16], in its display name: KFP v2beta1 runs have no labels, but the run list can be
filtered by a substring of the display name, so a second submit of the same key finds the first
run and returns it (unless --force). Runs go to `namespace` under the service account the cluster
manifests make. The bearer token comes from $KFP_TOKEN and is never printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.core.commit import head_commit
from kftune.core.errors import KftuneError
from kftune.core.storage import canonical_json, sha256_file, split_artifact_uri, upload_file
from pipelines.compile import compile_pipeline
from pipelines.parameters import resolve_parameters

TOKEN_ENV = "KFP_TOKEN"  # bearer token for the KFP API (e.g. `kubectl create token`, an OIDC id token)
SERVICE_ACCOUNT = "kftune-pipeline"  # k8s/base: the pipeline pods' least-privilege ServiceAccount
NAMESPACE = "kftune"
KEY_TAG = "kftune-key="  # display-name marker: "<run name> [kftune-key=<16 hex>]"
REPO = Path(__file__).resolve().parents[1]
_IS_SUBSTRING, _EQUALS = 9, 1  # KFP filter.proto operations


@dataclass(frozen=True)
class Submission:
    """Everything a submit sends, computed without contacting the cluster (what --dry-run prints)."""

    package: Path  # compiled pipeline YAML
    pipeline_name: str
    version_name: str  # sha256 of the compiled YAML, first 16 hex
    parameters: dict[str, Any]
    key: str
    experiment: str
    run_name: str
    namespace: str = NAMESPACE
    service_account: str = SERVICE_ACCOUNT
    stage_data: Path | None = None  # a local data file to upload before the run
    stage_dest: str = ""

    @property
    def display_name(self) -> str:
        return f"{self.run_name} [{KEY_TAG}{self.key}]"

    def describe(self) -> str:
        data = (
            f"  data upload   {self.stage_data} -> {self.stage_dest}/<sha256>/ (with $AWS_* credentials)\n"
            if self.stage_data
            else ""
        )
        return (
            f"  pipeline      {self.pipeline_name}  version {self.version_name}  ({self.package})\n"
            f"  experiment    {self.experiment}  namespace {self.namespace}  service account {self.service_account}\n"
            f"  run           {self.display_name}\n"
            f"  key           {self.key}\n{data}"
            f"  parameters    {json.dumps(self.parameters, sort_keys=True)}"
        )


@dataclass
class Outcome:
    run_id: str
    display_name: str
    created: bool  # False: an existing run with the same key was returned
    state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def submitted_commit(repo: Path = REPO) -> str:
    """The commit being submitted: git's HEAD, else $GITHUB_SHA (a CI checkout without .git); one is required."""
    commit = head_commit(repo)
    if not commit:
        raise KftuneError(f"no git commit found in {repo} and $GITHUB_SHA is unset; submit from a git checkout")
    return commit


def dataset_sha256(data_uri: str) -> str:
    """The data's content hash: sha256 of a local file, or the sha256 folder of an s3:// artifact URI."""
    if data_uri.startswith("s3://"):
        try:
            _, folder, _ = split_artifact_uri(data_uri)
        except KftuneError:
            raise KftuneError(
                f"--data-uri {data_uri}: not content-addressed (no sha256 folder); give a local file "
                "(submit uploads it) or an s3:// URI that `kftune pipeline run` or submit staged"
            ) from None
        return folder.rsplit("/", 1)[-1]
    path = Path(data_uri).expanduser()
    if not path.is_file():
        raise KftuneError(f"--data-uri {data_uri}: no such file; give a JSONL/JSON file or an s3:// artifact URI")
    return sha256_file(path)


def config_hash(parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every parameter but the data location (the dataset hash covers the data)."""
    return hashlib.sha256(canonical_json({k: v for k, v in parameters.items() if k != "data_uri"})).hexdigest()


def idempotency_key(commit: str, data_sha: str, cfg_hash: str) -> str:
    return hashlib.sha256(f"{commit}\n{data_sha}\n{cfg_hash}".encode()).hexdigest()[:16]


def prepare(
    given: Mapping[str, Any],
    experiment: str,
    run_name: str | None,
    namespace: str = NAMESPACE,
    package: Path | None = None,
    pipeline: str = "finetune",
    parallelism: int | None = None,
) -> Submission:
    """Resolve the parameters, compute the key and compile the DAG (or the sweep): everything a submit sends, offline."""
    package = package or Path(f"build/{pipeline}.yaml")
    parameters = resolve_parameters(given, pipeline)
    data_uri = parameters["data_uri"]
    data_sha = dataset_sha256(data_uri)
    key = idempotency_key(submitted_commit(), data_sha, config_hash(parameters))
    stage_data, stage_dest = None, ""
    if not data_uri.startswith("s3://"):
        stage_data = Path(data_uri).expanduser()
        bucket = parameters["artifact_root"].removeprefix("s3://").split("/", 1)[0]
        stage_dest = f"s3://{bucket}/inputs/data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_pipeline(package, pipeline, parallelism)
    import yaml

    name = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))["pipelineInfo"]["name"]
    version = sha256_file(package)[:16]
    return Submission(
        package=package,
        pipeline_name=name,
        version_name=version,
        parameters=parameters,
        key=key,
        experiment=experiment,
        run_name=run_name or f"kftune-{parameters.get('method', pipeline)}",
        namespace=namespace,
        stage_data=stage_data,
        stage_dest=stage_dest,
    )


@contextlib.contextmanager
def api_errors(host: str) -> Iterator[None]:
    """KFP client failures as one line naming the host and what to do; never the request (it holds the token)."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status in (401, 403):
            verb = "rejected the token" if exc.status == 401 else "denied access"
            raise KftuneError(
                f"KFP at {host} {verb} (HTTP {exc.status}): set ${TOKEN_ENV} to a valid bearer token "
                f"for an account allowed in namespace {NAMESPACE!r}"
            ) from None
        if exc.status == 0 or exc.status is None:
            raise KftuneError(f"cannot reach KFP at {host}: {exc.reason}; check --host") from None
        raise KftuneError(f"KFP at {host} answered HTTP {exc.status} {exc.reason}: {_message(exc.body)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KftuneError(
            f"cannot reach KFP at {host} ({type(exc).__name__}); check --host and that the KFP API "
            "(ml-pipeline-ui or its ingress) is reachable from here"
        ) from None


def _message(body: Any) -> str:
    try:
        data = json.loads(body)
        return str(data.get("message") or data.get("error") or body)[:300]
    except (TypeError, ValueError, AttributeError):
        return str(body)[:300]


def kfp_client(host: str, namespace: str) -> Any:
    """A kfp.Client with the bearer token from $TOKEN_ENV (none: e.g. a port-forward to a single-user KFP)."""
    if not host.startswith(("http://", "https://")):
        raise KftuneError(f"--host {host}: give the KFP API URL with its scheme, e.g. https://kfp.example.com")
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None, namespace=namespace)


def _filter(key: str, value: str, op: int = _EQUALS) -> str:
    return json.dumps({"predicates": [{"operation": op, "key": key, "stringValue": value}]})


def ensure_version(client: Any, sub: Submission) -> tuple[str, str]:
    """(pipeline id, version id): the pipeline uploaded if new, a version named by content hash added if new."""
    with contextlib.redirect_stdout(sys.stderr):  # the client prints UI links; stdout stays ours
        found = client.list_pipelines(filter=_filter("display_name", sub.pipeline_name), namespace=sub.namespace)
        pipelines = found.pipelines or []
        if pipelines:
            pipeline_id = pipelines[0].pipeline_id
        else:
            pipeline_id = client.upload_pipeline(
                str(sub.package),
                pipeline_name=sub.pipeline_name,
                description=f"kftune: {sub.pipeline_name}",
                namespace=sub.namespace,
            ).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, filter=_filter("display_name", sub.version_name))
        for version in versions.pipeline_versions or []:
            return pipeline_id, version.pipeline_version_id
        version = client.upload_pipeline_version(str(sub.package), sub.version_name, pipeline_id=pipeline_id)
        return pipeline_id, version.pipeline_version_id


def stage_data(sub: Submission) -> Submission:
    """Upload a local data file to the cluster's S3 (content-addressed), so the tasks can read it."""
    if sub.stage_data is None:
        return sub
    uri = upload_file(sub.stage_data, sub.stage_dest).uri
    return Submission(**{**sub.__dict__, "parameters": {**sub.parameters, "data_uri": uri}, "stage_data": None})


def submit(sub: Submission, host: str, force: bool = False, wait_s: float | None = None) -> Outcome:
    """Start a run (or find the run with the same key); with `wait_s`, wait for it to finish."""
    client = kfp_client(host, sub.namespace)
    with api_errors(host):
        existing = (
            client.list_runs(
                namespace=sub.namespace,
                sort_by="created_at desc",
                page_size=1,
                filter=_filter("display_name", KEY_TAG + sub.key, _IS_SUBSTRING),
            ).runs
            or []
        )
        if existing and not force:
            run, created = existing[0], False
        else:
            sub = stage_data(sub)
            pipeline_id, version_id = ensure_version(client, sub)
            with contextlib.redirect_stdout(sys.stderr):
                experiment = client.create_experiment(sub.experiment, namespace=sub.namespace)
                run = client.run_pipeline(
                    experiment.experiment_id,
                    sub.display_name,
                    params=sub.parameters,
                    pipeline_id=pipeline_id,
                    version_id=version_id,
                    service_account=sub.service_account,
                )
            created = True
        outcome = Outcome(run.run_id, run.display_name, created, run.state)
        if wait_s is not None:
            outcome.state = client.wait_for_run_completion(run.run_id, timeout=wait_s, sleep_duration=10).state
    return outcome


def schedule(sub: Submission, host: str, cron: str, force: bool = False) -> Outcome:
    """A recurring run (one at a time, no backfill), or the existing one with the same key."""
    client = kfp_client(host, sub.namespace)
    with api_errors(host):
        existing = (
            client.list_recurring_runs(
                namespace=sub.namespace, page_size=1, filter=_filter("display_name", KEY_TAG + sub.key, _IS_SUBSTRING)
            ).recurring_runs
            or []
        )
        if existing and not force:
            job = existing[0]
            return Outcome(job.recurring_run_id, job.display_name, False, extra={"cron": cron})
        sub = stage_data(sub)
        pipeline_id, version_id = ensure_version(client, sub)
        with contextlib.redirect_stdout(sys.stderr):
            experiment = client.create_experiment(sub.experiment, namespace=sub.namespace)
            job = client.create_recurring_run(
                experiment.experiment_id,
                sub.display_name,
                description=f"{KEY_TAG}{sub.key}",
                cron_expression=kfp_cron(cron),
                max_concurrency=1,
                no_catchup=True,
                params=sub.parameters,
                pipeline_id=pipeline_id,
                version_id=version_id,
                service_account=sub.service_account,
            )
    return Outcome(job.recurring_run_id, job.display_name, True, extra={"cron": kfp_cron(cron)})


def kfp_cron(expr: str) -> str:
    """KFP's cron has a leading seconds field: a standard 5-field expression gets `0` seconds."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise KftuneError(f"--cron {expr!r}: expected 5 fields (min hour day month weekday) or 6 (seconds first)")
