"""The local stack's processes: free ports on 127.0.0.1, servers started in their own session with a
pid file, and finding them again (a pid file names a process only while its start time matches)."""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import psutil

from kftune.core.errors import KftuneError

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now, picked by the OS."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (SO_REUSEADDR: lingering closed sockets don't count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def executable(name: str, package: str) -> str:
    """`name` from this Python's environment, else PATH."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise KftuneError(
            f"`{name}` is neither next to {sys.executable} nor on PATH; install the {package} package (`make setup`)"
        )
    return found


def start(state: Path, name: str, command: list[str], env: dict[str, str]) -> psutil.Process:
    """Start `command` in its own session (it outlives the CLI), logging to <name>.log."""
    with open(state / f"{name}.log", "ab") as log, warnings.catch_warnings():
        log.write(f"--- kftune stack up {datetime.datetime.now().isoformat(timespec='seconds')} ---\n".encode())
        log.flush()
        warnings.simplefilter("ignore", ResourceWarning)  # the server is meant to outlive its Popen handle
        pid = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=state,
            start_new_session=True,
        ).pid
    proc = psutil.Process(pid)
    (state / f"{name}.pid").write_text(json.dumps({"pid": pid, "create_time": proc.create_time()}))
    return proc


def recorded_process(state: Path, name: str) -> psutil.Process | None:
    """The process <name>.pid names if it still runs and is the same one (pids get reused)."""
    try:
        record = json.loads((state / f"{name}.pid").read_text())
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) < 0.01 and alive(proc):
            return proc
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def with_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
