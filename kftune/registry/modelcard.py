"""The model card: the registered MLflow Model's card (README.md beside the weights), so the model explains itself.

It says what the model is (base, method, rank, bits), what it was trained on (data statistics
and sha256), how it scored against its base on held-out data, and how to load and serve it with
MLflow's own tools and with transformers, by the registry URI of this model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

README = "README.md"
_ROWS = (
    ("eval_loss", "eval loss (assistant tokens)"),
    ("perplexity", "perplexity"),
    ("rougeL", "ROUGE-L (characters)"),
    ("chrf", "chrF"),
    ("checks_pass_rate", "outputs passing every check"),
)


def data_statistics(
    uri: str, train_rows: int, eval_rows: int, dataset_sha256: str, data_mix: str | None = None
) -> dict[str, Any]:
    """Rows, sha256 and token lengths of the training data (from the validation report in the split artifact
    at `uri`) and the data mix it was trained with (train_metrics' record, as JSON), for the model card."""
    from kftune.core import artifacts
    from kftune.core.storage import resolve_path

    stats: dict[str, Any] = {"train_rows": train_rows, "eval_rows": eval_rows, "dataset_sha256": dataset_sha256}
    report = Path(resolve_path(uri)) / artifacts.VALIDATION_REPORT
    lengths = json.loads(report.read_text(encoding="utf-8")).get("token_lengths") if report.is_file() else None
    if lengths:
        stats |= {f"tokens_{k}": lengths[k] for k in ("mean", "p50", "p90", "max") if k in lengths}
    if data_mix:
        stats["data_mix"] = json.loads(data_mix)
    return stats


def _mix_table(mix: list[Mapping[str, Any]]) -> str:
    rows = "\n".join(f"| {m['uri']} | {m['weight']:g} | {m['drawn']} | `{m.get('sha256', '')[:16]}` |" for m in mix)
    return f"\nMixed into the training rows (`data_mix`; data_path is the task data):\n\n| source | weight | rows drawn | sha256 |\n|---|---:|---:|---|\n{rows}\n"


def _benchmark_table(evaluation: Mapping[str, Any]) -> str:
    rows = evaluation.get("benchmarks") or {}
    if not rows:
        return ""
    lines = "\n".join(
        f"| {task} {r['metric']} | {_value(r['base'])} | {_value(r['tuned'])} | {r.get('examples', '?')} |"
        for task, r in rows.items()
    )
    return f"\nGeneral-ability benchmarks (lm-evaluation-harness):\n\n| task metric | base | tuned | examples |\n|---|---|---|---|\n{lines}\n"


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(
    *,
    name: str,
    base_model: str,
    lineage: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
) -> str:
    """The card of a full or merged model; `lineage`: the version's tags (method, rank, ...)."""
    method = lineage.get("method", "unknown")
    facts = [("base model", base_model), ("method", method)]
    facts += [
        (k.replace("_", " "), lineage[k])
        for k in ("lora_r", "quantization_bit", "dataset_sha256", "config_sha256", "git_commit", "pipeline_run")
        if lineage.get(k)
    ]
    data_lines = ""
    if data:
        shown = {k: v for k, v in data.items() if v is not None and k != "data_mix"}
        data_lines = "\n".join(f"| {k.replace('_', ' ')} | {_value(v)} |" for k, v in shown.items())
        data_lines = f"\n## Training data\n\n| | |\n|---|---|\n{data_lines}\n"
        data_lines += _mix_table(data["data_mix"]) if data.get("data_mix") else ""
    base, tuned = evaluation.get("base", {}), evaluation.get("tuned", {})
    metric_lines = "\n".join(
        f"| {label} | {_value(base[key])} | {_value(tuned[key])} |"
        for key, label in _ROWS
        if key in tuned and key in base
    )
    settings = evaluation.get("settings", {})
    return f"""# {name}

A causal language model fine-tuned with kftune ({method}) from `{base_model}`.

| | |
|---|---|
{chr(10).join(f"| {k} | `{v}` |" for k, v in facts)}
{data_lines}
## Evaluation

On {evaluation.get("eval_rows", "?")} held-out rows (eval data sha256 `{evaluation.get("eval_sha256", "?")}`), both
models prompted with the chat template used in training; {settings.get("samples", 0)} greedy answers of up to
{settings.get("max_new_tokens", "?")} tokens scored against the references.

| metric | base | tuned |
|---|---|---|
{metric_lines}
{_benchmark_table(evaluation)}
## How to load it

With MLflow, from the registry (a chat model: task `llm/v1/chat`):

```python
import mlflow
chat = mlflow.pyfunc.load_model("models:/{name}@champion")
chat.predict({{"messages": [{{"role": "user", "content": "..."}}], "max_tokens": 128}})
pipeline = mlflow.transformers.load_model("models:/{name}@champion")  # a transformers pipeline
```

Served over HTTP: `mlflow models serve -m models:/{name}@champion --env-manager local`, then POST
the same JSON to `/invocations`. With kftune (verifies every file against MANIFEST.json first):
`from kftune.registry import load_registered; model, tokenizer = load_registered("models:/{name}@champion")`.

{_model_loading(name)}

The chat template this model was trained with is in this folder (`chat_template.jinja`) and MLflow
applies it to `messages`; `kftune_fingerprint.json` holds its hash (also in the MLmodel metadata):
`kftune infer` and `kftune evaluate` refuse another template.
"""


def _model_loading(name: str) -> str:
    return f"""With transformers, from the version's files (`kftune registry storage-uri {name}@champion` prints
where they lie; `model/` of the downloaded MLflow Model is a plain HF folder):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/model")
model = AutoModelForCausalLM.from_pretrained("path/to/model", dtype="auto")
```"""
