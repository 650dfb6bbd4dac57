"""Hosts as Linux network namespaces, for `mesh up --netns` and tests.

Each host is a namespace with one veth link to a bridge in the caller's
namespace, so hosts reach each other and the caller (where the responder
runs) over a real network stack instead of sharing loopback. The subnet is a
private /24 that exists only inside the namespaces and the bridge made here;
nothing is routed anywhere else. Needs root.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from mesh.errors import ConfigError

__all__ = ["NetnsHost", "NetnsLayout", "available", "hosts"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NetnsHost:
    name: str
    namespace: str
    address: str


@dataclasses.dataclass(frozen=True)
class NetnsLayout:
    """The bridge address (reachable from every host) and each host."""

    gateway: str
    hosts: dict[str, NetnsHost]

    def __getitem__(self, name: str) -> NetnsHost:
        return self.hosts[name]


def available() -> bool:
    """True when this process may create namespaces (root, with `ip`)."""
    if os.geteuid() != 0:
        return False
    try:
        subprocess.run(
            ["ip", "netns", "list"], check=True, capture_output=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise ConfigError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")


@contextmanager
def hosts(names: Sequence[str], tag: str | None = None) -> Iterator[NetnsLayout]:
    """Create one namespace per host name, joined by a bridge; remove all on exit.

    ``tag`` keeps concurrent users apart (interface names must stay under 16
    characters, so it is short); it defaults to a number derived from the pid.
    """
    if not available():
        raise ConfigError("network namespaces need root and the 'ip' tool (iproute2)")
    if len(names) > 200:
        raise ConfigError(f"{len(names)} hosts do not fit one /24")
    n = int(tag) if tag is not None else os.getpid() % 200 + 20
    bridge = f"smbr{n}"
    subnet = f"10.211.{n}"
    gateway = f"{subnet}.1"
    layout = NetnsLayout(gateway=gateway, hosts={})
    made_ns: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names, 2):
            ns = f"srvmesh-{n}-{i}"
            outer, inner = f"smv{n}h{i}", f"smv{n}p{i}"
            _ip("netns", "add", ns)
            made_ns.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{subnet}.{i}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            layout.hosts[name] = NetnsHost(name, ns, f"{subnet}.{i}")
        log.info(
            "made %d host namespaces on bridge %s (%s/24)", len(names), bridge, gateway
        )
        yield layout
    finally:
        for ns in made_ns:
            # Deleting the namespace also deletes the veth pair inside it.
            _ip("netns", "delete", ns, check=False)
        _ip("link", "delete", bridge, check=False)
