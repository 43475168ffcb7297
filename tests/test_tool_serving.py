"""The registered chat model takes `tools` and answers with `tool_calls`: in-process through pyfunc and over HTTP
from `mlflow models serve`, on a tiny model fine-tuned until it makes one call (a real model, a real server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kftune.data.reading import load_samples
from kftune.dev.stack import free_ports
from kftune.dev.tool_data import FUNCTIONS, write_jsonl
from kftune.registry import mlflow_model
from kftune.train.config import TrainConfig
from kftune.train.training import run

pytestmark = pytest.mark.slow
ROW = {
    "conversations": [
        {"from": "human", "value": "Can you get me the latest sports news?"},
        {"from": "function_call", "value": json.dumps({"name": "get_news", "arguments": {"category": "sports"}})},
        {"from": "observation", "value": '{"headlines": ["Sports headline 7"]}'},
        {"from": "gpt", "value": "The latest sports news: Sports headline 7."},
    ],
    "tools": json.dumps([FUNCTIONS["get_news"]]),
}
SERVE_START_S = 180


@pytest.fixture(scope="module")
def served_model(tool_model, tmp_path_factory) -> tuple[Path, dict]:
    """An MLflow chat model saved from the tiny model fully fine-tuned on one tool row (it learns the call)."""
    tmp = tmp_path_factory.mktemp("serving")
    data = write_jsonl(tmp / "one.jsonl", [ROW] * 8)
    cfg = TrainConfig(
        base_model=str(tool_model),
        data_path=str(data),
        output_dir=str(tmp / "full"),
        max_steps=16,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_seq_length=512,
        precision="fp32",
    )
    run(cfg)
    sample = load_samples(data)[0]
    example = mlflow_model.input_example(sample, 32)
    mlflow_model.save(tmp / "full", tmp / "mlflow-model", card="# tool test", example=example, facts={})
    request = {"messages": sample["messages"][:1], "tools": sample["tools"], "max_tokens": 40, "temperature": 0.0}
    return tmp / "mlflow-model", request


def _call(answer: dict) -> dict:
    choice = answer["choices"][0]
    assert answer["object"] == "chat.completion" and choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    return {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}


def test_pyfunc_takes_tools_and_returns_tool_calls(served_model):
    import mlflow.pyfunc

    path, request = served_model
    chat = mlflow.pyfunc.load_model(str(path))
    (answer,) = chat.predict(request)
    assert _call(answer) == {"name": "get_news", "arguments": {"category": "sports"}}
    # without tools the request is MLflow's own chat model's, unchanged
    (plain,) = chat.predict({"messages": request["messages"], "max_tokens": 4, "temperature": 0.0})
    assert plain["choices"][0]["message"]["role"] == "assistant" and "tool_calls" not in plain["choices"][0]["message"]
    assert (path / "code" / "chat_serving.py").is_file() and (path / "code" / "tool_call_text.py").is_file()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_a_request_with_tools(served_model, tmp_path):
    path, request = served_model
    (port,) = free_ports(1)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", str(path), "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not start"
            time.sleep(1)
        answer = _post(f"http://127.0.0.1:{port}/invocations", request)
        (answer,) = answer["predictions"] if isinstance(answer, dict) and "predictions" in answer else answer
        assert _call(answer) == {"name": "get_news", "arguments": {"category": "sports"}}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
