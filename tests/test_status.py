"""`mesh status`: leases from the journal, pools from their masters."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.config import Settings
from mesh.discovery.register import Registrar
from mesh.examples.blobstore import BlobStore
from mesh.hit.server import HitServer
from mesh.pool.member import PoolMember
from mesh.status import Status, collect, format_status, journal_leases


def test_journal_leases_reads_srv_expiry(tmp_path: Path) -> None:
    (tmp_path / "journal.json").write_text(
        json.dumps(
            {
                "version": 1,
                "zone": "mesh.internal.",
                "serial": 3,
                "records": [
                    {
                        "name": "_Blob._tcp.mesh.internal.",
                        "ttl": 5,
                        "type": "SRV",
                        "rdata": "0 3 4000 Host-A.mesh.internal.",
                        "expires_at": 1030.0,
                    },
                    {
                        "name": "host-a.mesh.internal.",
                        "ttl": 5,
                        "type": "A",
                        "rdata": "127.0.0.2",
                        "expires_at": 1030.0,
                    },
                    {"name": "broken", "type": "SRV", "rdata": "x"},
                ],
            }
        )
    )
    leases = journal_leases(tmp_path, wall_now=1000.0)
    assert leases == {
        ("_blob._tcp.mesh.internal.", 0, 3, 4000, "host-a.mesh.internal."): 30.0
    }
    assert journal_leases(tmp_path / "none") == {}


def _settings(responder: Any, tmp_path: Path, host: str) -> Settings:
    return Settings(
        zone=responder.zone,
        nameservers=[responder.address],
        key_file=responder.key_file,
        state_dir=responder.state_dir,
        runtime_dir=tmp_path / host,
        lease=30.0,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.4", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_status_shows_services_with_leases_and_pools_with_members(
    responder: Any, tmp_path: Path
) -> None:
    settings = _settings(responder, tmp_path, "host-a")
    registrar = Registrar([responder.address], responder.zone, responder.key)
    server = HitServer(
        BlobStore,
        "127.0.0.2",
        registrar=registrar,
        srv_name=f"_blobstore._tcp.{responder.zone}",
        target=f"host-a.{responder.zone}",
        weight=3,
    ).start()
    # A master record nobody answers on: what a SIGKILLed master leaves.
    stale = registrar.register(
        f"_master._tcp.blobstore.{responder.zone}",
        f"h-127-0-0-4.blobstore.{responder.zone}",
        _closed_port(),
        ["127.0.0.4"],
    )
    members = [
        PoolMember("blobstore", settings, lambda p: p, "127.0.0.2") for _ in range(2)
    ]
    try:
        for member in members:
            member.start()
        deadline = time.monotonic() + 60
        while True:
            status = collect(settings, timeout=1.0)
            hosts = status.pools.get("blobstore", [])
            live = [h for h in hosts if h.answer is not None]
            if live and len(live[0].answer["members"]) == 2:  # type: ignore[index]
                master_ids = {m.info.id for m in members if m.is_master}
                break
            assert time.monotonic() < deadline, f"pool never showed up: {status}"
            time.sleep(0.2)
    finally:
        for member in members:
            member.close()
        stale.close()
        server.close()

    (service,) = status.services
    assert service["service"] == f"_blobstore._tcp.{responder.zone}"
    assert (service["port"], service["weight"]) == (server.port, 3)
    assert service["addresses"] == ["127.0.0.2"]
    assert 0 < service["lease"] <= 30
    by_address = {h.address: h for h in status.pools["blobstore"]}
    assert set(by_address) == {"127.0.0.2", "127.0.0.4"}
    assert by_address["127.0.0.4"].answer is None
    answer = by_address["127.0.0.2"].answer
    assert answer is not None
    assert {answer["record"]["member_id"]} == master_ids
    assert answer["record"]["epoch"] >= 1
    assert {m["id"] for m in answer["members"]} == {m.info.id for m in members}

    out = io.StringIO()
    format_status(status, out)
    text = out.getvalue()
    assert f"127.0.0.2  {server.port}" in text
    assert "host 127.0.0.4: master at" in text and "did not answer" in text
    assert f"epoch {answer['record']['epoch']}, 2 member(s)" in text


def test_status_of_an_empty_zone(responder: Any, tmp_path: Path) -> None:
    status = collect(_settings(responder, tmp_path, "h"), timeout=1.0)
    assert status == Status(responder.zone, responder.address, [], {})
    out = io.StringIO()
    format_status(status, out)
    assert "services:\n  none" in out.getvalue()
