"""`train_nodes` 2 where two hosts cannot be made: one line saying why, then the same job on one node.

Not being root cannot be produced inside this root sandbox without a second user, so the test stands in
`kftune.dev.hosts.unavailable` with the reason a non-root user gets; everything after it is real: the job
config in S3, torchrun on this host, the output handed back through published.json.
"""

from __future__ import annotations

from kftune.core.storage import delete_tree
from kftune.dev import hosts
from kftune.train.across_nodes import train_across_nodes
from kftune.train.config import resolve

from .conftest import stage_inputs


def test_two_nodes_without_namespaces_train_on_one_node_and_say_so(
    stack, stack_env, s3, tiny_model, small_data, monkeypatch, capfd
):
    staged = stage_inputs(stack, s3, tiny_model, small_data, name="fallback/")
    root = staged["artifact_root"]
    delete_tree(root, s3)
    monkeypatch.setattr(hosts, "unavailable", lambda: "making network namespaces needs root")
    cfg = resolve(
        {
            "base_model": staged["base_model"],
            "data_path": staged["data_uri"],
            "use_lora": True,
            "lora_r": 8,
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 128,
            "precision": "fp32",
            "checkpoint_uri": f"{root}/checkpoints",
        },
        {},
    )
    published = train_across_nodes(cfg, 2, 1, root, "kftune-fallback-test", {}, "")
    said = [line for line in capfd.readouterr().out.splitlines() if "train_nodes 2:" in line]
    assert said == [
        "[kftune] train_nodes 2: making network namespaces needs root, so this local run trains on one node"
    ]
    assert published.metrics["processes"] == 1 and published.metrics["global_steps"] == 4
    assert published.uri.startswith(f"{root}/trainjobs/kftune-fallback-test/model/")
