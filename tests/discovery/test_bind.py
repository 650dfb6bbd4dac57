"""The registrar and resolver, unchanged, against a real BIND 9 ``named``.

The configuration is ``dns/named.conf.example`` with its placeholders filled
in, so the example production users copy is the one tested here.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.tsig
import pytest

from mesh.discovery.register import Registrar
from mesh.discovery.resolve import Resolver
from mesh.errors import ServiceNotFound
from mesh.keyfile import generate_key_file, load_key

REPO = Path(__file__).resolve().parents[2]
SVC = "_svc._tcp.mesh.internal."

pytestmark = [pytest.mark.bind, pytest.mark.slow]


def _free_port() -> int:
    # Free for both UDP and TCP at the moment of asking; named binds both.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = int(tcp.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))
    return port


def _answers(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            Resolver([f"127.0.0.1:{port}"], timeout=0.3, lifetime=0.5).resolve(
                "_static._tcp"
            )
            return True
        except ServiceNotFound:
            return True
        except Exception:
            time.sleep(0.2)
    return False


@pytest.fixture
def named(tmp_path: Path) -> Iterator[tuple[str, dns.tsig.Key]]:
    named_bin = shutil.which("named") or "/usr/sbin/named"
    key_file = generate_key_file(tmp_path / "tsig.key")
    zone_file = tmp_path / "mesh.internal.zone"
    shutil.copy(REPO / "dns" / "mesh.internal.zone", zone_file)
    port = _free_port()
    config = (REPO / "dns" / "named.conf.example").read_text()
    for placeholder, value in {
        "@DIRECTORY@": str(tmp_path),
        "@PORT@": str(port),
        "@KEY_FILE@": str(key_file),
        "@ZONE_FILE@": str(zone_file),
    }.items():
        config = config.replace(placeholder, value)
    assert not re.search(r"@[A-Z_]+@", config), "a placeholder was not filled"
    conf = tmp_path / "named.conf"
    conf.write_text(config)
    if shutil.which("named-checkconf"):
        checked = subprocess.run(
            ["named-checkconf", str(conf)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    log = (tmp_path / "named.log").open("w")
    process = subprocess.Popen(
        [named_bin, "-g", "-4", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        if not _answers(port, time.monotonic() + 15):
            process.kill()
            pytest.fail(
                "named did not start:\n" + (tmp_path / "named.log").read_text()[-3000:]
            )
        yield f"127.0.0.1:{port}", load_key(key_file)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_register_renew_resolve_delete_through_bind(
    named: tuple[str, dns.tsig.Key], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "mesh.discovery.register")
    address, key = named
    registrar = Registrar([address], "mesh.internal.", key, lease=1)
    registration = registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"])
    # BIND echoes no lease option: the registrar falls back to what it asked.
    assert registration.lease == 1
    resolver = Resolver([address])
    assert [t.endpoint for t in resolver.resolve(SVC)] == ["tcp://127.0.0.2:5000"]
    time.sleep(2.0)  # at least one renewal went through BIND
    assert registration.renewing
    assert "renewed _svc._tcp.mesh.internal." in caplog.text
    resolver.forget(SVC)
    assert [t.endpoint for t in resolver.resolve(SVC)] == ["tcp://127.0.0.2:5000"]
    registration.close()
    with pytest.raises(ServiceNotFound):
        Resolver([address]).resolve(SVC)
    # The static records from the zone file are served by BIND as well.
    static = Resolver([address]).resolve("_static._tcp")
    assert {t.endpoint for t in static} == {"tcp://127.0.0.1:7000", "tcp://[::1]:7000"}
