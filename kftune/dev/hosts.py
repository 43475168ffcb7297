"""Two training "hosts" on one machine: the root network namespace and one made with `ip netns add`, joined by veth.

How multi-node training is rehearsed without a cluster (root only). Node 0 runs in the root namespace, node 1
in its own; each has one address on the veth link this module made (10.231.N.1 and .2) and nothing else, so
traffic between them crosses a real link that can be cut. Hostnames resolve to 127.0.0.1 in both namespaces,
so each node names its interface for gloo (GLOO_SOCKET_IFNAME). Services of the local stack listen on
127.0.0.1 in the root namespace: node 1 reaches them through a relay on node 0's link address, which also
counts the S3 writes that cross it (node 1 must make none). The namespace, and with it the link and any
firewall rule made inside it, is removed when the `with` block ends, also when it fails.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kftune.core.errors import KftuneError

SUBNET = "10.231"  # 10.231.N.0/24: one per link; addresses on links this module made, nowhere else
_WRITE = re.compile(rb"(PUT|POST|DELETE) /[^ \r\n]* HTTP/1\.[01]\r\n")
_serial = itertools.count()


def unavailable() -> str | None:
    """Why two hosts cannot be made here (one line), or None when they can."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if not shutil.which("ip") or not shutil.which("iptables"):
        return "iproute2's `ip` and `iptables` are needed to make network namespaces and to cut a link"
    probe = f"kftprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Relay:
    """TCP relay from node 0's link address to a service on 127.0.0.1; counts the S3 writes that cross it."""

    target: tuple[str, int]
    listen_host: str
    port: int = 0
    writes: list[str] = field(default_factory=list)
    server: socket.socket | None = None

    def start(self) -> Relay:
        self.server = socket.create_server((self.listen_host, 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if outbound:  # a request line: the first of a connection, or after the previous one's headers
                    self.writes += [m.group(0).split(b" ")[0].decode() for m in _WRITE.finditer(chunk)]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass(frozen=True)
class Host:
    """One node: its namespace (None: the root one), its address on the link and the link's interface."""

    rank: int
    namespace: str | None
    address: str
    interface: str

    def command(self, argv: list[str]) -> list[str]:
        return argv if self.namespace is None else ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        """Drop every packet on this node's link, silently, as a failed switch would (node 1 only)."""
        if self.namespace is None:
            raise KftuneError("only a node in its own namespace can be cut off (its rules go with the namespace)")
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _ip("iptables", "-A", chain, way, self.interface, "-j", "DROP", namespace=self.namespace)


def _ip(*argv: str, namespace: str | None = None) -> None:
    cmd = list(argv) if namespace is None else ["ip", "netns", "exec", namespace, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise KftuneError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Node 0 (root namespace) and node 1 (a new namespace) on a veth link of their own; removed afterwards."""
    why = unavailable()
    if why:
        raise KftuneError(f"cannot rehearse two hosts here: {why}")
    serial = (os.getpid() * 7 + next(_serial)) % 250 + 1
    namespace, outer, inner = f"kft{os.getpid()}-{serial}", f"kfo{serial}x{os.getpid() % 1000}", f"kfi{serial}"
    node0 = Host(0, None, f"{SUBNET}.{serial}.1", outer)
    node1 = Host(1, namespace, f"{SUBNET}.{serial}.2", inner)
    try:
        _ip("ip", "netns", "add", namespace)
        _ip("ip", "link", "set", "lo", "up", namespace=namespace)
        _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("ip", "link", "set", inner, "netns", namespace)
        _ip("ip", "addr", "add", f"{node0.address}/24", "dev", outer)
        _ip("ip", "link", "set", outer, "up")
        _ip("ip", "addr", "add", f"{node1.address}/24", "dev", inner, namespace=namespace)
        _ip("ip", "link", "set", inner, "up", namespace=namespace)
        yield node0, node1
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", outer], capture_output=True)  # gone with its peer, normally


@contextmanager
def s3_relay(node0: Host) -> Iterator[NodeEnv]:
    """Node 1's way to the local S3 server: a relay on node 0's link address (the endpoint must be on loopback)."""
    from urllib.parse import urlsplit

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    parts = urlsplit(endpoint)
    if parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
        raise KftuneError(
            f"AWS_ENDPOINT_URL={endpoint or '(unset)'}: the two-host rehearsal reaches only an S3 server on this "
            "machine's loopback (`kftune stack up` starts one)"
        )
    relay = Relay(("127.0.0.1", parts.port), node0.address).start()
    try:
        yield NodeEnv(node0, relay)
    finally:
        relay.stop()


@dataclass(frozen=True)
class NodeEnv:
    """What differs in a node's environment: node 1 reaches S3 through the relay."""

    node0: Host
    relay: Relay

    def __call__(self, host: Host) -> dict[str, str]:
        if host.namespace is None:
            return {}
        url = f"http://{self.node0.address}:{self.relay.port}"
        return {"AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url}
