"""The resolver's decisions, driven with fabricated replies and a fake clock."""

from __future__ import annotations

import collections
import logging
import random

import dns.name
import dns.rdatatype
import pytest

from mesh.discovery import resolve
from mesh.discovery.names import absolute_name, service_name
from mesh.errors import (
    ConfigError,
    DiscoveryServerFailure,
    DiscoveryTimeout,
    NameNotFound,
    NoServiceRecords,
    ServiceNotAvailable,
    ServiceNotFound,
)

from .fakedns import Clock, failure, reply, scripted_resolver

SVC = "_svc._tcp.mesh.internal."


def srv_only(*records: str, ttl: int = 5, glue: bool = True) -> resolve._Reply:
    additional = []
    if glue:
        additional = [
            ("a.mesh.internal.", "A", 30, ["127.0.0.2"]),
            ("b.mesh.internal.", "A", 30, ["127.0.0.3"]),
            ("b.mesh.internal.", "AAAA", 30, ["::1"]),
        ]
    return reply(SVC, "SRV", [(SVC, "SRV", ttl, list(records))], additional)


def test_Target_endpoint_brackets_ipv6() -> None:
    v4 = resolve.Target("127.0.0.2", 5000, "a.mesh.internal.", 0, 1)
    v6 = resolve.Target("::1", 5000, "a.mesh.internal.", 0, 1)
    assert v4.endpoint == "tcp://127.0.0.2:5000"
    assert v6.endpoint == "tcp://[::1]:5000"
    full = resolve.Target("2001:db8::1", 1, "x.", 0, 0)
    assert full.endpoint == "tcp://[2001:db8::1]:1"


def test_names_are_made_absolute_once() -> None:
    zone = "mesh.internal."
    expected = dns.name.from_text(SVC)
    assert absolute_name("_svc._tcp", zone) == expected
    assert absolute_name("_svc._tcp.mesh.internal", zone) == expected
    assert absolute_name(SVC, zone) == expected
    assert service_name("svc", zone) == expected
    assert service_name("_svc", "mesh.internal") == expected


def test_nameserver_must_be_an_address() -> None:
    with pytest.raises(ConfigError, match="not an IP address"):
        resolve.Resolver(["localhost:5353"])
    assert str(resolve.Nameserver.parse("[::1]:5353")) == "[::1]:5353"


def test_targets_come_with_glue_and_one_per_address() -> None:
    resolver, asked = scripted_resolver(
        lambda q, t: srv_only("0 1 5000 a.mesh.internal.", "1 1 6000 b.mesh.internal."),
        Clock(),
    )
    targets = resolver.resolve("_svc._tcp")
    assert [t.endpoint for t in targets] == [
        "tcp://127.0.0.2:5000",
        "tcp://127.0.0.3:6000",
        "tcp://[::1]:6000",
    ]
    assert targets[0].name == "a.mesh.internal."
    assert asked == [(SVC, "SRV")]


def test_glue_matches_targets_case_insensitively() -> None:
    answer = reply(
        SVC,
        "SRV",
        [(SVC, "SRV", 5, ["0 1 5000 Host-A.Mesh.Internal."])],
        [("host-a.MESH.internal.", "A", 30, ["127.0.0.9"])],
    )
    resolver, asked = scripted_resolver(lambda q, t: answer, Clock())
    assert [t.host for t in resolver.resolve(SVC)] == ["127.0.0.9"]
    assert asked == [(SVC, "SRV")]


def test_target_without_glue_is_looked_up() -> None:
    def script(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> resolve._Reply:
        name = qname.to_text()
        if rdtype == dns.rdatatype.SRV:
            return srv_only("0 1 5000 a.mesh.internal.", glue=False)
        if rdtype == dns.rdatatype.A:
            return reply(name, "A", [(name, "A", 30, ["127.0.0.2"])])
        return reply(name, "AAAA")  # NODATA

    resolver, asked = scripted_resolver(script, Clock())
    assert [t.host for t in resolver.resolve(SVC)] == ["127.0.0.2"]
    assert asked == [
        (SVC, "SRV"),
        ("a.mesh.internal.", "A"),
        ("a.mesh.internal.", "AAAA"),
    ]


def test_cname_target_and_addressless_target_are_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def script(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> resolve._Reply:
        name = qname.to_text()
        if rdtype == dns.rdatatype.SRV:
            return reply(
                SVC,
                "SRV",
                [
                    (
                        SVC,
                        "SRV",
                        5,
                        [
                            "0 1 1 alias.mesh.internal.",
                            "0 1 2 empty.mesh.internal.",
                            "1 1 3 good.mesh.internal.",
                            "1 1 4 local.mesh.internal.",
                        ],
                    )
                ],
                [
                    ("good.mesh.internal.", "A", 30, ["127.0.0.5"]),
                    ("local.mesh.internal.", "AAAA", 30, ["fe80::1"]),
                ],
            )
        if name.startswith("alias"):
            return reply(
                name,
                dns.rdatatype.to_text(rdtype),
                [(name, "CNAME", 30, ["good.mesh.internal."])],
            )
        return reply(name, dns.rdatatype.to_text(rdtype))

    resolver, _ = scripted_resolver(script, Clock())
    with caplog.at_level(logging.WARNING, "mesh.discovery.resolve"):
        targets = resolver.resolve(SVC)
    assert [t.endpoint for t in targets] == ["tcp://127.0.0.5:3"]
    text = caplog.text
    assert "alias.mesh.internal. is an alias" in text or "alias (CNAME)" in text
    assert "empty.mesh.internal.: it has no address" in text
    assert "fe80::1" in text


def test_lone_dot_is_not_available_and_dot_among_others_is_ignored() -> None:
    resolver, _ = scripted_resolver(lambda q, t: srv_only("0 0 0 ."), Clock())
    with pytest.raises(ServiceNotAvailable) as info:
        resolver.resolve(SVC)
    assert info.value.name == SVC
    resolver, _ = scripted_resolver(
        lambda q, t: srv_only("0 0 0 .", "0 1 5000 a.mesh.internal."), Clock()
    )
    assert [t.port for t in resolver.resolve(SVC)] == [5000]


def test_error_mapping_names_the_service_and_nameservers() -> None:
    cases = [
        (reply(SVC, "SRV", rcode=3), NameNotFound),
        (reply(SVC, "SRV"), NoServiceRecords),
        (failure(server_failure=True), DiscoveryServerFailure),
        (failure(), DiscoveryTimeout),
    ]
    for answer, kind in cases:
        resolver, _ = scripted_resolver(lambda q, t, a=answer: a, Clock())  # type: ignore[misc]
        with pytest.raises(kind) as info:
            resolver.resolve(SVC)
        assert info.value.name == SVC
        assert info.value.nameservers == ["127.0.0.1:5353"]
        assert SVC in str(info.value) and "127.0.0.1:5353" in str(info.value)
    assert issubclass(NameNotFound, ServiceNotFound)
    assert issubclass(NoServiceRecords, ServiceNotFound)


def test_all_targets_unusable_is_service_not_found() -> None:
    resolver, _ = scripted_resolver(
        lambda q, t: (
            srv_only("0 1 1 x.mesh.internal.", glue=False)
            if t == dns.rdatatype.SRV
            else reply(q.to_text(), dns.rdatatype.to_text(t))
        ),
        Clock(),
    )
    with pytest.raises(ServiceNotFound, match="no SRV target"):
        resolver.resolve(SVC)


def test_cache_honours_ttl_never_longer() -> None:
    clock = Clock()
    resolver, asked = scripted_resolver(
        lambda q, t: srv_only("0 1 5000 a.mesh.internal.", ttl=10), clock
    )
    resolver.resolve(SVC)
    clock.now += 8.9  # within the TTL minus the largest early-expiry jitter
    resolver.resolve(SVC)
    assert len(asked) == 1
    clock.now += 1.1  # exactly the TTL: must ask again
    resolver.resolve(SVC)
    assert len(asked) == 2


def test_cache_ttl_is_the_smallest_of_srv_and_addresses() -> None:
    clock = Clock()
    answer = reply(
        SVC,
        "SRV",
        [(SVC, "SRV", 60, ["0 1 5000 a.mesh.internal."])],
        [("a.mesh.internal.", "A", 3, ["127.0.0.2"])],
    )
    resolver, asked = scripted_resolver(lambda q, t: answer, clock)
    resolver.resolve(SVC)
    clock.now += 3.0
    resolver.resolve(SVC)
    assert len(asked) == 2


def test_negative_answers_cached_for_soa_minimum_only() -> None:
    clock = Clock()
    resolver, asked = scripted_resolver(lambda q, t: reply(SVC, "SRV", rcode=3), clock)
    for _ in range(3):
        with pytest.raises(NameNotFound):
            resolver.resolve(SVC)
    assert len(asked) == 1  # no retry storm (C10)
    clock.now += 2.0  # the fake SOA's minimum
    with pytest.raises(NameNotFound):
        resolver.resolve(SVC)
    assert len(asked) == 2


def test_serve_stale_within_grace_then_fail(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    up = True

    def script(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> resolve._Reply:
        return srv_only("0 1 5000 a.mesh.internal.") if up else failure()

    resolver, _ = scripted_resolver(script, clock, stale_grace=60.0)
    first = resolver.resolve(SVC)
    up = False
    clock.now += 30.0
    with caplog.at_level(logging.WARNING, "mesh.discovery.resolve"):
        assert resolver.resolve(SVC) == first
    assert "serving the last good answer" in caplog.text
    clock.now += 40.0  # 70 s after the answer: past TTL 5 + grace 60
    with pytest.raises(DiscoveryTimeout):
        resolver.resolve(SVC)


def test_serve_stale_asks_dns_only_once_per_refresh_period() -> None:
    # The outage stall: without a recheck timer every resolve during an outage
    # would first wait out the lifetime on silent nameservers.
    clock = Clock()
    up = True

    def script(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> resolve._Reply:
        return srv_only("0 1 5000 a.mesh.internal.") if up else failure()

    resolver, asked = scripted_resolver(
        script, clock, stale_grace=60.0, stale_refresh=5.0
    )
    first = resolver.resolve(SVC)
    up = False
    clock.now += 6.0  # past the TTL: the next resolve asks and fails
    assert resolver.resolve(SVC) == first
    asked_after_failure = len(asked)
    for _ in range(20):
        clock.now += 0.2  # 4 s in all: inside the refresh period
        assert resolver.resolve(SVC) == first
    assert len(asked) == asked_after_failure
    clock.now += 1.5  # the refresh is due: one caller asks again
    assert resolver.resolve(SVC) == first
    assert len(asked) == asked_after_failure + 1
    up = True
    clock.now += 5.5
    assert resolver.resolve(SVC) == first
    assert len(asked) == asked_after_failure + 2  # back to fresh answers


def test_only_one_caller_rechecks_while_others_get_stale() -> None:
    clock = Clock()
    up = True

    def script(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> resolve._Reply:
        return srv_only("0 1 5000 a.mesh.internal.") if up else failure()

    resolver, _ = scripted_resolver(script, clock, stale_refresh=5.0)
    first = resolver.resolve(SVC)
    up = False
    clock.now += 6.0
    resolver.resolve(SVC)  # fails; the stale answer is served from now on
    clock.now += 5.0
    qname = resolver.core.qname(SVC)
    assert resolver.core.cached(qname, clock.now) is None  # this caller rechecks
    assert resolver.core.cached(qname, clock.now) == first  # the others do not


def test_nxdomain_ends_serve_stale() -> None:
    clock = Clock()
    answers = [srv_only("0 1 5000 a.mesh.internal."), reply(SVC, "SRV", rcode=3)]
    resolver, _ = scripted_resolver(lambda q, t: answers[0], clock)
    resolver.resolve(SVC)
    answers.pop(0)
    clock.now += 10
    with pytest.raises(NameNotFound):
        resolver.resolve(SVC)
    answers[0] = failure()
    clock.now += 10
    with pytest.raises(DiscoveryTimeout):
        resolver.resolve(SVC)


def test_weights_are_honoured_in_proportion() -> None:
    random.seed(2782)
    resolver, _ = scripted_resolver(
        lambda q, t: reply(
            SVC,
            "SRV",
            [
                (
                    SVC,
                    "SRV",
                    5,
                    [
                        "0 60 1 a.mesh.internal.",
                        "0 30 2 a.mesh.internal.",
                        "0 10 3 a.mesh.internal.",
                        "0 0 4 a.mesh.internal.",
                        "1 100 5 a.mesh.internal.",
                    ],
                )
            ],
            [("a.mesh.internal.", "A", 30, ["127.0.0.2"])],
        ),
        Clock(),
    )
    draws = 20000
    firsts: collections.Counter[int] = collections.Counter()
    for _ in range(draws):
        order = resolver.resolve(SVC)
        # Priority 1 always comes after every priority-0 target.
        assert order[-1].port == 5
        firsts[order[0].port] += 1
    assert firsts[1] / draws == pytest.approx(0.6, abs=0.03)
    assert firsts[2] / draws == pytest.approx(0.3, abs=0.03)
    assert firsts[3] / draws == pytest.approx(0.1, abs=0.02)
    assert firsts[4] / draws < 0.01  # weight 0: rarely, not never
    assert firsts[5] == 0


def test_attempts_share_the_lifetime_between_nameservers() -> None:
    servers = [resolve.Nameserver("127.0.0.1", 1), resolve.Nameserver("127.0.0.1", 2)]
    attempts = resolve._Attempts(servers, timeout=2.0, deadline=102.0)
    first = attempts.next(100.0)
    assert first == (servers[0], 1.0)
    attempts.timed_out(servers[0], 1.0)
    second = attempts.next(101.0)
    assert second == (servers[1], 1.0)
    attempts.failed(servers[1], "SERVFAIL")
    # The failing server is dropped; the silent one gets another go.
    assert attempts.next(101.5) == (servers[0], 0.5)
    assert attempts.next(102.0) is None
    assert attempts.failure().server_failure
