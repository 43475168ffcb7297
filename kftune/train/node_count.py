"""How many nodes and GPUs a training may ask for: checked before anything runs, and against the data.

The pipelines check `train_nodes` and `gpus_per_node` up front (pipelines/parameters.py, for `kftune
pipeline run/sweep/submit/compile`); the train step calls `check_nodes_against_data` once the split's row
count is known. Every message is one line that names the flag.
"""

from __future__ import annotations

from kftune.core.errors import KftuneError

# More nodes than this is taken for a typo (--train-nodes 80 for 8) rather than a plan: the TrainJob is
# gang-scheduled, so it would hold that many GPU nodes at once, and its JobSet restarts every node when one
# fails (backoffLimit 0), so a run's restarts grow with its nodes. Multi-node training was rehearsed on 2
# nodes; raise this where a cluster really runs more.
MAX_TRAIN_NODES = 64
# The most GPUs one node has (DGX-2 / HGX-2 class machines have 16; most have 8): more is a typo.
MAX_GPUS_PER_NODE = 16


def node_count_problems(train_nodes: int, gpus_per_node: int) -> list[str]:
    """What is wrong with the two counts, one line each naming its flag; empty when both are fine.

    gpus_per_node 0 is refused rather than read as CPU nodes: the training task and the TrainJob's nodes are
    placed on GPU nodes (the node selector and toleration are compiled in), so 0 would hold a GPU node idle.
    A local run on one node (kfp.local) trains on this machine's own devices whatever it says
    (--train-processes: in how many processes).
    """
    problems = []
    if train_nodes < 1:
        problems.append(f"--train-nodes {train_nodes}: give 1 or more (1 trains on one node, in the task's own pod)")
    elif train_nodes > MAX_TRAIN_NODES:
        problems.append(
            f"--train-nodes {train_nodes}: at most {MAX_TRAIN_NODES} (a gang of that many GPU nodes is held at once "
            "and restarted whole when one fails; raise MAX_TRAIN_NODES in kftune/train/node_count.py if you mean it)"
        )
    if gpus_per_node < 1:
        problems.append(
            f"--gpus-per-node {gpus_per_node}: give 1 or more (training is placed on GPU nodes; "
            "a local run on one node trains on this machine's own devices whatever this says)"
        )
    elif gpus_per_node > MAX_GPUS_PER_NODE:
        problems.append(f"--gpus-per-node {gpus_per_node}: at most {MAX_GPUS_PER_NODE} (no GPU node has more)")
    return problems


def check_node_counts(train_nodes: int, gpus_per_node: int) -> None:
    """Raise one line (every problem, joined by '; ') when a count is out of range; see `node_count_problems`."""
    if problems := node_count_problems(train_nodes, gpus_per_node):
        raise KftuneError("; ".join(problems))


def check_nodes_against_data(train_rows: int, batch_size: int, nodes: int, processes_per_node: int) -> None:
    """Every process of a multi-node training needs at least one full batch of its own rows per epoch.

    With more processes than full batches, the distributed sampler pads the shards by repeating rows, so some
    processes would train on repeats alone. One node trains as it always has: nothing to check.
    `processes_per_node`: the processes each node runs (its GPUs, or --train-processes where set).
    """
    if nodes <= 1:
        return
    processes = nodes * max(processes_per_node, 1)
    batches = train_rows // max(batch_size, 1)
    if processes <= batches:
        return
    fits = batches // max(processes_per_node, 1)
    advice = (
        f"use --train-nodes {fits} or fewer" if fits >= 2 else "train on one node (--train-nodes 1)"
    ) + " or a smaller --per-device-train-batch-size"
    raise KftuneError(
        f"--train-nodes {nodes}: {nodes} nodes x {processes_per_node} processes need {processes} full batches of "
        f"{batch_size} rows (--per-device-train-batch-size), one per process, but the data has {train_rows} train "
        f"rows ({batches} batches); {advice}"
    )
