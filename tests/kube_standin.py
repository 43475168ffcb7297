"""A stand-in for the few Kubernetes API endpoints kftune.train.trainjob_api calls, on 127.0.0.1.

No API server can run here (no container runtime or etcd to give it, no cluster to reach), so the run tests talk
to this instead, through the real `kubernetes` client. It keeps to the API's paths, verbs, status codes and JSON
shapes for what it serves (TrainJobs of trainer.kubeflow.org/v1alpha1, pods, pod logs) and to what the cluster's
controllers put there: pod labels as JobSet v0.12 and the Job controller set them, TrainJob conditions as Trainer
v2.3.0 sets them. Label selectors are matched as the API server matches equality selectors, so code that asks for
the wrong labels finds no pod. It records every request, so tests can check what was created and deleted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NAMESPACE = "kftune"
JOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-01T00:00:00Z"}  # fmt: skip


def node_pod(
    job: str, node: int, log: str | list[str], phase: str = "Running", restart: int = 0, created: int = 0
) -> dict:
    """A node pod as JobSet makes it for TrainJob `job` (its JobSet has the TrainJob's name), with its log: a list
    is what successive reads of the log return (a stream that broke, then the whole); the pod runs until the last."""
    name = f"{job}-node-0-{node}-r{restart}"
    labels = {
        "jobset.sigs.k8s.io/jobset-name": job,
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "jobset.sigs.k8s.io/job-index": "0",
        "jobset.sigs.k8s.io/restart-attempt": str(restart),
        "batch.kubernetes.io/job-completion-index": str(node),
        "batch.kubernetes.io/job-name": f"{job}-node-0",
    }
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "labels": labels,
                     "creationTimestamp": f"2026-12-01T00:{created:02d}:00Z"},
        "status": {"phase": phase},
        "log": log,
    }  # fmt: skip


@dataclass
class Cluster:
    """What the stand-in serves. `status(cluster, job)` gives a TrainJob's status at each read; `pods(cluster)` the
    pods at each list (a pod with "streaming": True holds a followed log open, as a running container's is);
    `get_errors` answers the first n reads of a TrainJob with 500; `gone_after` makes a TrainJob
    that is being deleted disappear after that many reads (garbage collection done)."""

    jobs: dict[str, dict] = field(default_factory=dict)
    status: Callable[[Cluster, dict], dict] = lambda cluster, job: {}
    pods: Callable[[Cluster], list[dict]] = lambda cluster: []
    get_errors: int = 0
    gone_after: int = 2
    create_error: tuple[int, str] | None = None
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, query)
    created: list[dict] = field(default_factory=list)
    logs_served: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: threading.Event = field(default_factory=threading.Event)  # set when the stand-in stops

    def seen(self, method: str, path: str) -> list[dict]:
        with self.lock:
            return [query for m, p, query in self.requests if (m, p) == (method, path)]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


def _matches(selector: str, labels: dict[str, str]) -> bool:
    terms = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(key) == value for key, value in terms)


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        cluster = self.cluster
        with cluster.lock:
            cluster.requests.append((method, url.path, query))
        if url.path == JOBS and method == "POST":
            return self._create(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        if url.path.startswith(JOBS + "/"):
            return self._job(method, url.path.rsplit("/", 1)[1], query)
        if url.path == PODS and method == "GET":
            items = [
                {k: v for k, v in pod.items() if k != "log"}
                for pod in cluster.pods(cluster)
                if _matches(query.get("labelSelector", ""), pod["metadata"]["labels"])
            ]
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        if url.path.startswith(PODS + "/") and method == "GET":
            name, _, sub = url.path[len(PODS) + 1 :].partition("/")
            pod = next((p for p in cluster.pods(cluster) if p["metadata"]["name"] == name), None)
            if pod is None:
                return self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
            logs = pod["log"] if isinstance(pod["log"], list) else [pod["log"]]
            with cluster.lock:
                served = cluster.logs_served.count(name)
            if sub == "log":
                if query.get("container") != "node":
                    return self._send(400, _status(400, "BadRequest", "a container name must be specified"))
                with cluster.lock:
                    cluster.logs_served.append(name)
                # the API server parses booleans as Go's ParseBool does (the Python client sends "True")
                following = query.get("follow") in ("1", "t", "T", "true", "TRUE", "True")
                if following and pod.get("streaming"):  # a running container's log: no end in sight
                    return self._stream(logs[min(served, len(logs) - 1)])
                return self._send(200, logs[min(served, len(logs) - 1)], "text/plain")
            # still running until each of its logs (a stream broken early, then the rest) has been read
            phase = pod["status"]["phase"] if served >= len(logs) else "Running"
            return self._send(200, {**{k: v for k, v in pod.items() if k != "log"}, "status": {"phase": phase}})
        self._send(404, _status(404, "NotFound", f"the stand-in does not serve {method} {url.path}"))

    def _stream(self, text: str) -> None:
        """A followed log as the API server sends it (chunked, HTTP/1.1): the lines so far, then the connection held
        open until the stand-in stops."""
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        self.cluster.closed.wait(60)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _create(self, body: dict) -> None:
        cluster, name = self.cluster, body["metadata"]["name"]
        with cluster.lock:
            cluster.created.append(body)
            if cluster.create_error:
                code, message = cluster.create_error
                return self._send(code, _status(code, "Invalid", message))
            if name in cluster.jobs:
                message = f'trainjobs.trainer.kubeflow.org "{name}" already exists'
                return self._send(409, _status(409, "AlreadyExists", message))
            cluster.jobs[name] = {**body, "metadata": {**body["metadata"], "uid": f"uid-{len(cluster.created)}"}}
        self._send(201, cluster.jobs[name])

    def _job(self, method: str, name: str, query: dict) -> None:
        cluster = self.cluster
        with cluster.lock:
            job = cluster.jobs.get(name)
            reads = len([1 for m, p, _ in cluster.requests if m == "GET" and p == f"{JOBS}/{name}"])
            deleting = job is not None and job["metadata"].get("deletionTimestamp")
            if deleting and method == "GET" and reads > cluster.gone_after:
                del cluster.jobs[name]
                job = None
            if method == "DELETE" and job is not None:
                del cluster.jobs[name]
        if job is None:
            return self._send(404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found'))
        if method == "DELETE":
            return self._send(200, job)
        if reads <= cluster.get_errors:
            return self._send(500, _status(500, "InternalError", "etcdserver: request timed out"))
        self._send(200, {**job, "status": cluster.status(cluster, job)})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class StandIn:
    """`with StandIn(cluster) as url:` serves `cluster` on 127.0.0.1 at `url` until the block ends."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        handler = type("Handler", (_Handler,), {"cluster": cluster})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.cluster.closed.set()
        self.server.shutdown()
        self.server.server_close()


def api_client(url: str) -> Any:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)
