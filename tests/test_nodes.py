"""The pieces of multi-node training that need no second host: how a node finds its world, which parallelism a
method gets, what a lost peer looks like, and the TrainJob the train step renders (the hosts themselves:
tests/integration/test_multinode.py)."""

from __future__ import annotations

import argparse

import pytest

from kftune.core.errors import KftuneError
from kftune.train import launch
from kftune.train.across_nodes import job_config, job_spec
from kftune.train.config import resolve
from kftune.train.nodes import Place, lost_peer, parallelism
from kftune.train.trainjob import render


def flags(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"nnodes": None, "node_rank": None, "master_addr": None, "master_port": None, **given})


def test_a_node_reads_its_world_from_flags_else_the_trainer_variables():
    pet = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.1", "PET_MASTER_PORT": "23456"}
    assert launch.world_from(flags(), pet) == launch.World(2, 1, "10.0.0.1", 23456)
    assert launch.world_from(flags(node_rank=0, master_port=29999), pet) == launch.World(2, 0, "10.0.0.1", 29999)
    assert launch.world_from(flags(), {}) == launch.World()


@pytest.mark.parametrize(
    ("given", "env", "words"),
    [
        ({"nnodes": 2}, {}, "--master-addr"),
        ({"nnodes": 2, "node_rank": 2, "master_addr": "a"}, {}, "--node-rank 2"),
        ({"nnodes": 0}, {}, "--nnodes 0"),
        ({}, {"PET_NNODES": "two"}, "whole numbers"),
    ],
)
def test_an_incomplete_world_is_one_clear_error(given, env, words):
    with pytest.raises(KftuneError, match=words):
        launch.world_from(flags(**given), env)


def test_several_nodes_never_get_a_random_port():
    one = launch.command(["--config_file", "c.json"], 2)
    assert "--standalone" in one and "--master-port" not in one
    many = launch.command(["--config_file", "c.json"], 1, launch.World(2, 1, "10.0.0.1", launch.DEFAULT_MASTER_PORT))
    assert many[many.index("--master-port") + 1] == "29500" and "--standalone" not in many
    assert many[-5:] == ["-m", "kftune.cli", "train", "--config_file", "c.json"]


@pytest.mark.parametrize(
    ("world", "method", "device", "expected"),
    [
        ("1", "full", "cuda", None),
        ("2", "full", "cuda", "fsdp"),
        ("2", "lora", "cuda", "ddp"),
        ("2", "qlora", "cuda", "ddp"),
        ("2", "full", "cpu", "ddp"),  # accelerate shards on accelerators only
    ],
)
def test_full_fine_tuning_shards_on_gpus_and_adapters_replicate(monkeypatch, world, method, device, expected):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert parallelism(method, device) == expected


def test_a_lost_peer_is_one_line_naming_the_node(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("KFTUNE_NODE_NAME", "gpu-node-7")
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv\nmore")
    error = lost_peer(timeout, 20)
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith("node 1 (gpu-node-7, rank 1 of 2): lost contact") and "ddp_timeout=20s" in str(error)
    assert lost_peer(ValueError("bad learning rate"), 20) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_peer(timeout, 20) is None  # one process has no peer to lose


def test_place_defaults_to_one_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    place = Place.from_env()
    assert (place.rank, place.world_size, place.node_leader) == (0, 1, 0)


def test_the_train_step_renders_torchrun_over_the_job_config():
    cfg = job_config(
        resolve({"base_model": "s3://b/m/" + "a" * 64, "data_path": "d.jsonl", "use_lora": True}, {}), "s3://b/j"
    )
    assert (cfg.output_dir, cfg.publish_to, cfg.overwrite_output_dir) == ("model", "s3://b/j", True)
    argv = ["-m", "kftune.cli", "train", "--config_file", "s3://b/j/config/" + "c" * 64 + "/train_config.json"]
    job = render(job_spec(argv, 2, 8, "kftune-train-abc", {}, "registry/kftune-trainer:1", "team-a"))
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", *argv] and trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["image"] == "registry/kftune-trainer:1" and job["metadata"]["namespace"] == "team-a"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"] if "valueFrom" in e}
    assert secrets == {"kftune-s3", "kftune-mlflow"}


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [("ddp_timeout", 5, "ddp_timeout: must be >= 10"), ("publish_to", "/tmp/out", "publish_to: must be an s3://")],
)
def test_multi_node_settings_are_checked(key, value, words):
    with pytest.raises(KftuneError, match=words):
        resolve({"base_model": "m", "data_path": "d.jsonl", key: value}, {})
