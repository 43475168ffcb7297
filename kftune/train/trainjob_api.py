"""Run a TrainJob to its end from the train step: create (or adopt), follow node 0's log, wait, delete.

The one module of kftune that talks to the Kubernetes API (the plain `kubernetes` client, a kfp dependency; the
`kubeflow` SDK's TrainerClient names jobs at random, so a retried step could not adopt its job). What it relies on
is Trainer v2.3.0's and JobSet v0.12's behaviour: the TrainJob's `Complete` and `Failed` conditions, and the labels
JobSet and the Job controller put on every node pod (the JobSet is named after the TrainJob; node 0 is completion
index 0 of the replicated job `node`). The job is deleted when it ends, however it ends, and when the step gets
SIGTERM (cancelled): with two open Trainer bugs, a failed TrainJob left behind is recreated.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kftune.core.errors import KftuneError
from kftune.train.trainjob import API_GROUP, API_VERSION, NODE_JOB, PLURAL

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Node 0's pods: JobSet's labels (jobset.sigs.k8s.io, v0.12) and the Job controller's completion index.
NODE0 = {
    "jobset.sigs.k8s.io/replicatedjob-name": NODE_JOB,
    "batch.kubernetes.io/job-completion-index": "0",
}
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
API_ERRORS_TOLERATED = 5  # consecutive failed polls (API server restarts, timeouts) before the step gives up


def run(
    manifest: dict[str, Any],
    api_client: client.ApiClient | None = None,
    namespace: str | None = None,
    log: Callable[[str], None] = print,
    poll_seconds: float = 10.0,
) -> None:
    """Create the TrainJob `manifest` (or adopt one of its name), print node 0's log, return when it is Complete.

    Raises KftuneError, in one line, when it is Failed (the condition's reason and message), disappears, or the
    process gets SIGTERM; the TrainJob is deleted in every case. namespace: the manifest's, else this pod's.
    """
    name = manifest["metadata"]["name"]
    namespace = namespace or manifest["metadata"].get("namespace") or own_namespace()
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    api_client = api_client or _in_cluster_client()
    jobs, pods = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_node0, args=(pods, namespace, name, stop, log, poll_seconds))
    follower.daemon = True  # a log stream can outlive the job's end by a little; it must not hold the step
    with _Deleted(jobs, namespace, name, log):
        _create_or_adopt(jobs, namespace, body, log, poll_seconds)
        follower.start()
        try:
            _wait(jobs, namespace, name, log, poll_seconds)
        finally:
            stop.set()  # on an error, delete at once: a cancelled pod has only its grace period (30 s by default)
        follower.join(timeout=max(3 * poll_seconds, 5.0))  # complete: the rest of the finished pod's log


class _Deleted:
    """Delete the TrainJob on leaving, and raise on SIGTERM (restoring the previous handler afterwards)."""

    def __init__(self, jobs: client.CustomObjectsApi, namespace: str, name: str, log: Callable[[str], None]):
        self.jobs, self.namespace, self.name, self.log = jobs, namespace, name, log
        self.handling = threading.current_thread() is threading.main_thread()  # only there can Python take signals
        self.previous: Any = None

    def __enter__(self) -> None:
        if self.handling:
            self.previous = signal.signal(signal.SIGTERM, self._cancelled)

    def _cancelled(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the deletion short
        raise KftuneError(f"the train step was cancelled (SIGTERM); deleting TrainJob {self.name}")

    def __exit__(self, *exc: object) -> None:
        try:
            if self.handling:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.jobs.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, self.name, propagation_policy="Foreground"
            )
            self.log(f"deleted TrainJob {self.namespace}/{self.name}")
        except ApiException as e:
            if e.status != 404:
                self.log(
                    f"could not delete TrainJob {self.namespace}/{self.name} ({e.status} {e.reason}): delete it by hand"
                )
        except HTTPError as e:
            self.log(f"could not delete TrainJob {self.namespace}/{self.name} ({e}): delete it by hand")
        finally:
            if self.handling:  # None: a handler not set from Python, which the default stands for
                signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def _create_or_adopt(
    jobs: client.CustomObjectsApi, namespace: str, body: dict, log: Callable[[str], None], poll: float
) -> None:
    """Create the job; if one of its name exists, it is this step's from an earlier try: adopt it, unless it is
    being deleted (then wait until it is gone and create it anew)."""
    name = body["metadata"]["name"]
    while True:
        try:
            jobs.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)
            log(f"created TrainJob {namespace}/{name}")
            return
        except ApiException as e:
            if e.status != 409:
                raise KftuneError(f"could not create TrainJob {namespace}/{name}: {e.status} {_message(e)}") from e
        existing = _get(jobs, namespace, name)
        if existing is None:
            continue  # gone between the two calls
        if not existing["metadata"].get("deletionTimestamp"):
            log(f"adopted TrainJob {namespace}/{name}: it exists already, from an earlier try of this step")
            return
        log(f"TrainJob {namespace}/{name} is being deleted (an earlier try's); waiting to create it anew")
        while _get(jobs, namespace, name) is not None:
            time.sleep(poll)


def _get(jobs: client.CustomObjectsApi, namespace: str, name: str) -> dict | None:
    try:
        return jobs.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _wait(jobs: client.CustomObjectsApi, namespace: str, name: str, log: Callable[[str], None], poll: float) -> None:
    """Poll until a condition Complete or Failed is True; up to API_ERRORS_TOLERATED API errors in a row pass."""
    errors = 0
    while True:
        try:
            job = _get(jobs, namespace, name)
            errors = 0
        except (ApiException, HTTPError) as e:
            errors += 1
            if errors > API_ERRORS_TOLERATED:
                raise KftuneError(
                    f"TrainJob {namespace}/{name}: the API server failed {errors} times in a row: {e}"
                ) from e
            log(f"TrainJob {namespace}/{name}: status not read ({str(e).splitlines()[0]}); trying again")
            time.sleep(poll)
            continue
        if job is None:
            raise KftuneError(f"TrainJob {namespace}/{name} was deleted by someone else before it ended")
        true = {c.get("type"): c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
        if failed := true.get("Failed"):
            reason, message = failed.get("reason", "?"), " ".join(str(failed.get("message", "")).split())
            raise KftuneError(f"TrainJob {namespace}/{name} failed: {reason}: {message}")
        if "Complete" in true:
            log(f"TrainJob {namespace}/{name} is complete")
            return
        time.sleep(poll)


def _follow_node0(
    pods: client.CoreV1Api, namespace: str, name: str, stop: threading.Event, log: Callable[[str], None], poll: float
) -> None:
    """Print node 0's log line by line until `stop`, then what is left of it; after a gang restart, the new node 0
    pod's from its start."""
    selector = ",".join(f"{k}={v}" for k, v in {JOBSET_NAME: name, **NODE0}.items())
    printed: dict[str, int] = {}  # pod uid -> lines printed (a broken stream resumes after them)
    done: set[str] = set()
    while True:
        last = stop.is_set()
        try:
            pod = _newest(pods.list_namespaced_pod(namespace, label_selector=selector).items, done)
            if pod is not None and pod.status.phase != "Pending":
                _print_log(pods, namespace, pod, printed, log, follow=not last)
                if pods.read_namespaced_pod(pod.metadata.name, namespace).status.phase in ("Succeeded", "Failed"):
                    done.add(pod.metadata.uid)
        except (ApiException, HTTPError):  # not started yet, or gone: look again
            pass
        if last:
            return
        stop.wait(poll)


def _print_log(
    pods: client.CoreV1Api, namespace: str, pod: Any, printed: dict[str, int], log: Callable[[str], None], follow: bool
) -> None:
    uid = pod.metadata.uid
    if printed and uid not in printed:
        attempt = (pod.metadata.labels or {}).get(RESTART_ATTEMPT, "?")
        log(f"--- node 0 started again (JobSet restart {attempt}): pod {pod.metadata.name}")
    printed.setdefault(uid, 0)
    stream = pods.read_namespaced_pod_log(
        pod.metadata.name, namespace, container=NODE_JOB, follow=follow, _preload_content=False
    )
    try:
        for number, line in enumerate(_lines(stream)):
            if number >= printed[uid]:
                log(line)
                printed[uid] = number + 1
    finally:
        stream.release_conn()


def _newest(items: list, done: set[str]) -> Any:
    live = [p for p in items if p.metadata.uid not in done]
    return max(
        live,
        key=lambda p: p.metadata.creation_timestamp.timestamp() if p.metadata.creation_timestamp else 0,
        default=None,
    )


def _lines(stream: Any) -> Iterator[str]:
    """The lines of a log as they come (read1: what has arrived, where read(n) would wait for n bytes)."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


def _message(e: ApiException) -> str:
    """The API server's Status message (a webhook's refusal says there what is wrong), on one line."""
    try:
        message = json.loads(e.body or "{}").get("message") or e.reason
    except (ValueError, AttributeError):
        message = e.body or e.reason
    return " ".join(str(message).split())


def own_namespace() -> str:
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError as e:
        raise KftuneError(f"no namespace given and {NAMESPACE_FILE} is unreadable ({e.strerror}): not in a pod?") from e


def _in_cluster_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException as e:
        raise KftuneError(f"no Kubernetes API client given and no in-cluster config: {e}") from e
    return client.ApiClient()
