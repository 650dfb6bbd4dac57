"""Registrar and resolver against the bundled responder on loopback."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from mesh.discovery.register import Registrar
from mesh.discovery.resolve import AsyncResolver, Resolver
from mesh.errors import (
    ConfigError,
    DiscoveryTimeout,
    NameNotFound,
    RegistrationRejected,
    ServiceNotFound,
)
from mesh.hit.server import HitServer

SVC = "_svc._tcp.mesh.internal."


@dataclasses.dataclass
class Silent:
    """A UDP socket that counts datagrams and never answers: a dead server."""

    sock: socket.socket
    received: int = 0

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"


@pytest.fixture
def silent() -> Iterator[Silent]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    box = Silent(sock)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                sock.recv(4096)
                box.received += 1
            except TimeoutError:
                continue

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    yield box
    stop.set()
    thread.join(1)
    sock.close()


@pytest.fixture
def registrar(responder: Any) -> Registrar:
    return Registrar([responder.address], responder.zone, responder.key, lease=30)


def test_register_resolve_and_dig(responder: Any, registrar: Registrar) -> None:
    with registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2", "::1"]):
        resolver = Resolver([responder.address])
        targets = resolver.resolve("_svc._tcp")
        assert sorted(t.endpoint for t in targets) == [
            "tcp://127.0.0.2:5000",
            "tcp://[::1]:5000",
        ]
        assert {t.name for t in targets} == {"host-a.mesh.internal."}
        if shutil.which("dig"):
            out = subprocess.run(
                ["dig", "+norec", "-p", str(responder.port), "@127.0.0.1", SVC, "SRV"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            assert "0 1 5000 host-a.mesh.internal." in out
            assert "127.0.0.2" in out  # the glue in ADDITIONAL
    # close() deleted it.
    with pytest.raises(ServiceNotFound):
        Resolver([responder.address]).resolve(SVC)


def test_async_resolver_sees_the_same(responder: Any, registrar: Registrar) -> None:
    import asyncio

    with registrar.register("_svc._tcp", "host-b", 5001, ["127.0.0.3"]):
        targets = asyncio.run(AsyncResolver([responder.address]).resolve(SVC))
    assert [t.endpoint for t in targets] == ["tcp://127.0.0.3:5001"]


def test_two_servers_share_an_address_record(
    responder: Any, registrar: Registrar
) -> None:
    first = registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"])
    second = registrar.register("_other._tcp", "host-a", 6000, ["127.0.0.2"])
    first.close()
    # The second registration still resolves: its address was not deleted.
    targets = Resolver([responder.address]).resolve("_other._tcp")
    assert [t.endpoint for t in targets] == ["tcp://127.0.0.2:6000"]
    second.close()


def test_a_replica_stopping_keeps_the_address_its_sibling_uses(
    responder: Any,
) -> None:
    # Two registrars stand for two processes on one host: neither knows the
    # other uses the target's address record.
    def registrar() -> Registrar:
        return Registrar([responder.address], responder.zone, responder.key)

    first = registrar().register(SVC, "host-a", 5000, ["127.0.0.2"])
    second = registrar().register(SVC, "host-a", 5001, ["127.0.0.2"])
    other_host = registrar().register(SVC, "host-b", 5002, ["127.0.0.3"])
    first.close()
    targets = Resolver([responder.address]).resolve(SVC)
    assert sorted(t.endpoint for t in targets) == [
        "tcp://127.0.0.2:5001",
        "tcp://127.0.0.3:5002",
    ]
    second.close()
    # The last user of host-a's address took it along; host-b's stays.
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [responder.host]
    resolver.port = responder.port
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("host-a.mesh.internal.", "A")
    assert [r.address for r in resolver.resolve("host-b.mesh.internal.", "A")] == [
        "127.0.0.3"
    ]
    other_host.close()


def test_wrong_key_is_rejected_and_changes_nothing(
    responder: Any, tmp_path: Any
) -> None:
    import dns.tsig

    wrong = dns.tsig.Key(responder.key.name, b"x" * 32, responder.key.algorithm)
    registrar = Registrar([responder.address], responder.zone, wrong, budget=2)
    with pytest.raises(RegistrationRejected) as info:
        registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"])
    assert info.value.tsig_error == "BADSIG"
    assert "x" * 8 not in str(info.value)
    unknown = dns.tsig.Key("nobody.", b"y" * 32, responder.key.algorithm)
    registrar = Registrar([responder.address], responder.zone, unknown, budget=2)
    with pytest.raises(RegistrationRejected) as info:
        registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"])
    assert info.value.tsig_error == "BADKEY"
    with pytest.raises(NameNotFound):
        Resolver([responder.address]).resolve(SVC)


@pytest.mark.slow
def test_renewal_keeps_a_short_lease_alive(responder: Any) -> None:
    registrar = Registrar([responder.address], responder.zone, responder.key, lease=1)
    with registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"], ttl=0):
        time.sleep(3.5)
        assert Resolver([responder.address]).resolve(SVC)


@pytest.mark.slow
def test_without_renewal_the_lease_runs_out(responder: Any) -> None:
    registrar = Registrar([responder.address], responder.zone, responder.key, lease=1)
    registration = registrar.register(
        "_svc._tcp", "host-a", 5000, ["127.0.0.2"], ttl=0, renew=False
    )
    time.sleep(2.5)
    with pytest.raises(ServiceNotFound):
        Resolver([responder.address]).resolve(SVC)
    registration.close()


@pytest.mark.slow
def test_reregisters_after_responder_loses_everything(tmp_path: Any) -> None:
    from mesh.responder.server import Responder
    from mesh.responder.testing import start_responder

    first = start_responder(tmp_path / "one")
    port = first.port
    registrar = Registrar([first.address], first.zone, first.key, lease=1)
    registration = registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"], ttl=0)
    first.responder.stop()
    # A new, empty responder on the same port with the same key: as if the
    # journal had been lost. The next renewal must put the records back.
    second = Responder(
        zone=first.zone,
        listen=("127.0.0.1", port),
        keyring={first.key.name: first.key},
        min_lease=0.5,
    )
    for _ in range(50):
        try:
            second.start()
            break
        except ConfigError:
            # Responder.start reports a busy port as ConfigError; the old
            # sockets may still be closing, so wait and try again.
            time.sleep(0.1)
    else:
        pytest.skip("responder cannot be restarted on its old port")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                Resolver([first.address]).resolve(SVC)
                break
            except ServiceNotFound:
                time.sleep(0.2)
        else:
            pytest.fail("registration did not come back after the restart")
    finally:
        registration.close()
        second.stop()


@pytest.mark.slow
def test_dead_first_nameserver_then_live_one(
    responder: Any, registrar: Registrar, silent: Silent
) -> None:
    with registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"]):
        resolver = Resolver([silent.address, responder.address], timeout=2, lifetime=2)
        start = time.monotonic()
        assert resolver.resolve(SVC)
        assert time.monotonic() - start < 2.5
    assert silent.received >= 1


@pytest.mark.slow
def test_only_dead_nameserver_times_out_within_lifetime(silent: Silent) -> None:
    resolver = Resolver([silent.address], timeout=0.5, lifetime=1.5)
    start = time.monotonic()
    with pytest.raises(DiscoveryTimeout) as info:
        resolver.resolve(SVC)
    assert time.monotonic() - start < 1.5 + 0.5
    assert info.value.nameservers == [silent.address]


def test_no_module_default_resolver_and_no_decoy(
    responder: Any, registrar: Registrar, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("dnspython's default resolver was used")

    monkeypatch.setattr(dns.resolver, "get_default_resolver", refuse)
    monkeypatch.setattr(dns.resolver, "resolve", refuse)
    # A decoy on the standard port, where a resolver that ignored our
    # host:port setting would send its queries (C14), must see nothing.
    decoy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        decoy.bind(("127.0.0.1", 53))
    except OSError as exc:
        decoy.close()
        pytest.skip(f"cannot bind the decoy on 127.0.0.1:53: {exc}")
    decoy.setblocking(False)
    try:
        with registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"]):
            Resolver([responder.address]).resolve("_svc._tcp")
        with pytest.raises(BlockingIOError):
            decoy.recv(512)
    finally:
        decoy.close()


def test_truncated_answer_is_fetched_over_tcp(
    responder: Any, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    # Sixty targets with glue do not fit in the resolver's 1232-byte EDNS
    # payload, so the responder sets TC and the resolver must ask over TCP.
    registrations = [
        registrar.register("_big._tcp", f"host-{n}", 5000 + n, [f"127.0.1.{n}"])
        for n in range(60)
    ]
    try:
        with caplog.at_level(logging.DEBUG, "mesh.discovery.resolve"):
            targets = Resolver([responder.address]).resolve("_big._tcp")
        assert "truncated the answer" in caplog.text
        assert sorted(t.port for t in targets) == list(range(5000, 5060))
        assert {t.host for t in targets} == {f"127.0.1.{n}" for n in range(60)}
    finally:
        for registration in registrations:
            registration.close()


def test_secret_never_logged(
    responder: Any, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    import base64

    with caplog.at_level(logging.DEBUG):
        with registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"]):
            pass
    secret = base64.b64encode(responder.key.secret).decode()
    assert secret not in caplog.text
    assert secret not in repr(registrar)


class _Nothing:
    """A handler with no methods: the test only needs the server to exist."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def test_registration_advertises_the_given_address_not_the_bound_one(
    responder: Any, registrar: Registrar
) -> None:
    # Behind NAT or in a container the address clients must use differs from
    # the one the server binds; the SRV glue must carry the advertised one.
    server = HitServer(
        _Nothing,
        bind="127.0.0.1",
        registrar=registrar,
        srv_name="_svc._tcp",
        target="host-a",
        advertise=["127.0.0.9"],
    ).start()
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        # start() returns once bound; the registration follows on the
        # server's thread, so wait for it to show.
        deadline = time.monotonic() + 5
        while True:
            query = dns.message.make_query(SVC, "SRV")
            reply = dns.query.udp(query, "127.0.0.1", timeout=2, port=responder.port)
            if reply.answer or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        (srv,) = reply.answer
        assert [rd.port for rd in srv] == [server.port]
        glue = reply.find_rrset(
            reply.additional,
            dns.name.from_text("host-a.mesh.internal."),
            dns.rdataclass.IN,
            dns.rdatatype.A,
        )
        assert [rd.address for rd in glue] == ["127.0.0.9"]
        (target,) = Resolver([responder.address]).resolve(SVC)
        assert target.endpoint == f"tcp://127.0.0.9:{server.port}"
    finally:
        server.close()


@pytest.mark.slow
def test_secret_never_logged_by_mesh_dns_at_debug(tmp_path: Any) -> None:
    # `mesh dns` with no key file generates one; at DEBUG it must log where
    # the key went, never what it is, here and while it serves signed and
    # badly signed updates and transfers.
    import base64
    import os
    import signal
    import sys

    import dns.tsig
    import dns.update
    import dns.xfr
    import dns.zone

    from mesh.keyfile import load_key
    from mesh.responder.testing import read_line

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(PYTHONUNBUFFERED="1", MESH_LOG_LEVEL="DEBUG")
    cmd = [sys.executable, "-m", "mesh", "dns", "--listen", "127.0.0.1:0"]
    cmd += ["--state-dir", str(state), "--min-lease", "1"]
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
    try:
        line = read_line(proc, 20)
        assert line.startswith("listening "), line
        port = int(line.split()[1].rsplit(":", 1)[1])
        key_file = state / "tsig.key"
        key = load_key(key_file)
        assert key_file.stat().st_mode & 0o777 == 0o600
        for signer in (key, dns.tsig.Key(key.name, b"w" * 32, key.algorithm)):
            update = dns.update.UpdateMessage("mesh.internal.", keyring=signer)
            update.add("host-a", 5, "A", "127.0.0.5")
            try:
                dns.query.tcp(update, "127.0.0.1", port=port, timeout=5)
            except dns.tsig.PeerBadSignature:
                assert signer is not key
        zone = dns.zone.Zone("mesh.internal.")
        query, _ = dns.xfr.make_query(zone, keyring=key)
        dns.query.inbound_xfr("127.0.0.1", zone, query, port=port, timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    logged = stderr_path.read_text()
    assert str(key_file) in logged
    assert "DEBUG" in logged  # the level this test is about was really on
    for form in (
        base64.b64encode(key.secret).decode(),
        key.secret.hex(),
        repr(key.secret),
    ):
        assert form not in logged
