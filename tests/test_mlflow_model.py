"""The MLflow Model kftune registers, saved locally (no server): a chat model MLflow's loaders read, with a
manifest that catches a changed byte."""

from __future__ import annotations

import json
import shutil

import pytest

from kftune.core.errors import KftuneError
from kftune.registry.mlflow_model import HF_SUBDIR, SHA_TAG, TASK, input_example, save, verify

CARD = "# tiny\n\nA card."


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model"
    example = input_example([{"role": "user", "content": "写一篇探店笔记"}], 6)
    return path, save(tiny_model, path, card=CARD, example=example, facts={"method": "full"})


def test_the_saved_model_is_a_chat_model_with_card_requirements_and_example(saved, tiny_model):
    from mlflow.models import Model

    path, sha = saved
    meta = Model.load(path / "MLmodel")
    assert {"transformers", "python_function"} <= set(meta.flavors)
    assert meta.metadata["task"] == TASK and meta.metadata["method"] == "full"
    assert meta.flavors["transformers"]["inference_task"] == TASK
    requirements = (path / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements) and any(r.startswith("transformers==") for r in requirements)
    assert json.loads((path / "input_example.json").read_text())["messages"][0]["role"] == "user"
    assert (path / HF_SUBDIR / "README.md").read_text(encoding="utf-8") == CARD
    assert (path / "model_card.md").read_text(encoding="utf-8") == CARD
    # the HF folder loads on its own (tokenizer and chat template beside the weights)
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (path / HF_SUBDIR / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert len(sha) == 64 and SHA_TAG == "registered_sha256"


def test_pyfunc_answers_in_the_chat_completion_shape(saved):
    import mlflow.pyfunc

    path, _ = saved
    answer = mlflow.pyfunc.load_model(str(path)).predict(
        {"messages": [{"role": "user", "content": "写一篇探店笔记"}], "max_tokens": 5, "temperature": 0.0}
    )
    (completion,) = answer
    assert completion["object"] == "chat.completion" and completion["usage"]["completion_tokens"] == 5
    assert completion["choices"][0]["message"]["role"] == "assistant"


def test_the_manifest_catches_a_flipped_byte_and_a_swapped_manifest(saved, tmp_path):
    path, sha = saved
    verify(path, sha, "here")
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    weights = copy / HF_SUBDIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(KftuneError, match="model/model.safetensors does not match its MANIFEST.json"):
        verify(copy, sha, "here")
    with pytest.raises(KftuneError, match="does not hash to the version's registered_sha256"):
        verify(path, "0" * 64, "here")


def test_a_version_without_the_sha_tag_or_with_an_unlisted_file_is_refused(saved, tmp_path):
    path, sha = saved
    with pytest.raises(KftuneError, match="has no registered_sha256 tag"):
        verify(path, "", "here")
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "registered_model_meta").write_text("model_name: x\n")  # what MLflow's download adds: allowed
    verify(copy, sha, "here")
    (copy / HF_SUBDIR / "extra.pkl").write_bytes(b"not listed")
    with pytest.raises(KftuneError, match=r"holds 1 file\(s\) its MANIFEST.json does not list \(model/extra.pkl\)"):
        verify(copy, sha, "here")
