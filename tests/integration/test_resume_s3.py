"""Resume with checkpoints in S3 (the real SeaweedFS stack): kill -9, restart through the CLI, same parameters."""

from __future__ import annotations

import json
import random
import uuid

import pytest
import torch

from kftune.core.storage import MANIFEST, connect_s3, list_artifacts, split_artifact_uri
from kftune.train.checkpoints import Store
from kftune.train.config import parse_args

from ..test_resume import one_thread, references, soak, write_checkpoint  # noqa: F401  (fixtures used below)

pytestmark = pytest.mark.integration


def s3_store(stack) -> Store:
    s3 = connect_s3(stack.s3_endpoint, access_key=stack.access_key, secret_key=stack.secret_key)
    return Store(f"s3://{stack.bucket}/checkpoints-{uuid.uuid4().hex[:8]}/run", s3)


@pytest.mark.slow
def test_killed_training_resumes_from_s3_through_the_cli(stack_env, tiny_model, small_data, references, tmp_path):
    rng = random.Random(8000)
    out, store_uri = tmp_path / "out", f"s3://{stack_env.bucket}/resume-{uuid.uuid4().hex[:8]}"
    argv = soak.train_argv("lora", tiny_model, small_data, out, store_uri)

    published = soak.kill_during_training(argv, rng.randint(1, soak.LAST_KILL), rng.random())
    store = Store.for_run(parse_args(argv))
    newest = store.listed()[0][0]
    assert newest >= published >= 1 and not out.exists()

    soak.train_to_end(argv)  # the same command again, as a KFP retry would run it

    assert json.loads((out / "train_metrics.json").read_text())["resumed_from_step"] == newest
    assert soak.differing(references("lora", "auto"), soak.final_tensors(out)) == []
    assert list_artifacts(store.root, store.s3) == [], "a finished run leaves no checkpoints in S3"


def test_s3_store_skips_an_unfinished_upload_and_an_altered_file(stack, tmp_path):
    store = s3_store(stack)
    for step in (1, 2, 3):
        store.publish(write_checkpoint(tmp_path / "saved" / f"checkpoint-{step}", step))
    locations = dict(store.listed())
    assert sorted(locations) == [1, 2, 3]

    client = store.s3.client
    bucket, base3, _ = split_artifact_uri(locations[3])
    client.delete_object(Bucket=bucket, Key=f"{base3}/{MANIFEST}")  # an upload cut before its manifest
    _, base2, _ = split_artifact_uri(locations[2])
    client.put_object(Bucket=bucket, Key=f"{base2}/trainer_state.json", Body=b'{"global_step": 99}')  # altered

    assert [s for s, _ in store.listed()] == [2, 1]
    local = store.latest(tmp_path / "downloads")
    assert local is not None and json.loads((local / "trainer_state.json").read_text()) == {"global_step": 1}
    assert torch.load(local / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"] == pytest.approx(0.1)

    store.prune(keep=1)
    assert [s for s, _ in store.listed()] == [2]
    store.clear()
    assert client.list_objects_v2(Bucket=bucket, Prefix=store.root.split("/", 3)[3] + "/").get("KeyCount") == 0
