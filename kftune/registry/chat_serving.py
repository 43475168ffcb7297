"""The registered chat model's pyfunc loader: MLflow's transformers chat model, plus `tools` and `tool_calls`.

MLflow's transformers flavor serves `llm/v1/chat` but drops a request's `tools` (its chat signature
has the field; its pipeline never passes it to the chat template). This loader wraps that model: a
request without tools goes to it unchanged; a request with tools is rendered by the tokenizer's
own chat template with the tools, answered greedily by the same model, and a generated call comes
back in the OpenAI shape (`message.tool_calls`, `finish_reason: "tool_calls"`). The MLmodel's
python_function flavor names this module; it is shipped in the model's code/ folder with
tool_call_text.py (standard library and MLflow only), so `mlflow models serve` needs no kftune.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

try:  # shipped side by side in the model's code/ folder
    from tool_call_text import content_without_calls, parse_calls
except ImportError:  # in the kftune source tree
    from kftune.models.tool_call_text import content_without_calls, parse_calls

_MESSAGE_KEYS = ("role", "content", "name", "tool_call_id")


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ToolChatModel:
    import mlflow.transformers

    return ToolChatModel(mlflow.transformers._load_pyfunc(path, model_config))


def _clean(value: Any) -> Any:
    """A request as plain Python: pandas/numpy leftovers of signature enforcement turned back into lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):  # a missing optional field: None, or NaN in a DataFrame's column
        return {k: _clean(v) for k, v in value.items() if v is not None and not (isinstance(v, float) and v != v)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates take it: a call's arguments as an object, not JSON text."""
    out = {k: message[k] for k in _MESSAGE_KEYS if k in message}
    out["content"] = out.get("content") or ""
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"]["arguments"] or "{}")
                    if isinstance(c["function"].get("arguments"), str)
                    else c["function"].get("arguments", {}),
                },
            }
            for c in calls
        ]
    return out


class ToolChatModel:
    """MLflow's chat model for requests without tools; the tokenizer's template and the same model with them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def get_raw_model(self) -> Any:
        return self.inner.pipeline

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import pandas as pd

        requests = data.to_dict(orient="records") if isinstance(data, pd.DataFrame) else [data]
        answers = []
        for request in map(_clean, requests):
            if request.get("tools"):
                answers.append(self._with_tools(request, params or {}))
            else:
                answers += self.inner.predict(request, params)
        return answers

    def _with_tools(self, request: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        import torch

        pipeline = self.inner.pipeline
        tokenizer, model = pipeline.tokenizer, pipeline.model
        config = {**self.inner.model_config, **params}
        prompt = tokenizer.apply_chat_template(
            [_template_message(m) for m in request["messages"]],
            tools=request["tools"],
            add_generation_prompt=True,
            tokenize=False,
        )
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        limit = int(request.get("max_tokens") or config.get("max_new_tokens") or 256)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True)
        calls = parse_calls(text) or []
        message: dict[str, Any] = {"role": "assistant", "content": content_without_calls(text) if calls else text}
        if calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:12]}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
                }
                for c in calls
            ]
        prompt_tokens, completion_tokens = int(inputs["input_ids"].shape[1]), int(new.shape[0])
        return {
            "id": str(uuid.uuid4()),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.inner.flavor_config.get("source_model_name", ""),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if calls else ("length" if completion_tokens >= limit else "stop"),
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
