"""The pure zone core: lookups, leases with a fake clock, the journal."""

from __future__ import annotations

import json
from pathlib import Path

import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import pytest

from mesh.errors import ConfigError
from mesh.responder.records import Journal, Zone

ORIGIN = "mesh.internal."
ZONE_FILE = Path(__file__).resolve().parents[2] / "dns" / "mesh.internal.zone"


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, dns.name.from_text(ORIGIN))


def rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(
        "IN", rdtype, text, dns.name.from_text(ORIGIN), relativize=False
    )


def register(zone: Zone, owner: str, rdtype: str, text: str, lease: float, now=0.0):
    zone.add(name(owner), 5, rdata(rdtype, text), now + lease, 1000.0 + now + lease)


def test_lookup_srv_carries_target_addresses_in_additional() -> None:
    zone = Zone(ORIGIN)
    register(zone, "_web._tcp", "SRV", "0 5 8080 Host-A", 30)
    register(zone, "host-a", "A", "127.0.0.5", 30)
    register(zone, "HOST-A", "AAAA", "::5", 30)
    answer = zone.lookup(name("_web._tcp"), dns.rdatatype.SRV, now=1.0)
    assert answer.rcode == dns.rcode.NOERROR
    assert [r.rdata.port for r in answer.answer] == [8080]
    assert sorted(r.rdata.to_text() for r in answer.additional) == ["127.0.0.5", "::5"]


@pytest.mark.parametrize(
    "asked",
    [
        "_svc._tcp.mesh.internal.",
        "_SVC._TCP.MESH.INTERNAL.",
        "_sVc._TcP.mEsH.iNtErNaL.",
    ],
)
def test_names_match_in_any_case(asked: str) -> None:
    # C15: a mixed-case registration is one entry, found in every case.
    zone = Zone(ORIGIN)
    zone.add(
        dns.name.from_text("_Svc._TCP.Mesh.Internal."),
        5,
        rdata("SRV", "0 0 1 h"),
        30,
        1030,
    )
    zone.add(
        dns.name.from_text("_svc._tcp.mesh.internal."),
        5,
        rdata("SRV", "0 0 1 h"),
        30,
        1030,
    )
    answer = zone.lookup(dns.name.from_text(asked), dns.rdatatype.SRV, now=0)
    assert len(answer.answer) == 1
    removed = zone.delete(dns.name.from_text("_svc._tcp.mesh.internal."))
    assert len(removed) == 1
    assert (
        zone.lookup(dns.name.from_text(asked), dns.rdatatype.SRV, 0).rcode
        == dns.rcode.NXDOMAIN
    )


def test_negative_answers_carry_the_soa_with_a_small_ttl() -> None:
    zone = Zone(ORIGIN, negative_ttl=5)
    register(zone, "host-a", "A", "127.0.0.5", 30)
    register(zone, "a.b.deep", "TXT", '"x"', 30)
    nxdomain = zone.lookup(name("nothing"), dns.rdatatype.SRV, 0)
    nodata = zone.lookup(name("host-a"), dns.rdatatype.SRV, 0)
    empty_non_terminal = zone.lookup(name("b.deep"), dns.rdatatype.A, 0)
    assert nxdomain.rcode == dns.rcode.NXDOMAIN
    assert nodata.rcode == dns.rcode.NOERROR and not nodata.answer
    assert empty_non_terminal.rcode == dns.rcode.NOERROR
    for answer in (nxdomain, nodata, empty_non_terminal):
        (soa,) = answer.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= 5


def test_names_outside_the_zone_are_refused() -> None:
    zone = Zone(ORIGIN)
    answer = zone.lookup(dns.name.from_text("example.com."), dns.rdatatype.A, 0)
    assert answer.rcode == dns.rcode.REFUSED


def test_lease_ends_exactly_at_its_deadline() -> None:
    zone = Zone(ORIGIN)
    register(zone, "host-a", "A", "127.0.0.5", lease=10, now=100)
    assert zone.next_deadline == 110
    assert zone.lookup(name("host-a"), dns.rdatatype.A, 109.999).answer
    version = zone.version
    assert zone.lookup(name("host-a"), dns.rdatatype.A, 110).rcode == dns.rcode.NXDOMAIN
    assert zone.version > version
    assert zone.next_deadline == float("inf")


def test_renewal_moves_the_deadline() -> None:
    zone = Zone(ORIGIN)
    register(zone, "host-a", "A", "127.0.0.5", lease=10, now=0)
    register(zone, "host-a", "A", "127.0.0.5", lease=10, now=8)
    assert len(zone.rrset(name("host-a"), dns.rdatatype.A)) == 1
    assert zone.expire(12) == []
    assert len(zone.expire(18)) == 1


def test_static_records_never_expire_and_cannot_be_deleted() -> None:
    zone = Zone(ORIGIN)
    assert zone.load_file(ZONE_FILE) > 0
    assert zone.expire(1e12) == []
    assert zone.lookup(name("_static._tcp"), dns.rdatatype.SRV, 1e12).answer
    assert zone.delete(name("fixed")) == []
    # Re-adding a static record does not turn it into a leased one.
    zone.add(name("fixed"), 5, rdata("A", "127.0.0.1"), 10, 1010)
    assert zone.expire(11) == []
    assert zone.lookup(name("fixed"), dns.rdatatype.A, 11).answer


def test_apex_soa_and_ns_survive_a_name_delete() -> None:
    zone = Zone(ORIGIN)
    register(zone, "@", "TXT", '"x"', 30)
    removed = zone.delete(dns.name.from_text(ORIGIN))
    assert [r.rdtype for r in removed] == [dns.rdatatype.TXT]
    assert zone.rrset(dns.name.from_text(ORIGIN), dns.rdatatype.SOA)


def test_journal_replay_converts_remaining_lease(tmp_path: Path) -> None:
    zone = Zone(ORIGIN)
    # Registered at monotonic 50 / wall 1050 with a 30 s lease.
    zone.add(name("host-a"), 5, rdata("A", "127.0.0.5"), 80, 1080)
    zone.add(name("host-b"), 5, rdata("A", "127.0.0.6"), 55, 1055)
    zone.bump_serial()
    journal = Journal(tmp_path / "journal.json")
    journal.save(zone)
    # A new process: its monotonic clock reads 7, the wall clock 1060.
    fresh = Zone(ORIGIN)
    assert journal.load(fresh, now=7.0, wall_now=1060.0, max_lease=3600) == 1
    (record,) = fresh.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == pytest.approx(27.0)
    assert fresh.rrset(name("host-b"), dns.rdatatype.A) == []
    assert fresh.serial > zone.serial - 1


def test_journal_caps_lease_after_a_backward_clock_step(tmp_path: Path) -> None:
    zone = Zone(ORIGIN)
    zone.add(name("host-a"), 5, rdata("A", "127.0.0.5"), 30, 1030)
    journal = Journal(tmp_path / "journal.json")
    journal.save(zone)
    fresh = Zone(ORIGIN)
    # The wall clock went back a day while we were down.
    journal.load(fresh, now=0.0, wall_now=1030.0 - 86400, max_lease=60)
    (record,) = fresh.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == 60


def test_damaged_journal_is_a_clear_config_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        Journal(path).load(Zone(ORIGIN), 0, 0, 60)
    path.write_text(json.dumps({"version": 1, "zone": ORIGIN, "records": [{}]}))
    with pytest.raises(ConfigError):
        Journal(path).load(Zone(ORIGIN), 0, 0, 60)


def test_journal_caps_reloaded_lease_at_the_granted_lease(tmp_path: Path) -> None:
    # A 30 s lease granted at wall 1000; the responder stops, the wall clock
    # steps back an hour, and it restarts. Only max_lease (a day) would let
    # the record live 3630 s; the granted lease keeps it to 30 s.
    zone = Zone(ORIGIN)
    zone.add(name("host-a"), 5, rdata("A", "127.0.0.5"), 30, 1030, lease=30)
    journal = Journal(tmp_path / "journal.json")
    journal.save(zone)
    fresh = Zone(ORIGIN)
    assert journal.load(fresh, now=0.0, wall_now=1000.0 - 3600, max_lease=86400) == 1
    (record,) = fresh.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == 30
    assert record.lease == 30
    # A second restart after another backward step still knows the lease.
    journal.save(fresh)
    assert len(fresh.expire(30)) == 1
    again = Zone(ORIGIN)
    journal.load(again, now=500.0, wall_now=1000.0 - 7200, max_lease=86400)
    (record,) = again.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == 530


def test_journal_without_granted_leases_still_loads(tmp_path: Path) -> None:
    # Journals written before the lease was stored load, capped at max_lease
    # only: a backward step of an hour still stretches the record by an hour.
    path = tmp_path / "journal.json"
    entry = {
        "name": "host-a.mesh.internal.",
        "ttl": 5,
        "type": "A",
        "rdata": "127.0.0.5",
        "expires_at": 1030.0,
    }
    doc = {"version": 1, "zone": ORIGIN, "serial": 7, "records": [entry]}
    path.write_text(json.dumps(doc))
    fresh = Zone(ORIGIN)
    assert Journal(path).load(fresh, now=0.0, wall_now=1000.0, max_lease=86400) == 1
    (record,) = fresh.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == 30
    assert record.lease is None
    fresh = Zone(ORIGIN)
    Journal(path).load(fresh, now=0.0, wall_now=1030.0 - 3600, max_lease=86400)
    (record,) = fresh.rrset(name("host-a"), dns.rdatatype.A)
    assert record.deadline == 3600
