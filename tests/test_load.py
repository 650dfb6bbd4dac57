"""Load with faults: 500 concurrent Hits and 100 broadcasts over Curve while
one server is SIGKILLed and restarted again and again; then the responder is
SIGKILLed and must come back with every acknowledged record.

The numbers go to the test output (``-s`` or the captured stdout of a
failure) and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dns.query
import dns.rdatatype
import dns.zone
import pytest

from mesh.config import Settings
from mesh.curve import Curve, MeshKeys, ensure_mesh_keys
from mesh.hit.aio import AsyncClient
from mesh.keyfile import load_key
from mesh.pool.member import PoolMember
from mesh.pool.tracker import Outcome
from mesh.responder.testing import DnsProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ZONE = "mesh.internal."
SRV = f"_load._tcp.{ZONE}"
POOL = "load"
HITS = 500
BROADCASTS = 100
LEASE = 10.0


@dataclasses.dataclass
class Server:
    host: str
    proc: subprocess.Popen[str]
    endpoint: str


class Mesh:
    """A responder and `mesh serve` processes on loopback hosts, over Curve."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dns = DnsProcess(tmp).start()
        self.keys: MeshKeys = ensure_mesh_keys(tmp / "curve")
        self.servers: list[Server] = []

    def env(self, host: str) -> dict[str, str]:
        return dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            MESH_NAMESERVERS=self.dns.address,
            MESH_ZONE=ZONE,
            MESH_KEY_FILE=str(self.dns.key_file),
            MESH_RUNTIME_DIR=str(self.tmp / f"run-{host}"),
            MESH_LEASE=str(LEASE),
            MESH_LOG_LEVEL="WARNING",
            **self.keys.env(),
        )

    def serve(self, host: str) -> Server:
        argv = [sys.executable, "-m", "mesh", "serve"]
        argv += ["mesh.examples.blobstore:BlobStore", "--service", "load"]
        argv += ["--bind", host, "--host-name", f"h{host.rsplit('.', 1)[1]}"]
        argv += ["--pool", POOL]
        log = open(self.tmp / f"serve-{host}-{len(self.servers)}.log", "w")
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env(host)
        )
        log.close()
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert " on tcp://" in line, f"mesh serve did not start: {line!r}"
        server = Server(host, proc, line.rsplit(" on ", 1)[1].strip())
        self.servers.append(server)
        return server

    def settings(self, host: str) -> Settings:
        return Settings(
            zone=ZONE,
            nameservers=[self.dns.address],
            key_file=self.dns.key_file,
            runtime_dir=self.tmp / f"run-{host}",
            curve_secret_key=self.keys.directory / "server.key_secret",
            curve_allow_dir=self.keys.allow_dir,
        )

    def zone_records(self) -> set[tuple[str, str, str]]:
        """Every record but the SOA, by a signed AXFR."""
        host, port = self.dns.address.rsplit(":", 1)
        key = load_key(self.dns.key_file)
        zone = dns.zone.from_xfr(
            dns.query.xfr(host, ZONE, port=int(port), keyring=key, lifetime=10)
        )
        return {
            (str(name), dns.rdatatype.to_text(rdataset.rdtype), rdata.to_text())
            for name, rdataset in zone.iterate_rdatasets()
            if rdataset.rdtype != dns.rdatatype.SOA
            for rdata in rdataset
        }

    def close(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.kill()
            server.proc.wait(10)
            if server.proc.stdout is not None:
                server.proc.stdout.close()
        self.dns.kill()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


@dataclasses.dataclass
class HitRecord:
    endpoint: str | None = None
    calls: int = 0
    error: BaseException | None = None


async def one_hit(
    client: AsyncClient, i: int, stop: asyncio.Event, record: HitRecord
) -> None:
    rng = random.Random(i)
    blob = rng.randbytes(rng.randrange(1024, 16384))
    digest = hashlib.sha256(blob).hexdigest()
    try:
        async with client.hit({"hit": i}) as hit:
            record.endpoint = hit.endpoint
            assert (await hit.call("put", "blob", blob)).text() == digest
            record.calls += 1
            # Held open for the whole fault phase: many Hits see a kill.
            while not stop.is_set():
                assert (await hit.call("sha256", "blob")).text() == digest
                record.calls += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5))
    except Exception as exc:
        record.error = exc


def test_hits_and_broadcasts_survive_repeated_kills(mesh: Mesh) -> None:
    hosts = ("127.0.0.2", "127.0.0.3")
    steady = [mesh.serve(h) for h in hosts for _ in range(2)]
    victim = [mesh.serve(hosts[1])]
    victim_endpoints = {victim[0].endpoint}
    victim_pids = {victim[0].proc.pid}
    settings = mesh.settings(hosts[0])
    curve = Curve.from_settings(settings)
    issuer = PoolMember(POOL, settings, lambda b: b, hosts[0], eligible=False)
    issuer.start()
    assert issuer.wait_for_master(20.0)

    # Every member known to every master before the faults begin.
    deadline = time.monotonic() + 60
    while True:
        result = issuer.broadcast(b"stats", timeout=5.0, include_self=False)
        if result.complete and result.counts[Outcome.REPLIED] == 5:
            break
        assert time.monotonic() < deadline, f"pool never converged: {result}"
        time.sleep(0.3)

    faults = 0
    stop_faults = threading.Event()

    def kill_loop() -> None:
        nonlocal faults
        while not stop_faults.wait(1.5):
            victim[0].proc.send_signal(signal.SIGKILL)
            victim[0].proc.wait(10)
            faults += 1
            victim[0] = mesh.serve(hosts[1])
            victim_endpoints.add(victim[0].endpoint)
            victim_pids.add(victim[0].proc.pid)

    steady_pids = {s.proc.pid for s in steady}
    broadcasts: list[tuple[float, float, Counter[str], bool]] = []

    def broadcast_loop() -> None:
        # Paced, so that the broadcasts and the held Hits span many kills.
        for _ in range(BROADCASTS):
            time.sleep(0.2)
            timeout = 5.0
            started = time.monotonic()
            result = issuer.broadcast(b"stats", timeout=timeout, include_self=False)
            took = time.monotonic() - started
            outcomes = Counter(
                m.outcome.value for m in result.members if m.member.pid in steady_pids
            )
            steady_seen = {m.member.pid for m in result.members} >= steady_pids
            broadcasts.append((took, timeout, outcomes, steady_seen))

    async def hits() -> list[HitRecord]:
        records = [HitRecord() for _ in range(HITS)]
        stop = asyncio.Event()
        async with AsyncClient(
            SRV,
            [mesh.dns.address],
            curve=curve,
            open_timeout=2.0,
            call_timeout=30.0,
            open_attempts=5,
        ) as client:
            tasks = [
                asyncio.create_task(one_hit(client, i, stop, records[i]))
                for i in range(HITS)
            ]
            # Hold every Hit open for the fault phase, then end them all.
            broadcaster = asyncio.create_task(asyncio.to_thread(broadcast_loop))
            await broadcaster
            stop.set()
            # Every wait of a Hit is bounded, so this one is as well.
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return records

    killer = threading.Thread(target=kill_loop, daemon=True)
    killer.start()
    try:
        records = asyncio.run(hits())
    finally:
        stop_faults.set()
        killer.join(30)
        issuer.close()

    held = sum(1 for r in records if r.endpoint is not None)
    on_victim = [r for r in records if r.endpoint in victim_endpoints]
    failed_live = [
        r for r in records if r.error is not None and r.endpoint not in victim_endpoints
    ]
    calls = sum(r.calls for r in records)
    assert not failed_live, [repr(r.error) for r in failed_live[:5]]
    assert held == HITS
    assert faults >= 3, "the fault loop did not run"
    # No broadcast hangs: each ended by its deadline (plus the caller's slack
    # for a loaded machine), and each named every steady member.
    assert len(broadcasts) == BROADCASTS
    for took, timeout, _, steady_seen in broadcasts:
        assert took < timeout + 2.0
        assert steady_seen
    steady_outcomes = sum((c for _, _, c, _ in broadcasts), Counter())
    assert steady_outcomes == {"replied": 4 * BROADCASTS}

    # Every acknowledged change survives a responder SIGKILL: once the dead
    # victims' leases ran out, the zone after a restart is the zone before.
    time.sleep(LEASE + 1.5)
    before = mesh.zone_records()
    port = mesh.dns.port
    mesh.dns.kill()
    mesh.dns = DnsProcess(mesh.tmp, port).start()
    after = mesh.zone_records()
    lost = before - after
    assert not lost, f"records lost over a responder restart: {lost}"
    srv_before = sum(1 for r in before if r[1] == "SRV")

    print(
        f"\nload: {HITS} Hits held at once ({calls} calls, {len(on_victim)} on the "
        f"killed server), {BROADCASTS} broadcasts (steady members: "
        f"{dict(steady_outcomes)}), {faults} SIGKILLs of a member, "
        f"{srv_before} SRV records across a responder SIGKILL; "
        f"failed Hits on live servers: 0, records lost: {len(lost)}"
    )
