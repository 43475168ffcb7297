"""A registered version as an MLflow Model: the transformers flavor as a chat model, verified by a manifest.

MLflow's own consumers (`mlflow.transformers.load_model`, `mlflow.pyfunc.load_model`, `mlflow models
serve`, KServe's runtime) read only MLflow Models, so a candidate's HF files are saved with the
transformers flavor and task `llm/v1/chat`: pyfunc takes `{"messages": [...], "max_tokens": N,
"temperature": T}` and answers in the chat-completion shape. The folder is logged once, as the
LoggedModel of the registration run; that is the only registered copy of the weights.

kftune's content addressing still holds on that copy: `MANIFEST.json` inside the model lists every
file's size and sha256, the version's tag `registered_sha256` is the manifest's own sha256, and
`download` checks both before anything is loaded, so a flipped byte in the bucket is caught.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.data.formats import Message, Sample, split_sample
from kftune.models import tool_call_text

TASK = "llm/v1/chat"
LOGGED_NAME = "model"  # the LoggedModel's name inside the run
HF_SUBDIR = "model"  # where the transformers flavor keeps the HF files (config, weights, kftune's files)
SHA_TAG = "registered_sha256"
# what `mlflow models serve --env-manager local`, KServe's MLflow runtime and a fresh venv need, at the
# versions the model was saved with
# transformers 5's pipeline samples by default and refuses temperature 0: answer greedily unless the loader's
# model_config says otherwise (`mlflow.pyfunc.load_model(uri, model_config={"do_sample": True})`)
GREEDY = {"do_sample": False}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")  # saved by MLflow from the loaded model: not copied again
SERVING_MODULE = "chat_serving"  # the pyfunc loader: MLflow's chat model plus tools (see chat_serving.py)
# the one file MLflow's download of a models:/ URI adds to the folder (always overwritten there, so
# nothing stored under that name is ever read)
_DOWNLOAD_META = "registered_model_meta"
_REQUIRED = ("mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors", "jinja2")


def requirements() -> list[str]:
    """The serving requirements pinned to the versions installed here (the images carry mlflow-skinny, which
    has mlflow's version; serving installs the full mlflow at that version)."""
    return [f"{name}=={_version(name)}" for name in _REQUIRED]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name != "mlflow":
            raise
        return metadata.version("mlflow-skinny")


def input_example(sample: Sample | list[Message], max_tokens: int) -> dict[str, Any]:
    """A chat request from an eval row: its turns up to the last user message, answered greedily (a text
    row: its start as the question)."""
    if isinstance(sample, dict) and "text" in sample:
        sample = [{"role": "user", "content": sample["text"][:200]}]
    turns = [{"role": m["role"], "content": m["content"]} for m in split_sample(sample)[0]]
    while turns and turns[-1]["role"] != "user":
        turns.pop()
    if not turns:
        raise KftuneError("the eval data's first row has no user message; cannot build the model's input example")
    return {"messages": turns, "max_tokens": int(max_tokens), "temperature": 0.0}


def refuse_adapter(model_dir: Path, where: str) -> None:
    """Adapters are not registered: MLflow's flavor finds a PEFT base only by hub id or local path, not in S3."""
    if (model_dir / "adapter_config.json").is_file():
        raise KftuneError(
            f"{where} is a LoRA adapter; register a merged model instead: `kftune merge --base_model <base> "
            f"--lora_model {where} --output_dir <merged>` and `kftune register --model <merged> ...` (a registered "
            "version must load and serve on its own with MLflow's loaders, which cannot fetch an adapter's base "
            "from S3)"
        )


def _dtype(model_dir: Path):
    import torch

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def save(
    model_dir: Path, path: Path, *, card: str, example: Mapping[str, Any], facts: Mapping[str, str], mlflow_model=None
) -> str:
    """Save the HF model in `model_dir` as an MLflow chat model at `path`; the sha256 of its manifest.

    `facts` go into the MLmodel's metadata (template fingerprint and lineage), `card` becomes the
    model card (README.md next to the weights and MLflow's model_card.md).
    """
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kftune.core.artifacts import FINGERPRINT as FINGERPRINT_FILENAME
    from kftune.core.storage import MANIFEST
    from kftune.registry.modelcard import README

    refuse_adapter(model_dir, str(model_dir))
    stored = model_dir / FINGERPRINT_FILENAME
    fingerprint = json.loads(stored.read_text(encoding="utf-8")) if stored.is_file() else {}
    meta = {
        **{k: str(v) for k, v in facts.items()},
        **{f"kftune.{k}": fingerprint[k] for k in ("fingerprint", "chat_template", "tokenizer") if k in fingerprint},
    }
    # A components dict, not the folder's path: MLflow 3.17's local-checkpoint path fails on transformers 5
    # (it reads pipeline classes that are now lazy strings), so the model is loaded once here.
    dtype = _dtype(model_dir)
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    # MLmodel names the source model: the candidate's URI, not this machine's cache folder
    components["model"].name_or_path = facts.get("candidate_uri") or str(model_dir)
    mlflow.transformers.save_model(
        transformers_model=components,
        path=str(path),
        task=TASK,
        torch_dtype=dtype,
        model_card=ModelCard(card),
        input_example=dict(example),
        pip_requirements=requirements(),
        metadata=meta,
        mlflow_model=mlflow_model,
        model_config=dict(GREEDY),
        code_paths=[str(Path(__file__).with_name("chat_serving.py")), str(Path(tool_call_text.__file__))],
    )
    del components
    serve_tools(path)
    # model/ stays a complete HF folder (KServe's runtime and kftune's rescoring read it as one): the
    # candidate's tokenizer, chat template and kftune's files beside the weights MLflow wrote
    hf_files = path / HF_SUBDIR
    for source in sorted(model_dir.iterdir()):
        if (
            source.is_file()
            and source.name != MANIFEST
            and source.suffix not in _WEIGHTS
            and not (hf_files / source.name).exists()
        ):
            shutil.copy2(source, hf_files / source.name)
    (hf_files / README).write_text(card, encoding="utf-8")
    return write_manifest(path)


def serve_tools(path: Path) -> None:
    """Make the pyfunc flavor the tools-aware chat model (registry/chat_serving.py, shipped in code/)."""
    from mlflow.models import Model

    mlmodel = Model.load(str(path))
    mlmodel.flavors["python_function"]["loader_module"] = SERVING_MODULE
    mlmodel.save(str(path / "MLmodel"))


def write_manifest(path: Path) -> str:
    """MANIFEST.json over every file of the saved model; its sha256 names the registered copy."""
    from kftune.core.storage import MANIFEST, canonical_json, tree_manifest

    (path / MANIFEST).unlink(missing_ok=True)
    body = canonical_json(tree_manifest(path))
    (path / MANIFEST).write_bytes(body)
    return hashlib.sha256(body).hexdigest()


def log(
    client,
    experiment_id: str,
    run_id: str,
    model_dir: Path,
    *,
    card: str,
    example: Mapping[str, Any],
    facts: Mapping[str, str],
    params: Mapping[str, Any],
) -> tuple[Any, str]:
    """The MLflow Model logged as the LoggedModel of run `run_id` (its params, its metrics); (LoggedModel, sha256)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    logged = client.create_logged_model(
        experiment_id,
        name=LOGGED_NAME,
        source_run_id=run_id,
        model_type=TASK,
        params={k: str(v) for k, v in params.items() if v is not None},
        tags={k: str(v) for k, v in facts.items()},
    )
    with tempfile.TemporaryDirectory(prefix="kftune-logged-") as tmp:
        path = Path(tmp, "model")
        shell = Model(
            artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
        )
        sha = save(model_dir, path, card=card, example=example, facts=facts, mlflow_model=shell)
        client.log_model_artifacts(logged.model_id, str(path))
    client.set_logged_model_tags(logged.model_id, {SHA_TAG: sha})
    now = int(time.time() * 1000)  # the run's metrics, linked to the model (as mlflow's log_model does)
    client.log_batch(
        run_id,
        metrics=[
            Metric(k, v, now, 0, model_id=logged.model_id) for k, v in client.get_run(run_id).data.metrics.items()
        ],
    )
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged, sha


def verify(folder: Path, sha256: str, where: str) -> None:
    """A downloaded model holds exactly the files its MANIFEST.json lists, and the manifest hashes to `sha256`.

    As with checkpoints: a version without the tag, or a file the manifest does not list, is refused, so
    nothing unchecked (a dropped-in pickle, a swapped manifest) is ever loaded.
    """
    from kftune.core.storage import MANIFEST, sha256_file

    if not sha256:
        raise KftuneError(
            f"{where} has no {SHA_TAG} tag: it was not registered by kftune (or the tag was removed), so its "
            "files cannot be checked; register the model again"
        )
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise KftuneError(f"{where} holds no {MANIFEST}: it was not registered by kftune or is incomplete")
    body = manifest_path.read_bytes()
    if hashlib.sha256(body).hexdigest() != sha256:
        raise KftuneError(f"{where}/{MANIFEST} does not hash to the version's {SHA_TAG} {sha256}: it was altered")
    listed = json.loads(body)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p != manifest_path}
    present -= {_DOWNLOAD_META}  # written by MLflow's download itself, on this side (name and version)
    extra = sorted(present - set(listed))
    if extra:
        raise KftuneError(
            f"{where} holds {len(extra)} file(s) its {MANIFEST} does not list ({', '.join(extra[:3])}): "
            "the stored model was changed after registration; register the model again"
        )
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise KftuneError(
                f"{where}/{rel} does not match its {MANIFEST} entry (sha256 {entry['sha256'][:12]}): "
                "the stored object is corrupt; register the model again"
            )


def download(version, dst: Path | None = None) -> Path:
    """A verified local copy of a registered version's MLflow Model (MLflow's own download, kftune's check)."""
    import mlflow.artifacts

    if not version.source.startswith("models:/"):
        raise KftuneError(
            f"version {version.version} of {version.name!r} has source {version.source}, not an MLflow "
            "Model (registered before kftune logged MLflow Models); register the model again"
        )
    dst = Path(dst or tempfile.mkdtemp(prefix="kftune-registered-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))
    verify(local, version.tags.get(SHA_TAG, ""), f"{version.name} version {version.version} ({version.source})")
    return local


def load(version, allow_template_mismatch: bool = False):
    """(model, tokenizer) of a registered version through `mlflow.transformers.load_model`, verified first."""
    import mlflow.transformers

    from kftune.models import fingerprint

    local = download(version)
    components = mlflow.transformers.load_model(str(local), return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    fingerprint.check(
        local / HF_SUBDIR,
        tokenizer,
        f"the registered tokenizer of {version.name} version {version.version}",
        allow_template_mismatch,
    )
    model.eval()
    return model, tokenizer
