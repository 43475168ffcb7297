"""The nodes of one training job on the rehearsal hosts, started and restarted the way the Kubeflow Trainer does.

The Trainer's torch runtime starts `torchrun` on every node with PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT (a static rendezvous on node 0), and restarts come from its JobSet:
`backoffLimit: 0` on the node job makes any node's failure fail the job, and `failurePolicy.maxRestarts`
recreates every node. `Gang` does the same with processes: any node exiting non-zero stops the others and,
while restarts are left, starts them all again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kftune.dev.hosts import Host
from kftune.dev.processes import free_ports

STOP_GRACE_S = 10.0


def torchrun() -> list[str]:
    """The torchrun beside this interpreter (what the image's PATH finds), else the module form."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


@dataclass
class Attempt:
    """One start of every node: exit codes (None: stopped by the gang), seconds until it ended, logs."""

    codes: list[int | None]
    seconds: float
    logs: list[Path]
    failed_node: int | None = None  # the first node that failed, which ended the attempt


@dataclass
class Gang:
    """`argv` on every host under torchrun's PET_* variables; `env` adds to each node's environment."""

    hosts: list[Host]
    argv: list[str]
    workdir: Path
    procs_per_node: int = 1
    max_restarts: int = 0
    env: Callable[[Host], dict[str, str]] | None = None  # what differs per node (node 1's way to S3)
    echo_node0: bool = True
    master_port: int = field(default_factory=lambda: free_ports(1)[0])  # node 0's, on this machine
    attempts: list[Attempt] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def node_env(self, host: Host, attempt: int) -> dict[str, str]:
        home = self.workdir / f"node-{host.rank}"  # each node's own disk: cache, temp files, output
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "PET_NNODES": str(len(self.hosts)),
            "PET_NPROC_PER_NODE": str(self.procs_per_node),
            "PET_NODE_RANK": str(host.rank),
            "PET_MASTER_ADDR": self.hosts[0].address,
            "PET_MASTER_PORT": str(self.master_port),
            "GLOO_SOCKET_IFNAME": host.interface,  # hostnames resolve to 127.0.0.1 here
            "KFTUNE_NODE_NAME": f"host{host.rank}/{host.address}",
            "KFTUNE_CACHE": str(home / "cache"),
            "TMPDIR": str(home / "tmp"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "KFTUNE_ATTEMPT": str(attempt),
            **(self.env(host) if self.env else {}),
        }

    def start(self) -> list[Path]:
        attempt = len(self.attempts)
        logs, self.procs = [], []
        for host in self.hosts:
            home = self.workdir / f"node-{host.rank}"
            log = self.workdir / f"attempt-{attempt}" / f"node-{host.rank}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = self.node_env(host, attempt)
            out = subprocess.PIPE if host.rank == 0 and self.echo_node0 else log.open("wb")
            proc = subprocess.Popen(
                host.command([*torchrun(), *self.argv]),
                cwd=home,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # torchrun and its workers: one group to stop
            )
            if out is subprocess.PIPE:
                threading.Thread(target=_echo, args=(proc, log), daemon=True).start()
            self.procs.append(proc)
            logs.append(log)
        return logs

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """What a lost node looks like from outside: its processes gone at once."""
        _signal_tree(self.procs[rank], sig)

    def run(self, timeout_s: float, watch: Callable[[Gang, float], None] | None = None) -> Attempt:
        """Start every node, restart all of them on a failure while restarts are left; the last attempt."""
        while True:
            started, logs = time.monotonic(), self.start()
            failed = None
            while True:
                codes = [p.poll() for p in self.procs]
                failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
                if failed is not None or all(c == 0 for c in codes):
                    break
                if time.monotonic() - started > timeout_s:
                    failed = -1
                    break
                if watch:
                    watch(self, time.monotonic() - started)
                time.sleep(0.2)
            seconds = time.monotonic() - started
            self.stop()
            attempt = Attempt([p.returncode for p in self.procs], seconds, logs, failed)
            self.attempts.append(attempt)
            if failed is None or len(self.attempts) > self.max_restarts:
                return attempt

    def stop(self) -> None:
        """SIGTERM every node still running, SIGKILL what is left after the grace period."""
        for proc in self.procs:
            if proc.poll() is None:
                _signal_tree(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_tree(proc, signal.SIGKILL)
                proc.wait()


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a node's whole process tree, as a pod's end takes every process in it (torchrun starts its
    workers in sessions of their own, so its process group alone is not enough)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for member in tree:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _echo(proc: subprocess.Popen, log: Path) -> None:
    """Node 0's output into the caller's stdout (the step's log), and into its log file."""
    with log.open("wb") as sink:
        for line in proc.stdout:
            sink.write(line)
            sink.flush()
            sys.stdout.write(f"[node 0] {line.decode(errors='replace')}")
            sys.stdout.flush()
