"""General-ability benchmarks (EleutherAI's lm-evaluation-harness) on the models evaluate already holds.

A tuned model that learns its task and forgets what its base could do passes a gate that looks only at
the task's rows; benchmark scores of the base and the tuned model, on the same examples with the same
seed, show what tuning cost. `plan` resolves the task names and loads their data once, before any model
is loaded, so a typo or missing data fails in seconds with one line; `run` scores one loaded model
(lm-eval's HFLM accepts the model object and tokenizer, so nothing is loaded twice); `compare` pairs
the two models' results per task.

Prompts go through the chat template the model was trained with (as evaluate's own scoring does). A
task folder's relative `data_files` are read from inside the folder, so a folder with its data beside
its YAML runs offline from anywhere. `kftune_smoke` (the folder `smoke/` here, always known) is a
smoke check, not a benchmark.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError

log = logging.getLogger("kftune")

SMOKE = Path(__file__).with_name("smoke")  # the shipped smoke task folder (task `kftune_smoke`)
SEED = 1234  # lm-eval's own default for its numpy/torch/few-shot seeds: the same for base and tuned
BOOTSTRAP_ITERS = 100  # standard errors of metrics without a closed form (acc's is closed form)
REMEDY = (
    "give a local task folder instead (--benchmarks PATH: lm-eval task YAML files with their data beside them, "
    f"like {SMOKE})"
)


@dataclass
class Plan:
    """The tasks to run, loaded once: task name -> lm-eval Task, and how many examples each."""

    spec: str
    limit: int | None
    tasks: dict[str, Any] = field(default_factory=dict)
    manager: Any = None

    def settings(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "spec": self.spec, "limit": self.limit, "seed": SEED, "chat_template": True}


def _names_and_folders(spec: str) -> tuple[list[str], list[Path]]:
    names, folders = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            folders.append(path.resolve())
        elif "/" in item or item.startswith("."):
            raise KftuneError(f"--benchmarks {item}: no such folder; give an lm-eval task name or a task folder")
        else:
            names.append(item)
    return names, folders


def _manager(folders: list[Path], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(SMOKE), *map(str, folders)], include_defaults=defaults)


def _tasks_in(manager, folder: Path) -> list[str]:
    return sorted(
        name
        for name, entry in manager.task_index.items()
        if entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(folder)
    )


def _load(manager, name: str) -> dict[str, Any]:
    """{task name: Task} for one name, its data loaded (from inside its folder); offline: one line."""
    entry = manager.task_index.get(name)
    where = Path(entry.yaml_path).parent if entry is not None and entry.yaml_path else Path.cwd()
    try:
        with contextlib.chdir(where):
            return dict(manager.load([name])["tasks"])
    except Exception as exc:  # lm-eval and datasets raise many kinds (ConnectionError, OSError, ValueError, ...)
        reason = " ".join(str(exc).split())[:200]
        raise KftuneError(
            f"benchmark {name}: its data could not be loaded ({type(exc).__name__}: {reason}); "
            f"offline or unreachable? {REMEDY}"
        ) from None


def plan(spec: str, limit: int | None = None) -> Plan | None:
    """Resolve `spec` (comma list of lm-eval task names and task folders) and load every task's data."""
    if not spec or not spec.strip():
        return None
    if limit is not None and limit < 1:
        raise KftuneError(f"--benchmark_limit must be >= 1 (examples per task), got {limit}")
    names, folders = _names_and_folders(spec)
    local = _manager(folders, defaults=False)
    manager = local if all(n in local.all_tasks for n in names) else _manager(folders, defaults=True)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; closest known: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            raise KftuneError(f"--benchmarks: unknown task {name!r}{hint}")
    for folder in folders:
        found = _tasks_in(manager, folder)
        if not found:
            raise KftuneError(f"--benchmarks {folder}: no lm-eval task YAML (a file with a `task:` key) in it")
        names += found
    result = Plan(spec, limit, manager=manager)
    for name in dict.fromkeys(names):
        result.tasks |= _load(manager, name)
    log.info("benchmarks: %s (%s examples each)", ", ".join(result.tasks), limit or "all")
    return result


def _headline(task_result: dict[str, Any], higher: dict[str, bool]) -> tuple[str, str, bool]:
    """(metric, its filter, higher is better) reported for a task: the first metric of its metric_list."""
    for key in task_result:
        if "," not in key or "_stderr" in key:
            continue
        metric, filter_ = key.split(",", 1)
        if metric in higher:
            return metric, filter_, bool(higher[metric])
    raise KftuneError(f"lm-eval returned no metric with a direction for this task ({sorted(task_result)})")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run(benchmarks: Plan, model, tokenizer, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Score one loaded model: {task: {metric, higher_is_better, value, stderr, examples}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # a copy: lm-eval may set a pad token or padding side, and the other model is scored with this tokenizer
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=list(benchmarks.tasks.values()),
        task_manager=benchmarks.manager,
        limit=benchmarks.limit,
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
        apply_chat_template=True,
        random_seed=SEED,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
    )
    scores = {}
    for task, values in out["results"].items():
        higher = out.get("higher_is_better", {}).get(task) or {}
        if not higher:
            continue  # a group's aggregate without its own direction: its tasks are reported one by one
        metric, filter_, up = _headline(values, higher)
        scores[task] = {
            "metric": metric,
            "higher_is_better": up,
            "value": _number(values.get(f"{metric},{filter_}")),
            "stderr": _number(values.get(f"{metric}_stderr,{filter_}")),
            "examples": int(out.get("n-samples", {}).get(task, {}).get("effective", 0)),
        }
    return scores


def compare(base: dict[str, dict[str, Any]], tuned: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: metric, direction, base, tuned, their stderr, examples and the tuned - base delta."""
    rows = {}
    for task in sorted(set(base) | set(tuned)):
        b, t = base.get(task, {}), tuned.get(task, {})
        values = b.get("value"), t.get("value")
        rows[task] = {
            "metric": t.get("metric") or b.get("metric"),
            "higher_is_better": t.get("higher_is_better", b.get("higher_is_better", True)),
            "base": values[0],
            "tuned": values[1],
            "base_stderr": b.get("stderr"),
            "stderr": t.get("stderr"),
            "examples": t.get("examples", b.get("examples", 0)),
            "delta": values[1] - values[0] if None not in values else None,
        }
    return rows
