"""deploy/k8s/blobstore.yaml: its container command really serves, unregistered."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.hit.client import Client

ROOT = Path(__file__).resolve().parents[2]
YAML = (ROOT / "deploy" / "k8s" / "blobstore.yaml").read_text()


class _Static:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def resolve(self, name: str) -> list[_Static]:
        return [self]


def _container_args() -> list[str]:
    block = YAML.split("args:", 1)[1].split("env:", 1)[0]
    return re.findall(r"^\s+- (\S+)$", block, re.MULTILINE)


def test_the_service_names_its_port_like_the_service() -> None:
    # Kubernetes publishes _<port name>._tcp.<service>.<namespace>.svc...
    assert re.search(r"clusterIP: None", YAML)
    assert re.search(r"- name: blobstore\s", YAML)
    assert "--service=blobstore" in _container_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_the_container_command_serves_on_the_wildcard_without_dns() -> None:
    args = _container_args()
    assert args[:2] == ["mesh", "serve"]
    assert "--no-register" in args and "--bind=0.0.0.0" in args
    port = _free_port()
    argv = [a if not a.startswith("--port=") else f"--port={port}" for a in args[1:]]
    # No nameserver and no key exist here: a registering server would fail.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_NAMESERVERS"] = "127.0.0.1:9"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", *argv],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"on tcp://0.0.0.0:{port}" in line, line
        with Client(
            "_blobstore._tcp.x.", resolver=_Static(f"tcp://127.0.0.1:{port}")
        ) as c:
            with c.hit() as hit:
                assert hit.call("put", "a", b"abc").text().startswith("ba7816bf")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
