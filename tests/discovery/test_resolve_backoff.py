"""Transient DNS failures are retried: the resolver re-asks with backoff
within its lifetime (C10, C14), the registrar re-sends an UPDATE. Real UDP to
a scripted nameserver on loopback."""

from __future__ import annotations

import asyncio
import time

import dns.message
import dns.opcode
import dns.rcode
import dns.tsig
import dns.update
import pytest

from mesh.discovery.register import Registrar
from mesh.discovery.resolve import AsyncResolver, Resolver
from mesh.errors import DiscoveryServerFailure

from .fakedns import LoopbackNameserver, reply, servfail_then

SVC = "_svc._tcp.mesh.internal."


def srv_answer(request: dns.message.Message) -> dns.message.Message:
    response = reply(
        SVC,
        "SRV",
        answer=[(SVC, "SRV", 5, ["0 1 5000 host-a.mesh.internal."])],
        additional=[("host-a.mesh.internal.", "A", 5, ["127.0.0.2"])],
    )
    response.id = request.id
    response.flags &= ~0x0100  # the scripted reply came from an RD query
    return response


def always_servfail(request: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(request)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response


def test_servfail_once_then_noerror_succeeds() -> None:
    handler, seen = servfail_then(srv_answer, failures=1)
    with LoopbackNameserver(handler) as nameserver:
        resolver = Resolver([nameserver.address], timeout=1, lifetime=3)
        (target,) = resolver.resolve(SVC)
    assert (target.host, target.port) == ("127.0.0.2", 5000)
    assert seen[0] == 2


def test_async_servfail_once_then_noerror_succeeds() -> None:
    handler, seen = servfail_then(srv_answer, failures=1)
    with LoopbackNameserver(handler) as nameserver:
        resolver = AsyncResolver([nameserver.address], timeout=1, lifetime=3)
        (target,) = asyncio.run(resolver.resolve(SVC))
    assert (target.host, target.port) == ("127.0.0.2", 5000)
    assert seen[0] == 2


@pytest.mark.slow
def test_persistent_servfail_backs_off_and_fails_within_lifetime() -> None:
    lifetime = 2.0
    with LoopbackNameserver(always_servfail) as nameserver:
        resolver = Resolver([nameserver.address], timeout=1, lifetime=lifetime)
        start = time.monotonic()
        with pytest.raises(DiscoveryServerFailure, match="SERVFAIL"):
            resolver.resolve(SVC)
        elapsed = time.monotonic() - start
        asked = len(nameserver.requests)
    assert elapsed < lifetime + 0.5
    # Re-asked, but with backoff: a retry loop without waits would send
    # hundreds of queries in two seconds; doubling waits capped at 1 s give
    # at most about a dozen.
    assert 2 <= asked <= 15


def test_registrar_retries_a_transient_servfail_then_succeeds() -> None:
    # A real signed UPDATE over UDP: the first answer is SERVFAIL (a
    # transient failure), the second a signed NOERROR; the registrar must
    # send exactly twice and report success.
    key = dns.tsig.Key("srvmesh-key.", b"k" * 32, dns.tsig.HMAC_SHA256)

    def accept(request: dns.message.Message) -> dns.message.Message:
        assert isinstance(request, dns.update.UpdateMessage)
        assert request.had_tsig
        return dns.message.make_response(request)

    handler, seen = servfail_then(accept, failures=1)
    with LoopbackNameserver(handler, keyring={key.name: key}) as nameserver:
        registrar = Registrar(
            [nameserver.address], "mesh.internal.", key, timeout=1, budget=5
        )
        registration = registrar.register(
            "_svc._tcp", "host-a", 5000, ["127.0.0.2"], renew=False
        )
        sent = len(nameserver.requests)
    assert seen[0] == 2 and sent == 2
    assert all(r.opcode() == dns.opcode.UPDATE for r in nameserver.requests)
    assert registration.record.port == 5000
