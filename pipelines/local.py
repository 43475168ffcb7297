"""Run the fine-tuning DAG on this machine through KFP's own local runner, against a real S3 and MLflow.

Each task is a subprocess of this Python (`SubprocessRunner(use_venv=False)`), so it imports the
installed kftune and inherits this process's environment, which carries the stack's endpoints and
keys for the length of the run. KFP's task output (executor inputs, tracebacks, progress bars)
goes to a log file; the terminal gets a line per step and, when a step fails, its own error.
"""

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kftune import steps
from kftune.core.errors import KftuneError
from kftune.sweep.plan import SweepResult
from pipelines.local_oneof import artifact_oneof
from pipelines.parameters import check_arguments, check_sweep_arguments

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([\w-]+)'")
_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
# variables that would point boto3 elsewhere than the env given to `run`
_SHADOWING = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


# KFP task name (without the -2 KFP adds to a step's second use) -> the step's result type
RESULTS: dict[str, type] = {
    "validate-data": steps.DataSplit,
    "train": steps.TrainedModel,
    "evaluate": steps.Evaluation,
    "merge-adapter": steps.MergedModel,
    "register-model": steps.Registration,
}
OTHER_OUTPUTS = ("report",)  # outputs that are not a step's result: evaluate's HTML report
STEP_OF_TASK = {"train-across-nodes": "train"}  # the train step on several nodes (pipelines/finetune.py)


@dataclass
class RunSummary:
    """What a successful run made, read back from KFP's records of each task's outputs."""

    run_dir: Path
    log: Path
    seconds: dict[str, float]  # step -> wall time, in the order the steps ran
    data: steps.DataSplit
    trained: steps.TrainedModel
    evaluation: steps.Evaluation
    registration: steps.Registration
    merged: steps.MergedModel | None = None  # only LoRA and QLoRA runs merge
    report: Path | None = None  # evaluate's report.html, as kfp.local stored the task's HTML output

    def render(self) -> str:
        data, trained, evaluation, merged, reg = (
            self.data,
            self.trained,
            self.evaluation,
            self.merged,
            self.registration,
        )
        history = trained.metrics.get("loss_history") or []
        loss = (
            f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f}"
            if len(history) > 1
            else f"mean loss {trained.metrics.get('train_loss', float('nan')):.3f}"
        )
        results = {
            "validate-data": f"{data.train_rows} train / {data.eval_rows} eval rows, data sha256 {data.dataset_sha256[:12]}",
            "train": f"{trained.method}, {trained.metrics.get('global_steps', 0)} steps: {loss}",
            "evaluate": f"eval loss base {evaluation.base_eval_loss:.3f} -> tuned {evaluation.eval_loss:.3f} "
            f"(perplexity {evaluation.base_perplexity:.1f} -> {evaluation.perplexity:.1f})"
            + (
                f", ROUGE-L {evaluation.base_rougeL:.3f} -> {evaluation.rougeL:.3f}"
                if evaluation.rougeL is not None
                else ""
            )
            + "".join(
                f", {t} {r['metric']} "
                + " -> ".join(str(v if v is None else round(v, 3)) for v in (r["base"], r["tuned"]))
                for t, r in evaluation.benchmarks.items()
            ),
            "merge-adapter": merged and f"parity: max |logit diff| {merged.max_abs_logit_diff:.2g}",
            "register-model": f"{reg.name} version {reg.version}: {'champion' if reg.promoted else 'challenger'}",
        }
        rows = [f"  {'step':<16}{'time':>8}  result"]
        rows += [f"  {step:<16}{seconds:>7.1f}s  {results[step]}" for step, seconds in self.seconds.items()]
        rows.append(f"  {'total':<16}{sum(self.seconds.values()):>7.1f}s")
        rows += ["", "artifacts (S3, content-addressed, MANIFEST.json verified on every read):"]
        rows += [
            f"  {label:<16}{result.uri}"
            for label, result in (
                ("data split", data),
                ("trained model", trained),
                ("evaluation", evaluation),
                ("merged model", merged),
            )
            if result
        ]
        rows += [
            "",
            f"registered model  {reg.name} version {reg.version} -> {reg.source}",
            f"promotion gate    {reg.decision()}",
            f"MLflow run        {reg.run_url or reg.run_id}",
            f"task logs         {self.log}",
        ]
        if self.report:
            rows.append(f"report            {self.report}")
        if evaluation.tuned_sample:
            rows += [
                "",
                "one eval prompt, answered greedily by each model:",
                _indent(evaluation.sample_prompt, "prompt"),
                _indent(evaluation.base_sample, "base"),
                _indent(evaluation.tuned_sample, "tuned"),
            ]
        return "\n".join(rows)


def _indent(text: str, label: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return "\n".join(f"  {label if i == 0 else '':<7}| {line}" for i, line in enumerate(text.splitlines() or [""]))


class _TaskLog(io.TextIOBase):
    """stdout during a run: everything into the log file; step starts and ends, timed, to `progress`."""

    def __init__(self, file: TextIO, progress: TextIO | None) -> None:
        self.file, self.progress = file, progress
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.file.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def _line(self, line: str) -> None:
        if start := _START.search(line):
            self.started[start[1]] = time.monotonic()
            self._say(f"[pipeline] {start[1]} ...")
        elif end := _END.search(line):
            task, status = end[1], end[2]
            self.seconds[task] = time.monotonic() - self.started.get(task, time.monotonic())
            self._say(f"[pipeline] {task} {status.lower()} in {self.seconds[task]:.1f}s")

    def _say(self, message: str) -> None:
        if self.progress:
            print(message, file=self.progress, flush=True)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with `env` on top (tasks inherit it), restored afterwards."""
    saved = dict(os.environ)
    for name in _SHADOWING:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _failure(log_path: Path, kfp_message: str) -> KftuneError:
    """The failed step's own error (the last marked line in its output), else the log's tail."""
    text = _ANSI.sub("", log_path.read_text(encoding="utf-8", errors="replace"))
    failed = re.findall(r"Task '([\w-]+)' finished with status FAILURE", text)
    step = failed[-1] if failed else "a step"
    marked = [line.split(steps.ERROR_MARK, 1)[1] for line in text.splitlines() if steps.ERROR_MARK in line]
    if marked:
        return KftuneError(f"pipeline step {step} failed: {json.loads(marked[-1])} (task logs: {log_path})")
    tail = "\n".join(line for line in text.splitlines()[-15:] if line.strip())
    return KftuneError(
        f"pipeline step {step} failed ({_ANSI.sub('', kfp_message)}); the last lines of {log_path}:\n{tail}"
    )


def _collect(run_dir: Path, seconds: dict[str, float], log_path: Path) -> RunSummary:
    """Each step's result from its task's executor_output.json (KFP's record of the artifacts a task made)."""
    results: dict[str, Any] = {}
    step_seconds: dict[str, float] = {}
    for task, elapsed in seconds.items():
        step = re.sub(r"-\d+$", "", task)  # register-model-2 is register-model in the other branch
        step = STEP_OF_TASK.get(step, step)
        (metadata,) = (m for name, m in _outputs(run_dir / task).items() if name not in OTHER_OUTPUTS)
        results[step] = steps.from_metadata(RESULTS[step], metadata)
        step_seconds[step] = elapsed
    report = run_dir / "evaluate" / "report"
    return RunSummary(
        run_dir,
        log_path,
        step_seconds,
        results["validate-data"],
        results["train"],
        results["evaluate"],
        results["register-model"],
        results.get("merge-adapter"),
        report if report.is_file() else None,
    )


def run(
    arguments: Mapping[str, Any],
    env: Mapping[str, str],
    pipeline_root: str | Path,
    progress: TextIO | None = sys.stderr,
    runner: str = "subprocess",
) -> RunSummary:
    """Run `finetune_pipeline(**arguments)` through kfp.local with `env` (S3 + MLflow endpoints and keys).

    Training settings are checked first, so a bad one fails at once, not after the data step.
    runner: "subprocess" (tasks are children of this Python) or "container" (each in its image, see
    pipelines/container_runner.py).
    """
    from pipelines.finetune import finetune_pipeline  # heavy: imports kfp; loaded when used

    check_arguments(arguments)
    run_dir, seconds, log_path = _run_locally(finetune_pipeline, arguments, env, pipeline_root, progress, runner)
    return _collect(run_dir, seconds, log_path)


def _run_locally(
    pipeline: Any,
    arguments: Mapping[str, Any],
    env: Mapping[str, str],
    pipeline_root: str | Path,
    progress: TextIO | None,
    runner: str = "subprocess",
) -> tuple[Path, dict[str, float], Path]:
    """Run `pipeline(**arguments)` through kfp.local; (kfp.local's run folder, seconds per task, task log)."""
    from kfp import local

    # a folder per run, so this run's task records are the only ones in it
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-", dir=pipeline_root)).absolute()
    log_path = run_root / "tasks.log"
    with (
        open(log_path, "w", encoding="utf-8") as file,
        _environment(env),
        warnings.catch_warnings(),
        _task_runner(runner, env, run_root) as task_runner,
        artifact_oneof(),  # the train step's model is a dsl.OneOf of its two branches
    ):
        local.init(runner=task_runner, raise_on_error=True, pipeline_root=str(run_root))
        # kfp.local warns that our images are not python:* (it runs this interpreter anyway) and that
        # the Kubernetes settings do nothing here: both true, both expected
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner", category=UserWarning)
        tee = _TaskLog(file, progress)
        try:
            with contextlib.redirect_stdout(tee):
                pipeline(**arguments)
        except RuntimeError as exc:
            file.flush()
            raise _failure(log_path, str(exc)) from None
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]  # kfp.local's <pipeline>-<time> folder
    return run_dir, tee.seconds, log_path


RUNNERS = ("subprocess", "container")


@contextlib.contextmanager
def _task_runner(kind: str, env: Mapping[str, str], run_root: Path) -> Iterator[Any]:
    """The kfp.local runner of each task: a subprocess of this Python, or a container of its image."""
    from kfp import local

    if kind == "container":
        from pipelines.container_runner import docker_runner

        with docker_runner(env, run_root) as docker:
            yield docker
    elif kind == "subprocess":
        yield local.SubprocessRunner(use_venv=False)
    else:
        raise KftuneError(f"runner {kind!r}: expected one of {', '.join(RUNNERS)}")


@dataclass
class SweepSummary:
    """What a successful sweep made: the comparison, the winner and its registration."""

    run_dir: Path
    log: Path
    seconds: float  # the whole run, wall time
    data: steps.DataSplit
    sweep: SweepResult
    winner: steps.TrainedModel
    registration: steps.Registration
    merged: steps.MergedModel | None = None

    def render(self) -> str:
        reg, result = self.registration, self.sweep
        merged = f", merged (parity: max |logit diff| {self.merged.max_abs_logit_diff:.2g})" if self.merged else ""
        return "\n".join(
            [
                f"sweep of {result.candidates} candidates on {self.data.train_rows} train / {self.data.eval_rows} eval rows "
                f"in {self.seconds:.0f}s",
                "",
                result.table,
                f"winner            {result.winner} ({self.winner.method}{merged})",
                f"registered model  {reg.name} version {reg.version} -> {reg.source}",
                f"comparison        {result.uri}/comparison.{{md,json,html,png}}",
                f"MLflow sweep run  {result.parent_run_url or result.parent_run_id} (one child run per candidate)",
                f"MLflow model run  {reg.run_url or reg.run_id}",
                f"task logs         {self.log}",
            ]
        )


def run_sweep(
    arguments: Mapping[str, Any],
    env: Mapping[str, str],
    pipeline_root: str | Path,
    parallelism: int = 1,
    progress: TextIO | None = sys.stderr,
) -> SweepSummary:
    """Run the sweep pipeline through kfp.local; `parallelism` branches at once (1: timings undisturbed)."""
    from pipelines.sweep import build  # heavy: imports kfp; loaded when used

    check_sweep_arguments(arguments)
    started = time.monotonic()
    run_dir, _, log_path = _run_locally(build(parallelism), arguments, env, pipeline_root, progress)
    seconds = time.monotonic() - started
    outputs = {task.name: _outputs(task) for task in run_dir.iterdir() if (task / "executor_output.json").is_file()}
    compared = outputs["compare-candidates"]
    (register,) = [out["registered"] for name, out in outputs.items() if name.startswith("register-model")]
    merged = outputs.get("merge-adapter", {}).get("merged")
    return SweepSummary(
        run_dir,
        log_path,
        seconds,
        steps.from_metadata(steps.DataSplit, outputs["validate-data"]["data"]),
        steps.from_metadata(SweepResult, compared["report"]),
        steps.from_metadata(steps.TrainedModel, compared["winner"]),
        steps.from_metadata(steps.Registration, register),
        steps.from_metadata(steps.MergedModel, merged) if merged else None,
    )


def _outputs(task_dir: Path) -> dict[str, dict[str, Any]]:
    """A task's output artifacts' metadata by output name, from KFP's record of what it made."""
    record = json.loads((task_dir / "executor_output.json").read_text())
    return {name: output["artifacts"][0]["metadata"] for name, output in record.get("artifacts", {}).items()}
