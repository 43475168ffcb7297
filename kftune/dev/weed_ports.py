"""Ports of `weed mini`'s inner servers: each gets a free one, so several stacks run side by side, and the
sockets weed leaves behind are removed when its stack stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kftune.core.errors import KftuneError
from kftune.dev.processes import HOST, free_ports, port_in_use

# weed mini's inner servers; each gets a free port so several stacks can run side by side.
WEED_PORTS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
)
GRPC_OFFSET = 10000  # weed's worker dials admin.port + 10000 whatever -admin.port.grpc says


def weed_ports(saved: dict[str, int] | None, taken: set[int]) -> dict[str, int]:
    """The last run's inner ports when still free (the master names its metadata folder after
    its port), else fresh ones."""
    if saved and usable(saved, taken):
        return saved
    for _ in range(100):
        ports = dict(zip(WEED_PORTS, free_ports(len(WEED_PORTS))))
        if usable(ports, taken):
            return ports
    raise KftuneError(f"found no free ports on {HOST} for SeaweedFS's inner servers; free some ports and retry")


def usable(ports: dict[str, int], taken: set[int]) -> bool:
    every = [*ports.values(), ports["admin.port"] + GRPC_OFFSET]
    return (
        max(every) <= 65535
        and len(set(every)) == len(every)
        and not taken & set(every)
        and not any(port_in_use(p) for p in every)
    )


def remove_weed_sockets(saved: dict[str, Any]) -> None:
    """weed leaves /tmp/seaweedfs-<server>-<port>.sock behind when it stops; remove this stack's."""
    weed = saved["weed_ports"]
    ports = {str(port) for port in (saved["s3_port"], *weed.values(), weed["admin.port"] + GRPC_OFFSET)}
    for sock in Path("/tmp").glob("seaweedfs-*.sock"):
        if sock.stem.rsplit("-", 1)[-1] in ports and sock.is_socket():
            sock.unlink(missing_ok=True)
