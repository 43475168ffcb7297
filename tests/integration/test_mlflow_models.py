"""A version registered by a pipeline run is an MLflow Model that MLflow's own tools load and serve.

Against the session's real SeaweedFS + MLflow server: `mlflow.transformers.load_model` and
`mlflow.pyfunc.load_model` by `models:/NAME@champion`, `mlflow models serve` answering a chat
request over HTTP on 127.0.0.1 with what `kftune infer` answers (greedy, same prompt); the bucket
holds the registered weights once; a flipped byte in that copy is caught when kftune loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kftune.dev.stack import StackInfo, free_ports
from pipelines.local import RunSummary, run

from ..conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "mlflow-models-test"
# Enough LoRA steps on the tiny model to beat its base by the gate's margin, so the version becomes champion.
SETTINGS = {
    "max_steps": 12,
    "learning_rate": 2e-2,
    "lora_r": 8,
    "lora_alpha": 16,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 256,
    "eval_fraction": 0.25,
    "sample_tokens": 8,
    "eval_samples": 2,
}
MESSAGES = [{"role": "user", "content": "为这家咖啡店写一篇小红书探店笔记"}]
TOKENS = 12
SERVE_START_S = 180  # `mlflow models serve` downloads the model and starts uvicorn: bounded, not open-ended


@pytest.fixture(scope="module")
def env(stack: StackInfo, task_env: dict[str, str]) -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in task_env.items():
            mp.setenv(name, value)
        yield task_env


@pytest.fixture(scope="module")
def registered(inputs, env, tmp_path_factory) -> RunSummary:
    arguments = {**inputs, **SETTINGS, "method": "lora", "registered_model_name": NAME, "train_processes": 1}
    summary = run(arguments, env, tmp_path_factory.mktemp("root"), progress=None)
    assert summary.registration.promoted, summary.registration.decision()
    return summary


def _content(answer) -> str:
    """The assistant's text from a chat completion (a pyfunc result or the server's JSON)."""
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if isinstance(answer, list):
        (answer,) = answer
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    return answer["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def kftune_answer(registered, env) -> str:
    """`kftune infer` on the candidate the version was made from, greedy, at the dtype it was saved in."""
    from kftune.core.storage import resolve_path

    candidate = (registered.merged or registered.trained).uri
    dtype = json.loads(Path(resolve_path(candidate), "config.json").read_text(encoding="utf-8")).get("dtype")
    out = run_cli(
        "-m",
        "kftune.cli",
        "infer",
        "--base_model",
        candidate,
        "--prompt",
        MESSAGES[0]["content"],
        "--do_sample",
        "false",
        "--repetition_penalty",
        "1.0",
        "--max_new_tokens",
        str(TOKENS),
        "--precision",
        "bf16" if dtype == "bfloat16" else "fp32",
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer = out.stdout.strip().splitlines()[-1].strip()
    assert answer
    return answer


def test_the_version_is_a_chat_model_logged_with_its_run(registered, env):
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    reg = registered.registration
    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == reg.version and version.source.startswith("models:/m-")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == reg.run_id and logged.params["method"] == "lora"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": reg.version}]
    assert {m.key for m in logged.metrics} >= {"eval_loss", "base_eval_loss"}  # the run's metrics, linked
    assert version.tags["artifact_sha256"] == registered.merged.sha256 and len(version.tags["registered_sha256"]) == 64
    info = get_model_info(f"models:/{NAME}@champion")
    assert {"transformers", "python_function"} <= set(info.flavors)
    assert info.metadata["task"] == "llm/v1/chat" and len(info.metadata["kftune.fingerprint"]) == 64
    assert [i["name"] for i in info.signature.inputs.to_dict()][:1] == ["messages"]
    assert info.saved_input_example_info is not None  # an eval row's chat request
    run_artifacts = {a.path for a in client.list_artifacts(reg.run_id)}
    assert {"metrics.json", "samples.jsonl", "report.html"} <= run_artifacts


def test_mlflow_transformers_loads_the_champion_with_the_tuned_weights(registered, env):
    import mlflow.transformers
    import torch
    from transformers import AutoModelForCausalLM

    from kftune.core.storage import resolve_path

    pipeline = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    tuned = AutoModelForCausalLM.from_pretrained(resolve_path(registered.merged.uri), dtype=pipeline.model.dtype)
    loaded = pipeline.model.state_dict()
    for key, value in tuned.state_dict().items():
        assert torch.equal(loaded[key], value), key
    prompt = pipeline.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    text = pipeline(prompt, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert isinstance(text, str)


def test_pyfunc_answers_a_chat_request_as_kftune_infer_does(registered, env, kftune_answer):
    import mlflow.pyfunc

    chat = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    answer = chat.predict({"messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0.0})
    assert _content(answer).strip() == kftune_answer


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return 0


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow, uvicorn and its worker), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue


def test_mlflow_models_serve_answers_a_chat_request_over_http(registered, env, kftune_answer, tmp_path):
    (port,) = free_ports(1)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(mlflow_cli),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}/{registered.registration.version}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        # as in an activated venv: the server execs `uvicorn` from PATH
        env={**os.environ, **env, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVE_START_S
        while _get(f"http://127.0.0.1:{port}/ping") != 200:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no answer on /ping in {SERVE_START_S} s"
            time.sleep(1)
        body = json.dumps({"messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0.0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        _stop(server)
        log.close()
    assert _content(answer).strip() == kftune_answer


def test_the_bucket_holds_one_registered_copy_of_the_weights(registered, env, s3, stack):
    """Registration logs the MLflow Model once: its weights are under MLflow's artifacts, no carded copy elsewhere."""
    from kftune.registry.tracking import storage_uri

    where = storage_uri(f"models:/{NAME}@champion")
    printed = run_cli("-m", "kftune.cli", "registry", "storage-uri", f"{NAME}@champion", env=env)
    assert printed.returncode == 0 and printed.stdout.strip() == where, printed.stderr[-2000:]
    bucket, prefix = where.removeprefix("s3://").split("/", 1)
    assert bucket == stack.bucket
    keys = [
        item["Key"]
        for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]
    weights = s3.client.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")["Body"].read()
    digest = hashlib.sha256(weights).hexdigest()
    logged = [k for k in keys if k.startswith("mlflow/") and k.endswith(".safetensors")]
    copies = [
        k
        for k in logged
        if hashlib.sha256(s3.client.get_object(Bucket=bucket, Key=k)["Body"].read()).hexdigest() == digest
    ]
    assert copies == [f"{prefix}/model.safetensors"]
    assert not [k for k in keys if "/registered/" in k]  # the old carded copy is gone


def test_a_flipped_byte_in_the_registered_copy_is_caught_when_kftune_loads_it(registered, env, s3, tmp_path):
    from kftune.core.errors import KftuneError
    from kftune.registry.tracking import load_registered, storage_uri

    model, tokenizer = load_registered(f"models:/{NAME}@champion")  # verified, then MLflow's loader
    assert model.config.model_type == "qwen2" and tokenizer.chat_template
    bucket, prefix = storage_uri(f"models:/{NAME}@champion").removeprefix("s3://").split("/", 1)
    key = f"{prefix}/model.safetensors"
    original = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    s3.client.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
    try:
        with pytest.raises(KftuneError, match="model/model.safetensors does not match its MANIFEST.json"):
            load_registered(f"models:/{NAME}@champion")
    finally:
        s3.client.put_object(Bucket=bucket, Key=key, Body=original)
