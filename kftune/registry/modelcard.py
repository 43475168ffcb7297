"""The model card: the registered MLflow Model's card (README.md beside the weights), so the model explains itself.

It says what the model is (base, method, rank, bits), what it was trained on (data statistics
and sha256), how it scored against its base on held-out data, and how to load and serve it with
MLflow's own tools and with transformers, by the registry URI of this model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

README = "README.md"
_ROWS = (
    ("eval_loss", "eval loss (assistant tokens)"),
    ("perplexity", "perplexity"),
    ("rougeL", "ROUGE-L (characters)"),
    ("chrf", "chrF"),
    ("checks_pass_rate", "outputs passing every check"),
)


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
        data_lines = "\n".join(f"| {k.replace('_', ' ')} | {_value(v)} |" for k, v in data.items() if v is not None)
        data_lines = f"\n## Training data\n\n| | |\n|---|---|\n{data_lines}\n"
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
