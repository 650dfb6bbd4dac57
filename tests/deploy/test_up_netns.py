"""`mesh up --netns`: each host in its own network namespace, for real."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.netns]

MANIFEST = """
zone = "mesh.internal."
state_dir = "state"
runtime_dir = "run"
[responder]
listen = "127.0.0.1:{port}"
[[hosts]]
name = "ns-a"
  [[hosts.services]]
  name = "blobstore"
  handler = "mesh.examples.blobstore:BlobStore"
  pool = "blobstore"
[[hosts]]
name = "ns-b"
  [[hosts.services]]
  name = "blobstore"
  handler = "mesh.examples.blobstore:BlobStore"
  pool = "blobstore"
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_mesh_up_netns_runs_the_workload_across_namespaces(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = tmp_path / "mesh.toml"
    manifest.write_text(MANIFEST.format(port=port))
    before = _namespaces()
    mesh = [sys.executable, "-m", "mesh"]
    run = subprocess.run(
        [*mesh, "up", "--netns", str(manifest), "--", *mesh, "workload", "--hits", "6"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The hosts have their own network stacks: the servers' addresses are in
    # the namespaces' subnet, not loopback.
    rows = [
        line.split() for line in run.stdout.splitlines() if "mesh.internal " in line
    ]
    assert {r[0].split(".")[0] for r in rows} == {"ns-a", "ns-b"}
    assert all(r[1].startswith("10.211.") for r in rows), rows
    assert "broadcast: 2 members on 2 hosts: 2 replied" in run.stdout
    assert "OK: every answer of" in run.stdout
    # Nothing of the namespaces, veths or bridge is left behind.
    assert _namespaces() == before
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
    assert "smbr" not in links.stdout and "smv" not in links.stdout
