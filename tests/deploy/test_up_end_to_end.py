"""The whole path: `mesh up`, the workload, `mesh status`, a crash, a clean stop.

Real processes on loopback: the responder on a free port, two hosts
(127.0.0.2 and 127.0.0.3) with two blobstore servers each, all in one pool.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.query
import dns.rdatatype
import dns.zone
import pytest

from mesh.discovery.resolve import Resolver
from mesh.errors import DiscoveryError
from mesh.responder.testing import DnsProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

ZONE = "mesh.internal."
SRV = f"_blobstore._tcp.{ZONE}"

MANIFEST = """
zone = "{zone}"
state_dir = "state"
runtime_dir = "run"

[responder]
listen = "127.0.0.1:{port}"
key_file = "tsig.key"

[[hosts]]
name = "host-a"
address = "127.0.0.2"

  [[hosts.services]]
  name = "blobstore"
  handler = "mesh.examples.blobstore:BlobStore"
  replicas = 2
  weight = 3
  pool = "blobstore"

[[hosts]]
name = "host-b"
address = "127.0.0.3"

  [[hosts.services]]
  name = "blobstore"
  handler = "mesh.examples.blobstore:BlobStore"
  replicas = 2
  weight = 1
  pool = "blobstore"
"""


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the responder needs both)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def _wait_for(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _mesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh", *args]


def _host_b_ports(address: str) -> set[int]:
    """The ports DNS serves for host-b's blobstore servers (empty when none)."""
    try:
        targets = Resolver([address], timeout=1.0).resolve(SRV)
    except DiscoveryError:
        return set()
    return {t.port for t in targets if t.host == "127.0.0.3"}


def _pid_alive_as_mesh(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"mesh" in cmdline and state != "Z"


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2.0)
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def mesh_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    port = _free_port()
    manifest = tmp_path / "mesh.toml"
    manifest.write_text(MANIFEST.format(zone=ZONE, port=port))
    with (
        open(tmp_path / "up.out", "wb") as out,
        open(tmp_path / "up.err", "wb") as err,
    ):
        proc = subprocess.Popen(
            _mesh("up", str(manifest), "--ready-timeout", "120"),
            stdout=out,
            stderr=err,
            env=_env(tmp_path),
        )
    try:
        yield proc, tmp_path, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # Whatever is left of the mesh, should the test have failed midway.
        for pid in _started_pids(tmp_path):
            if _pid_alive_as_mesh(pid):
                os.kill(pid, signal.SIGKILL)


def _started_pids(tmp_path: Path) -> list[int]:
    text = (tmp_path / "up.err").read_text(errors="replace")
    return [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", text)]


def test_mesh_up_workload_crash_restart_and_clean_stop(
    mesh_up: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    proc, tmp, port = mesh_up
    address = f"127.0.0.1:{port}"
    out_file, err_file = tmp / "up.out", tmp / "up.err"

    def up_output() -> str:
        return out_file.read_text(errors="replace") + err_file.read_text(
            errors="replace"
        )

    _wait_for(
        lambda: "mesh is up" in out_file.read_text() or proc.poll() is not None,
        "mesh up",
        timeout=150,
    )
    assert proc.poll() is None, up_output()
    assert "waiting for DNS: 4/4 SRV records served" in err_file.read_text()

    client_env = dict(
        _env(tmp),
        MESH_NAMESERVERS=address,
        MESH_ZONE=ZONE,
        MESH_KEY_FILE=str(tmp / "tsig.key"),
        MESH_STATE_DIR=str(tmp / "state"),
        MESH_RUNTIME_DIR=str(tmp / "run"),
        MESH_LOG_LEVEL="WARNING",
    )
    # The banner's export lines, as a user would paste them: with them the
    # client has the mesh's Curve keys.
    exports = dict(re.findall(r"export (MESH_\w+)=(\S+)", out_file.read_text()))
    assert {"MESH_CURVE_SECRET_KEY", "MESH_CURVE_ALLOW_DIR"} <= set(exports)
    client_env.update(exports)

    # -- the workload: every check passes, every server and member shows ----
    workload = subprocess.run(
        _mesh("workload", "--hits", "16", "--concurrency", "4"),
        capture_output=True,
        text=True,
        env=client_env,
        timeout=240,
    )
    summary = workload.stdout
    assert workload.returncode == 0, summary + workload.stderr
    assert "Hits done: 16/16, 0 failed" in summary
    assert "OK: every answer of" in summary
    rows = [line.split() for line in summary.splitlines() if ".mesh.internal " in line]
    assert len(rows) == 4, summary
    assert sorted(r[3] for r in rows) == ["1", "1", "3", "3"]  # the SRV weights
    assert sum(int(r[5]) for r in rows) == 16  # every Hit is counted once
    assert "broadcast: 4 members on 2 hosts: 4 replied" in summary
    assert re.search(r"call latency: p50 [\d.]+ ms, p90 [\d.]+ ms, p99", summary)

    # -- the README's client example, exactly as printed ---------------------
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert example is not None
    ran = subprocess.run(
        [sys.executable, "-c", example[1]],
        capture_output=True,
        text=True,
        env=client_env,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "hello.txt" in ran.stdout

    # -- mesh status, against the running mesh ------------------------------
    status = subprocess.run(
        _mesh("status", "--json"),
        capture_output=True,
        text=True,
        env=client_env,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    doc = json.loads(status.stdout)
    services = doc["services"]
    assert len(services) == 4
    assert all(s["service"] == SRV and 0 < s["lease"] <= 30 for s in services)
    hosts = doc["pools"]["blobstore"]
    assert sorted(h["address"] for h in hosts) == ["127.0.0.2", "127.0.0.3"]
    for host in hosts:
        assert host["answer"]["record"]["epoch"] >= 1
        assert len(host["answer"]["members"]) == 2

    # -- SIGKILL one server: restarted (logged) and registered again --------
    host_b = next(h for h in hosts if h["address"] == "127.0.0.3")
    victim = next(
        m["pid"]
        for m in host_b["answer"]["members"]
        if m["id"] != host_b["answer"]["record"]["member_id"]
    )
    before = _host_b_ports(address)
    assert len(before) == 2
    os.kill(victim, signal.SIGKILL)
    _wait_for(
        lambda: re.search(r"host-b/blobstore-\d exited with status -9", up_output()),
        "the restart to be logged",
    )
    _wait_for(lambda: _host_b_ports(address) - before, "a new host-b port in DNS", 90)
    assert "restarting in" in up_output()
    assert len(_started_pids(tmp)) == 6  # responder, 4 servers, one restart

    # -- a clean stop leaves nothing behind ---------------------------------
    served_ports = {(s["addresses"][0], s["port"]) for s in services}
    served_ports |= {(h["address"], h["port"]) for h in hosts}
    served_ports |= {("127.0.0.3", p) for p in _host_b_ports(address)}
    pids = _started_pids(tmp)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, up_output()

    assert [pid for pid in pids if _pid_alive_as_mesh(pid)] == []
    assert [hp for hp in served_ports if _listening(*hp)] == []
    assert not _listening("127.0.0.1", port)
    run_dir = tmp / "run"
    assert not run_dir.exists() or list(run_dir.rglob("*.lock")) == []
    journal = json.loads((tmp / "state" / "journal.json").read_text())
    assert journal["records"] == [], journal

    # A responder restarted on the same state dir serves no record of the mesh.
    with DnsProcess(tmp) as dns_proc:
        transfer = dns.query.xfr(
            "127.0.0.1",
            ZONE,
            port=dns_proc.port,
            timeout=10,
            lifetime=10,
            relativize=False,
        )
        zone = dns.zone.from_xfr(transfer, relativize=False)
    kinds = {rds.rdtype for _, rds in zone.iterate_rdatasets()}
    assert dns.rdatatype.SRV not in kinds
    assert [name.to_text() for name, _ in zone.iterate_rdatasets(dns.rdatatype.A)] in (
        [],
        [f"ns.{ZONE}"],
    )
