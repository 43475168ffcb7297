"""Training on two hosts, started exactly as the Kubeflow Trainer starts it (`make multinode`).

Two "hosts" are the root network namespace and one made with `ip netns add`, joined by a veth link
(kftune.dev.hosts; root only, removed after each test, also when it fails). Each node runs `torchrun -m
kftune.cli train --config_file <s3 uri>` under the PET_* variables the Trainer's torch plugin sets, with its
own working folder and cache (its own disk), over gloo on the tiny model, with the model, data, checkpoints and
output in the session's real S3 server (node 1 reaches it through a relay on node 0's link, which sees every
request it makes). Restarts are the runtime's JobSet's: any node's failure restarts every node
(kftune.dev.gang). fp32 throughout, so resumed and uninterrupted runs can be compared exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kftune.core.storage import delete_tree, download_dir, list_artifacts
from kftune.dev import hosts
from kftune.dev.gang import Gang
from kftune.train.across_nodes import job_config, upload_config
from kftune.train.config import resolve
from kftune.train.handback import read_published

from .conftest import stage_inputs

WHY_NOT = hosts.unavailable()
pytestmark = [
    pytest.mark.multinode,
    pytest.mark.integration,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"two hosts cannot be made here: {WHY_NOT}"),
]
STEPS, SAVE_EVERY = 8, 2
# runs that lose a node: long enough (about 0.15 s a step here) to be mid-run when a checkpoint has been published
LONG = {"max_steps": 240, "save_steps": 10}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def staged(stack, s3, tiny_model, small_data):
    return stage_inputs(stack, s3, tiny_model, small_data, name="multinode/")


def job(staged, s3, name: str, **changes) -> tuple[list[str], str, str]:
    """Upload a LoRA (or full) job's config; (the node command, its publish prefix, its checkpoint prefix)."""
    root = f"{staged['artifact_root']}/{name}"
    delete_tree(root, s3)
    values = {
        "base_model": staged["base_model"],
        "data_path": staged["data_uri"],
        "output_dir": "model",
        "use_lora": True,
        "lora_r": 8,
        "lora_dropout": 0.1,  # draws from each rank's RNG: a resume must restore every rank's state
        "learning_rate": 2e-2,
        "max_steps": STEPS,
        "save_steps": SAVE_EVERY,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 128,
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "checkpoint_uri": f"{root}/checkpoints",
        **changes,
    }
    if not values["use_lora"]:
        values = {k: v for k, v in values.items() if not k.startswith("lora_")}
    cfg = job_config(resolve(values, {}), f"{root}/job")
    return ["-m", "kftune.cli", "train", "--config_file", upload_config(cfg, f"{root}/job")], f"{root}/job", root


def two_host_gang(node0, node1, argv, workdir: Path, relay, restarts: int = 0) -> Gang:
    return Gang([node0, node1], argv, workdir, max_restarts=restarts, env=relay, echo_node0=False)


@pytest.fixture
def two(stack_env):
    """Node 0, node 1 and node 1's S3 relay; all removed when the test ends."""
    with hosts.two_hosts() as (node0, node1), hosts.s3_relay(node0) as relay:
        yield node0, node1, relay


def log_of(attempt, rank: int) -> str:
    return attempt.logs[rank].read_text(errors="replace")


def published_checkpoints(root: str, s3) -> list[int]:
    return sorted(int(uri.split("checkpoint-")[1].split("/")[0]) for uri in list_artifacts(f"{root}/checkpoints", s3))


def adapter(published, tmp: Path) -> dict:
    local = download_dir(published.uri, tmp / published.sha256[:12])
    return load_file(local / "adapter_model.safetensors")


def checkpoint_published(workdir: Path, attempt: int = 0) -> bool:
    """Node 0 has logged that a checkpoint reached S3 (its upload done, manifest last)."""
    log = workdir / f"attempt-{attempt}" / "node-0.log"
    return log.exists() and "published to" in log.read_text(errors="replace")


def kill_after_checkpoint(rank: int, workdir: Path):
    """A gang watcher: once a checkpoint is in S3, kill node `rank` (once)."""
    done = []

    def watch(gang: Gang, elapsed: float) -> None:
        if not done and checkpoint_published(workdir):
            gang.kill(rank)
            done.append(elapsed)

    return watch, done


def test_lora_trains_on_two_hosts_as_on_one_host_with_two_processes(two, staged, s3, tmp_path):
    node0, node1, relay = two
    argv, prefix, _ = job(staged, s3, "two-hosts")
    gang = two_host_gang(node0, node1, argv, tmp_path / "two", relay)
    attempt = gang.run(TIMEOUT_S)
    assert attempt.failed_node is None, log_of(attempt, 0)[-3000:] + log_of(attempt, 1)[-3000:]
    published = read_published(prefix)
    assert published.metrics["processes"] == 2 and published.metrics["parallelism"] == "ddp"
    # both nodes trained, each on its own share of every batch
    for rank in (0, 1):
        line = next(ln for ln in log_of(attempt, rank).splitlines() if "tokens of its own" in ln)
        assert f"node {rank} (host{rank}/" in line and int(line.split("trained on ")[1].split()[0]) > 0, line
    # node 1 read from S3 (model, data, config) and wrote nothing; only rank 0 published
    assert relay.relay.writes == [], relay.relay.writes
    assert not (tmp_path / "two" / "node-1" / "model").exists()
    assert (tmp_path / "two" / "node-0" / "model" / "adapter_model.safetensors").exists()

    # the same batches on one host with two processes
    argv1, prefix1, _ = job(staged, s3, "one-host")
    one = Gang([hosts.Host(0, None, "127.0.0.1", "lo")], argv1, tmp_path / "one", procs_per_node=2, echo_node0=False)
    assert one.run(TIMEOUT_S).failed_node is None
    reference = read_published(prefix1).metrics
    two_losses = [loss for _, loss in published.metrics["loss_history"]]
    one_losses = [loss for _, loss in reference["loss_history"]]
    assert len(two_losses) == len(one_losses) == STEPS
    # Bound: both runs do the same fp32 arithmetic in the same order (gloo's two-rank allreduce sums the two
    # gradients the same way over a veth link as over loopback), so only the last bits could differ: 4 ulps
    # of a loss near 5 is 2e-6.
    worst = max(abs(a - b) for a, b in zip(two_losses, one_losses, strict=True))
    assert worst <= 2e-6, (two_losses, one_losses)
    print(f"two hosts vs one host x 2 processes: largest loss difference over {STEPS} steps {worst:.3g}")


def test_full_fine_tuning_trains_over_two_hosts(two, staged, s3, tmp_path):
    """Full fine-tuning asks for FSDP; accelerate shards on GPUs only, so on these CPU hosts each keeps a replica."""
    node0, node1, relay = two
    argv, prefix, _ = job(staged, s3, "full", use_lora=False, learning_rate=1e-3)
    attempt = two_host_gang(node0, node1, argv, tmp_path, relay).run(TIMEOUT_S)
    assert attempt.failed_node is None, log_of(attempt, 0)[-3000:] + log_of(attempt, 1)[-3000:]
    metrics = read_published(prefix).metrics
    assert metrics["processes"] == 2 and metrics["parallelism"] == "ddp" and metrics["method"] == "full"
    assert "FSDP shards on GPUs only" in log_of(attempt, 0)
    losses = [loss for _, loss in metrics["loss_history"]]
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert relay.relay.writes == []


def test_node1_lost_and_replaced_resumes_from_s3_to_the_same_adapter(two, staged, s3, tmp_path):
    node0, node1, relay = two
    argv, prefix, _ = job(staged, s3, "uninterrupted", **LONG)
    assert two_host_gang(node0, node1, argv, tmp_path / "a", relay).run(TIMEOUT_S).failed_node is None
    reference = adapter(read_published(prefix), tmp_path)

    argv, prefix, root = job(staged, s3, "node1-lost", **LONG)
    gang = two_host_gang(node0, node1, argv, tmp_path / "b", relay, restarts=1)
    watch, killed = kill_after_checkpoint(1, tmp_path / "b")
    attempt = gang.run(TIMEOUT_S, watch)
    assert killed and len(gang.attempts) == 2 and gang.attempts[0].failed_node == 1
    assert attempt.failed_node is None, log_of(attempt, 0)[-3000:]
    published = read_published(prefix)
    assert published.metrics["resumed_from_step"] >= LONG["save_steps"]
    for rank in (0, 1):  # each node downloaded the checkpoint itself
        assert "resuming from checkpoint" in log_of(attempt, rank)
    resumed = adapter(published, tmp_path)
    print(
        f"node 1 killed {killed[0]:.1f} s into the run; both restarted; resumed from step "
        f"{published.metrics['resumed_from_step']}; {sum(a.seconds for a in gang.attempts):.1f} s in all"
    )
    # fp32, the same batches and every rank's RNG state restored: the resumed run is the uninterrupted one
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert worst == 0.0, worst


def test_node0_lost_fails_the_job_in_seconds_and_a_relaunch_resumes(two, staged, s3, tmp_path):
    node0, node1, relay = two
    argv, prefix, root = job(staged, s3, "node0-lost", **LONG)
    gang = two_host_gang(node0, node1, argv, tmp_path, relay)
    gang.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint_published(tmp_path):
        assert time.monotonic() < deadline and gang.procs[1].poll() is None
        time.sleep(0.2)
    gang.kill(0)
    killed = time.monotonic()
    code = gang.procs[1].wait(timeout=120)
    noticed = time.monotonic() - killed
    gang.stop()
    assert code != 0 and noticed < 30, (code, noticed)
    print(f"node 1 exited {noticed:.1f} s after node 0 was killed")

    attempt = two_host_gang(node0, node1, argv, tmp_path / "again", relay).run(TIMEOUT_S)
    assert attempt.failed_node is None, log_of(attempt, 0)[-3000:]
    assert read_published(prefix).metrics["resumed_from_step"] >= LONG["save_steps"]


def test_a_silently_cut_link_fails_within_ddp_timeout_naming_the_node(two, staged, s3, tmp_path):
    node0, node1, relay = two
    timeout = 20
    argv, _, root = job(staged, s3, "cut", ddp_timeout=timeout, max_steps=400, save_steps=10)
    gang = two_host_gang(node0, node1, argv, tmp_path, relay)
    gang.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint_published(tmp_path):
        assert time.monotonic() < deadline and all(p.poll() is None for p in gang.procs)
        time.sleep(0.2)
    node1.cut()
    cut = time.monotonic()
    codes = [p.wait(timeout=timeout + 90) for p in gang.procs]
    seconds = time.monotonic() - cut
    gang.stop()
    assert all(c != 0 for c in codes), codes
    assert seconds < timeout + 30, seconds
    logs = [path.read_text(errors="replace") for path in gang_logs(tmp_path)]
    for rank, text in enumerate(logs):
        lines = [ln for ln in text.splitlines() if "lost contact with the other training processes" in ln]
        assert lines and f"node {rank} (host{rank}/" in lines[0], text[-3000:]
    print(f"both nodes failed {seconds:.1f} s after the link was cut (ddp_timeout {timeout} s)")


def gang_logs(workdir: Path) -> list[Path]:
    return [workdir / "attempt-0" / f"node-{rank}.log" for rank in (0, 1)]


def test_hosts_are_removed_after_a_failure():
    """The namespace goes with the `with` block, also when the block fails."""
    import subprocess

    with pytest.raises(RuntimeError), hosts.two_hosts() as (_, node1):
        raise RuntimeError("a failing test")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert node1.namespace not in listed


def test_upload_config_names_the_publish_prefix(stack_env, staged, s3, tmp_path):
    argv, prefix, _ = job(staged, s3, "config")
    local = Path(download_dir(argv[-1], tmp_path / "cfg")) / "train_config.json"
    assert json.loads(local.read_text())["publish_to"] == prefix


def test_the_pipeline_trains_on_two_hosts_and_registers(stack_env, inputs, task_env, tmp_path):
    """`kftune pipeline run --train-nodes 2`: the DAG's launcher task runs the nodes on two hosts, and the rest
    of the DAG (evaluate, merge, register) takes its output as it takes one node's."""
    from pipelines.local import run

    arguments = {
        **inputs,
        "method": "lora",
        "max_steps": 6,
        "learning_rate": 1e-2,
        "lora_r": 8,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 256,
        "eval_fraction": 0.25,
        "sample_tokens": 8,
        "eval_samples": 2,
        "registered_model_name": "two-hosts",
        "train_nodes": 2,
    }
    summary = run(arguments, task_env, tmp_path / "root", progress=None)
    assert list(summary.seconds) == ["validate-data", "train", "evaluate", "merge-adapter", "register-model"]
    assert summary.trained.uri.split("/trainjobs/")[1].split("/")[1] == "model"  # what rank 0 handed back
    assert int(summary.registration.version) >= 1 and summary.trained.metrics["global_steps"] == 6
    log = (tmp_path / "root").rglob("tasks.log")
    text = "".join(path.read_text(errors="replace") for path in log)
    assert "train_nodes 2: on two hosts" in text and "rank 1 of 2" not in text  # node 1 logs to its own file
