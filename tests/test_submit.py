"""`kftune pipeline submit|schedule` against a stand-in for the KFP REST API.

No Kubeflow Pipelines backend can run on these machines, so the boundary tested here is HTTP: a
small local server (http.server on 127.0.0.1) answers the v2beta1 endpoints the real `kfp.Client`
calls (pipelines list/upload/upload_version, experiments, runs create/list/get, recurringruns)
with minimal valid JSON and records every request. The tests assert what submit sends: the
compiled pipeline spec, the parameters, the idempotency key, the service account and the token
header, and how it behaves on a repeat, --force, --dry-run, a 401 and an unreachable host.
Whether a real KFP server accepts and runs what is sent is not tested here.
"""

from __future__ import annotations

import email.parser
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from kftune.cli import main as kftune_main
from kftune.core.storage import sha256_file
from pipelines import parameters, submit

API = "/apis/v2beta1"
DATA_SHA = "ab" * 32
DATA_URI = f"s3://kftune/inputs/data/{DATA_SHA}/train.jsonl"
TOKEN = "tok-s3cr3t-do-not-print"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: Any  # parsed JSON, or {field: bytes} for a multipart upload


@dataclass
class KfpStandIn:
    """State and request log of the stand-in; `final_state` is what a finished run reports."""

    token: str | None = None
    final_state: str = "SUCCEEDED"
    requests: list[Request] = field(default_factory=list)
    pipelines: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    experiments: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    ids: Any = field(default_factory=lambda: itertools.count(1))
    url: str = ""

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == API + path]


def _matches(item: dict, raw_filter: str | None) -> bool:
    """The two filter.proto operations submit uses: EQUALS (1) and IS_SUBSTRING (9) on a string field."""
    if not raw_filter:
        return True
    for p in json.loads(raw_filter)["predicates"]:
        value, have = p.get("stringValue", p.get("string_value")), str(item.get(p["key"], ""))
        if p["operation"] in (1, "EQUALS") and have != value:
            return False
        if p["operation"] in (9, "IS_SUBSTRING") and value not in have:
            return False
    return True


def _handler(state: KfpStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> Any:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                return {
                    part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                    for part in msg.get_payload()
                }
            return json.loads(raw) if raw else None

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body = self._body() if method == "POST" else None
            state.requests.append(Request(method, url.path, query, self.headers.get("Authorization"), body))
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._send(401, {"error": "Unauthenticated", "code": 16, "message": "Unauthenticated"})
            path, new_id = url.path.removeprefix(API), f"id-{next(state.ids)}"
            flt = query.get("filter")
            if (method, path) == ("GET", "/healthz"):
                return self._send(200, {"multi_user": True})
            if (method, path) == ("GET", "/pipelines"):
                return self._send(200, {"pipelines": [p for p in state.pipelines if _matches(p, flt)]})
            if (method, path) == ("POST", "/pipelines/upload"):
                pipeline = {"pipeline_id": new_id, "display_name": query["name"], "namespace": query.get("namespace")}
                state.pipelines.append(pipeline)
                state.versions.append(
                    {"pipeline_id": new_id, "pipeline_version_id": new_id + "-v0", "display_name": query["name"]}
                )  # KFP's default version
                return self._send(200, pipeline)
            if (method, path) == ("POST", "/pipelines/upload_version"):
                version = {
                    "pipeline_id": query["pipelineid"],
                    "pipeline_version_id": new_id,
                    "display_name": query["name"],
                }
                state.versions.append(version)
                return self._send(200, version)
            if method == "GET" and path.startswith("/pipelines/") and path.endswith("/versions"):
                pid = path.split("/")[2]
                return self._send(
                    200,
                    {"pipeline_versions": [v for v in state.versions if v["pipeline_id"] == pid and _matches(v, flt)]},
                )
            if (method, path) == ("GET", "/experiments"):
                return self._send(200, {"experiments": [e for e in state.experiments if _matches(e, flt)]})
            if (method, path) == ("POST", "/experiments"):
                state.experiments.append({**body, "experiment_id": new_id})
                return self._send(200, state.experiments[-1])
            if (method, path) == ("GET", "/runs"):  # newest first, as sort_by="created_at desc" asks
                return self._send(200, {"runs": [r for r in reversed(state.runs) if _matches(r, flt)]})
            if (method, path) == ("POST", "/runs"):
                state.runs.append({**body, "run_id": new_id, "state": "PENDING"})
                return self._send(200, state.runs[-1])
            if method == "GET" and path.startswith("/runs/"):
                run = next(r for r in state.runs if r["run_id"] == path.split("/")[2])
                return self._send(200, {**run, "state": state.final_state})
            if (method, path) == ("GET", "/recurringruns"):
                # the generated client reads this one list in camelCase (attribute_map)
                return self._send(200, {"recurringRuns": [r for r in state.recurring if _matches(r, flt)]})
            if (method, path) == ("POST", "/recurringruns"):
                state.recurring.append({**body, "recurring_run_id": new_id})
                return self._send(200, state.recurring[-1])
            return self._send(404, {"error": f"stand-in has no {method} {url.path}", "code": 5})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@pytest.fixture
def kfp_api():
    state = KfpStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Each test compiles into its own folder; no token unless the test sets one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(submit.TOKEN_ENV, raising=False)
    (tmp_path / "params.json").write_text(json.dumps({"data_uri": DATA_URI, "lora_r": 8, "max_steps": 50}))
    return tmp_path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = kftune_main(["pipeline", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected_key(**overrides: Any) -> str:
    params = parameters.resolve_parameters({"data_uri": DATA_URI, "lora_r": 8, "max_steps": 50, **overrides})
    return submit.idempotency_key(submit.submitted_commit(), DATA_SHA, submit.config_hash(params))


def test_submit_sends_spec_parameters_key_and_service_account(kfp_api, workdir, capsys, monkeypatch):
    monkeypatch.setenv(submit.TOKEN_ENV, TOKEN)
    kfp_api.token = TOKEN
    rc, out, err = cli(
        capsys,
        "submit",
        "--host",
        kfp_api.url,
        "--params",
        "params.json",
        "--method",
        "qlora",
        "--experiment",
        "nightly",
    )
    assert rc == 0, err
    key = expected_key(method="qlora")
    assert TOKEN not in out + err
    assert {r.authorization for r in kfp_api.requests} == {f"Bearer {TOKEN}"}

    # the pipeline: uploaded once, plus a version named by the sha256 of the compiled YAML it carries
    (upload,) = kfp_api.sent("POST", "/pipelines/upload")
    (version,) = kfp_api.sent("POST", "/pipelines/upload_version")
    spec = version.body["uploadfile"]
    assert spec == (workdir / "build" / "finetune.yaml").read_bytes() == upload.body["uploadfile"]
    assert version.query["name"] == hashlib.sha256(spec).hexdigest()[:16]
    docs = list(yaml.safe_load_all(spec))
    assert docs[0]["pipelineInfo"]["name"] == upload.query["name"] == "kftune-finetune"
    assert {"validate-data", "evaluate"} <= set(docs[0]["root"]["dag"]["tasks"])
    assert {"exec-train", "exec-train-across-nodes"} <= set(docs[0]["deploymentSpec"]["executors"])
    assert "platforms" in docs[1]  # the Kubernetes spec (secrets, GPU node selector) travels too

    (exp,) = kfp_api.sent("POST", "/experiments")
    assert exp.body == {"display_name": "nightly", "namespace": "kftune"}
    (run,) = kfp_api.sent("POST", "/runs")
    assert run.body["service_account"] == "kftune-pipeline"
    assert run.body["experiment_id"] == kfp_api.experiments[0]["experiment_id"]
    assert run.body["pipeline_version_reference"] == {
        "pipeline_id": kfp_api.versions[-1]["pipeline_id"],
        "pipeline_version_id": kfp_api.versions[-1]["pipeline_version_id"],
    }
    params = run.body["runtime_config"]["parameters"]
    assert (params["data_uri"], params["method"], params["lora_r"], params["max_steps"]) == (DATA_URI, "qlora", 8, 50)
    assert params["learning_rate"] == 0.0 and set(params) == set(parameters.resolve_parameters({"data_uri": DATA_URI}))
    assert run.body["display_name"] == f"kftune-qlora [kftune-key={key}]"
    assert "run id-" in out and key in out


def test_same_key_returns_the_first_run_and_force_makes_another(kfp_api, workdir, capsys):
    args = ("submit", "--host", kfp_api.url, "--params", "params.json")
    rc, first, err = cli(capsys, *args)
    assert rc == 0, err
    rc, second, err = cli(capsys, *args)
    assert rc == 0, err
    assert len(kfp_api.sent("POST", "/runs")) == 1
    run_id = kfp_api.runs[0]["run_id"]
    assert f"run {run_id} exists already" in second
    # the lookup is a display-name substring filter on the key, in the namespace
    lookup = kfp_api.sent("GET", "/runs")[-1]
    assert json.loads(lookup.query["filter"])["predicates"][0]["stringValue"] == f"kftune-key={expected_key()}"
    assert lookup.query["namespace"] == "kftune"
    assert len(kfp_api.sent("POST", "/pipelines/upload_version")) == 1  # not re-uploaded either

    rc, third, err = cli(capsys, *args, "--force")
    assert rc == 0, err
    assert len(kfp_api.sent("POST", "/runs")) == 2 and kfp_api.runs[1]["run_id"] != run_id
    assert len(kfp_api.sent("POST", "/pipelines/upload_version")) == 1  # same DAG: same version

    rc, _, err = cli(capsys, *args, "--lora-r", "4")  # another config: another key, another run
    assert rc == 0, err
    assert len(kfp_api.sent("POST", "/runs")) == 3 and expected_key(lora_r=4) in kfp_api.runs[2]["display_name"]


def test_dry_run_contacts_nothing_and_hashes_a_local_file(kfp_api, workdir, capsys):
    data = workdir / "train.jsonl"
    data.write_text('{"instruction": "hi", "input": "", "output": "there"}\n')
    rc, out, err = cli(capsys, "submit", "--dry-run", "--host", kfp_api.url, "--data-uri", str(data))
    assert rc == 0, err
    assert kfp_api.requests == []
    params = parameters.resolve_parameters({"data_uri": str(data)})
    key = submit.idempotency_key(submit.submitted_commit(), sha256_file(data), submit.config_hash(params))
    assert f"key           {key}" in out and "kftune-finetune" in out and "experiment    kftune" in out
    assert "s3://kftune/inputs/data/<sha256>/" in out  # it would upload the file first
    data.write_text('{"instruction": "hi", "input": "", "output": "changed"}\n')
    rc, changed, _ = cli(capsys, "submit", "--dry-run", "--data-uri", str(data))
    assert rc == 0 and key not in changed  # other data: other key


def test_wait_exits_nonzero_when_the_run_fails(kfp_api, workdir, capsys):
    kfp_api.final_state = "FAILED"
    rc, out, _ = cli(capsys, "submit", "--host", kfp_api.url, "--params", "params.json", "--wait")
    assert rc == 1 and "finished: FAILED" in out
    kfp_api.final_state = "SUCCEEDED"
    rc, out, _ = cli(capsys, "submit", "--host", kfp_api.url, "--params", "params.json", "--wait", "--force")
    assert rc == 0 and "finished: SUCCEEDED" in out


def test_401_and_unreachable_are_one_line_errors_without_the_token(kfp_api, workdir, capsys, monkeypatch):
    kfp_api.token = "the-right-one"
    monkeypatch.setenv(submit.TOKEN_ENV, TOKEN)
    rc, out, err = cli(capsys, "submit", "--host", kfp_api.url, "--params", "params.json")
    assert rc == 2
    assert "rejected the token (HTTP 401)" in err and f"${submit.TOKEN_ENV}" in err and kfp_api.url in err
    assert TOKEN not in out + err and "Traceback" not in err
    assert kfp_api.sent("POST", "/runs") == []

    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    rc, out, err = cli(capsys, "submit", "--host", dead, "--params", "params.json")
    assert rc == 2 and f"cannot reach KFP at {dead}" in err and "--host" in err and TOKEN not in out + err


def test_schedule_creates_one_recurring_run(kfp_api, workdir, capsys):
    args = ("schedule", "--host", kfp_api.url, "--params", "params.json", "--cron", "0 3 * * 1")
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    (job,) = kfp_api.sent("POST", "/recurringruns")
    assert job.body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert job.body["max_concurrency"] == 1 and job.body["no_catchup"] is True and job.body["mode"] == "ENABLE"
    assert job.body["service_account"] == "kftune-pipeline"
    assert job.body["runtime_config"]["parameters"]["lora_r"] == 8
    assert f"kftune-key={expected_key()}" in job.body["display_name"]
    rc, out, err = cli(capsys, *args)
    assert rc == 0 and "exists already" in out and len(kfp_api.sent("POST", "/recurringruns")) == 1
    rc, _, err = cli(capsys, "schedule", "--dry-run", "--params", "params.json", "--cron", "every day")
    assert rc == 2 and "--cron 'every day'" in err


def test_bad_params_file_names_the_problem(workdir, capsys):
    (workdir / "bad.json").write_text(json.dumps({"data_uri": DATA_URI, "lora_rank": 8, "max_steps": "many"}))
    rc, _, err = cli(capsys, "submit", "--dry-run", "--params", "bad.json")
    assert rc == 2 and "'lora_rank'" in err and "max_steps: 'many' is not a int" in err
    rc, _, err = cli(capsys, "submit", "--dry-run", "--data-uri", "s3://kftune/inputs/data/train.jsonl")
    assert rc == 2 and "not content-addressed" in err
