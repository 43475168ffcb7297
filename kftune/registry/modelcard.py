"""The model card: a README.md written into the registered artifact, so the model explains itself.

It says what the model is (base, method, rank, bits), what it was trained on (data statistics
and sha256), how it scored against its base on held-out data, and how to load it with
transformers, peft and MLflow, with the exact URIs of this artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

README = "README.md"
_ROWS = (("eval_loss", "eval loss (assistant tokens)"), ("perplexity", "perplexity"), ("rougeL", "ROUGE-L (characters)"),
         ("chrf", "chrF"), ("checks_pass_rate", "outputs passing every check"))


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(*, name: str, kind: str, base_model: str, lineage: Mapping[str, Any], evaluation: Mapping[str, Any],
           data: Mapping[str, Any] | None = None) -> str:
    """`kind`: "model" (full or merged weights) or "adapter"; `lineage`: the version's tags (method, rank, ...)."""
    method = lineage.get("method", "unknown")
    facts = [("base model", base_model), ("method", method)]
    facts += [(k.replace("_", " "), lineage[k]) for k in ("lora_r", "quantization_bit", "dataset_sha256", "config_sha256",
                                                           "git_commit", "pipeline_run") if lineage.get(k)]
    data_lines = ""
    if data:
        data_lines = "\n".join(f"| {k.replace('_', ' ')} | {_value(v)} |" for k, v in data.items() if v is not None)
        data_lines = f"\n## Training data\n\n| | |\n|---|---|\n{data_lines}\n"
    base, tuned = evaluation.get("base", {}), evaluation.get("tuned", {})
    metric_lines = "\n".join(f"| {label} | {_value(base[key])} | {_value(tuned[key])} |"
                             for key, label in _ROWS if key in tuned and key in base)
    settings = evaluation.get("settings", {})
    loader = _adapter_loading(base_model, name) if kind == "adapter" else _model_loading(name)
    return f"""# {name}

A {'LoRA adapter' if kind == 'adapter' else 'causal language model'} fine-tuned with kftune ({method}) from `{base_model}`.

| | |
|---|---|
{chr(10).join(f"| {k} | `{v}` |" for k, v in facts)}
{data_lines}
## Evaluation

On {evaluation.get('eval_rows', '?')} held-out rows (eval data sha256 `{evaluation.get('eval_sha256', '?')}`), both
models prompted with the chat template used in training; {settings.get('samples', 0)} greedy answers of up to
{settings.get('max_new_tokens', '?')} tokens scored against the references.

| metric | base | tuned |
|---|---|---|
{metric_lines}

## How to load it

With kftune, from the registry (resolves the alias, downloads and verifies the artifact):

```python
from kftune.registry.tracking import load_registered
model, tokenizer = load_registered("models:/{name}@champion")
```

{loader}

The chat template this model was trained with is in this folder (`chat_template.jinja`); prompt it
through `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.
`kftune_fingerprint.json` holds its hash: `kftune infer` and `kftune evaluate` refuse another template.
"""


def _model_loading(name: str) -> str:
    return f"""With transformers, from a local copy of this folder:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", dtype="auto")
```

With MLflow, the version's source is this folder in S3:

```python
import mlflow
version = mlflow.MlflowClient().get_model_version_by_alias("{name}", "champion")
print(version.source)  # s3://... ; `kftune infer --base_model <source>` chats with it
```"""


def _adapter_loading(base_model: str, name: str) -> str:
    return f"""With transformers and peft (the adapter sits on `{base_model}`):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="auto")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

With MLflow, the version's source is this folder in S3 and its tag `base_model` names the base:

```python
import mlflow
version = mlflow.MlflowClient().get_model_version_by_alias("{name}", "champion")
print(version.source, version.tags["base_model"])
```"""
