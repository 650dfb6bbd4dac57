"""Masters that find each other through the bundled responder (real DNS).

Runs once the discovery registrar and the ``responder`` fixture exist;
skips cleanly before that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.config import Settings
from mesh.pool.directory import DnsDirectory
from mesh.pool.tracker import Outcome

from .cluster import Cluster

pytestmark = pytest.mark.slow

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture
def dns_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    pytest.importorskip("mesh.discovery.register")
    try:
        responder: Any = request.getfixturevalue("responder")
    except pytest.FixtureLookupError:
        pytest.skip("no responder fixture yet")
    args = [
        "--nameservers",
        responder.address,
        "--key-file",
        str(responder.key_file),
        "--zone",
        str(responder.zone),
    ]
    settings = Settings(
        runtime_dir=tmp_path / f"run-{HOSTS[0]}",
        nameservers=[responder.address],
        key_file=Path(responder.key_file),
        zone=str(responder.zone),
    )
    c = Cluster(
        tmp_path,
        HOSTS,
        per_host=2,
        issuer_host=HOSTS[0],
        settings=settings,
        directory_args=args,
        issuer_directory=DnsDirectory.from_settings(settings),
    )
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_masters_meet_through_dns(dns_cluster: Cluster) -> None:
    dns_cluster.converge(budget=60.0)
    result = dns_cluster.broadcast(b"via-dns")
    assert result.counts[Outcome.REPLIED] == 6
    assert {m.host for m in result.replies} == set(HOSTS)
