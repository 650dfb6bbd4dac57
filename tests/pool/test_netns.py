"""Hosts with their own network stacks: one namespace per host, veth links.

All links end on a bridge inside a separate "switch" namespace, so nothing
in the test runner's own namespace changes. Root only; every namespace made
here is deleted again, whatever happens.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import POOL, REPO, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.netns]

SUBNET = "10.213.77"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Three host namespaces on one bridge: ``{address: namespace}``."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = secrets.token_hex(2)
    switch = f"pm{tag}-sw"
    hosts = {f"{SUBNET}.{i}": f"pm{tag}-h{i}" for i in (2, 3, 4)}
    made: list[str] = []
    try:
        ip("netns", "add", switch)
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for address, ns in hosts.items():
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "up0")
            ip("-n", ns, "link", "set", "up0", "netns", switch)
            last = address.rsplit(".", 1)[1]
            ip("-n", switch, "link", "set", "up0", "name", f"p{last}")
            ip("-n", switch, "link", "set", f"p{last}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_broadcast_across_namespaces(
    namespaces: dict[str, str], tmp_path: Path
) -> None:
    def argv(host: str) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            namespaces[host],
            sys.executable,
            "-m",
            "mesh.pool.member",
            "--pool",
            POOL,
            "--host",
            host,
            "--runtime-dir",
            str(tmp_path / f"run-{host}"),
            "--directory-dir",
            str(tmp_path / "directory"),
        ]

    hosts = list(namespaces)
    c = Cluster(tmp_path, hosts, per_host=2, issuer_host=hosts[0], member_argv=argv)
    try:
        for host in hosts:
            for _ in range(2):
                c.spawn(host)
        issuer = hosts[0]
        command = [
            "ip",
            "netns",
            "exec",
            namespaces[issuer],
            sys.executable,
            "-m",
            "mesh",
            "broadcast",
            "--pool",
            POOL,
            "--host",
            issuer,
            "--runtime-dir",
            str(tmp_path / f"run-{issuer}"),
            "--directory-dir",
            str(tmp_path / "directory"),
            "--timeout",
            "5",
            "over-veth",
        ]
        text = ""
        for _ in range(20):
            out = subprocess.run(command, cwd=REPO, capture_output=True, timeout=60)
            text = out.stdout.decode()
            if out.returncode == 0 and text.count(" replied ") == 6:
                break
        assert text.count(" replied ") == 6, text
        for host in hosts:
            assert text.count(f"{host}/") == 2
    finally:
        c.close()
