"""RFC 2136 processing without sockets: wire bytes in, wire bytes out."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest

from mesh.responder.records import Journal, Zone
from mesh.responder.update import LEASE_OPTION, LeasePolicy, UpdateProcessor

ORIGIN = "mesh.internal."
KEY = dns.tsig.Key("srvmesh-key.", b"k" * 32, dns.tsig.HMAC_SHA256)
OTHER = dns.tsig.Key("srvmesh-key.", b"x" * 32, dns.tsig.HMAC_SHA256)
UNKNOWN = dns.tsig.Key("stranger.", b"k" * 32, dns.tsig.HMAC_SHA256)


@pytest.fixture
def zone() -> Zone:
    return Zone(ORIGIN)


@pytest.fixture
def processor(zone: Zone, tmp_path: Path) -> UpdateProcessor:
    return UpdateProcessor(
        zone,
        {KEY.name: KEY},
        Journal(tmp_path / "journal.json"),
        LeasePolicy(default=30, minimum=5, maximum=600),
    )


def send(
    processor: UpdateProcessor, update: dns.message.Message, now: float = 0.0
) -> dns.message.Message:
    wire = update.to_wire()
    reply = processor.handle(wire, now, 1000.0 + now)
    assert reply is not None
    keyring = {KEY.name: KEY} if update.keyring is KEY else False
    return dns.message.from_wire(reply, keyring=keyring, request_mac=update.mac)


def new_update(key: dns.tsig.Key | None = KEY) -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(ORIGIN, keyring=key)


def names(zone: Zone) -> set[str]:
    return {r.to_text() for r in zone.dynamic_records()}


def srv(zone: Zone, owner: str) -> list[str]:
    found = zone.rrset(dns.name.from_text(owner, dns.name.from_text(ORIGIN)), 33)
    return sorted(r.rdata.to_text() for r in found)


def test_add_then_delete_one_record(processor: UpdateProcessor, zone: Zone) -> None:
    update = new_update()
    update.add("_web._tcp", 5, "SRV", "0 5 8080 a")
    update.add("_web._tcp", 5, "SRV", "0 5 8081 b")
    assert send(processor, update).rcode() == dns.rcode.NOERROR
    assert len(srv(zone, "_web._tcp")) == 2
    delete = new_update()
    delete.delete("_web._tcp", "SRV", "0 5 8080 a")
    assert send(processor, delete).rcode() == dns.rcode.NOERROR
    assert srv(zone, "_web._tcp") == ["0 5 8081 b.mesh.internal."]


def test_delete_rrset_and_delete_name(processor: UpdateProcessor, zone: Zone) -> None:
    update = new_update()
    update.add("host-a", 5, "A", "127.0.0.5")
    update.add("host-a", 5, "TXT", '"hello"')
    send(processor, update)
    delete = new_update()
    delete.delete("host-a", "A")
    send(processor, delete)
    assert [r.rdtype for r in zone.dynamic_records()] == [dns.rdatatype.TXT]
    delete = new_update()
    delete.delete("HOST-A")
    send(processor, delete)
    assert zone.dynamic_records() == []


def test_lower_case_delete_removes_mixed_case_registration(
    processor: UpdateProcessor, zone: Zone
) -> None:
    update = new_update()
    update.add("_Svc._TCP", 5, "SRV", "0 0 1 Host-A")
    send(processor, update)
    delete = new_update()
    delete.delete("_svc._tcp", "SRV", "0 0 1 host-a")
    send(processor, delete)
    assert zone.dynamic_records() == []


def test_unsigned_update_is_refused(processor: UpdateProcessor, zone: Zone) -> None:
    update = new_update(key=None)
    update.add("host-a", 5, "A", "127.0.0.5")
    assert send(processor, update).rcode() == dns.rcode.REFUSED
    assert zone.dynamic_records() == []


@pytest.mark.parametrize(
    ("key", "error"),
    [(OTHER, dns.rcode.BADSIG), (UNKNOWN, dns.rcode.BADKEY)],
)
def test_bad_tsig_gets_notauth_and_changes_nothing(
    processor: UpdateProcessor, zone: Zone, key: dns.tsig.Key, error: int
) -> None:
    update = new_update(key)
    update.add("host-a", 5, "A", "127.0.0.5")
    reply = processor.handle(update.to_wire(), 0, 1000)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == error
    assert zone.dynamic_records() == []
    # The client side, as the registrar sees it: a typed peer error.
    with pytest.raises(dns.tsig.PeerError):
        dns.message.from_wire(reply, keyring=key, request_mac=update.mac)


def test_md5_key_with_our_name_is_badkey(processor: UpdateProcessor) -> None:
    md5 = dns.tsig.Key("srvmesh-key.", b"k" * 32, dns.tsig.HMAC_MD5)
    update = new_update(md5)
    update.add("host-a", 5, "A", "127.0.0.5")
    reply = processor.handle(update.to_wire(), 0, 1000)
    assert reply is not None
    assert dns.message.from_wire(reply, keyring=False).tsig_error == dns.rcode.BADKEY


def test_skewed_clock_gets_signed_badtime(
    processor: UpdateProcessor, zone: Zone, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = new_update()
    update.add("host-a", 5, "A", "127.0.0.5")
    real = time.time()
    # Sign as a client whose clock runs 400 s ahead (C19), then restore.
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real + 400)
        wire = update.to_wire()
    reply = processor.handle(wire, 0, 1000)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADTIME
    other = parsed.tsig[0].other
    server_time = struct.unpack("!HI", other)[1]
    assert abs(server_time - real) < 60
    # Signed: the MAC verifies with our key against the request MAC.
    with pytest.raises(dns.tsig.PeerBadTime):
        dns.message.from_wire(reply, keyring={KEY.name: KEY}, request_mac=update.mac)
    assert zone.dynamic_records() == []


def test_prerequisites_as_nsupdate_sends_them(
    processor: UpdateProcessor, zone: Zone
) -> None:
    first = new_update()
    first.absent("host-a")  # prereq nxdomain
    first.add("host-a", 5, "A", "127.0.0.5")
    assert send(processor, first).rcode() == dns.rcode.NOERROR
    again = new_update()
    again.absent("host-a")
    again.add("host-a", 5, "A", "127.0.0.6")
    assert send(processor, again).rcode() == dns.rcode.YXDOMAIN
    no_rrset = new_update()
    no_rrset.absent("host-a", "A")  # prereq nxrrset
    assert send(processor, no_rrset).rcode() == dns.rcode.YXRRSET
    exists = new_update()
    exists.present("host-b")  # prereq yxdomain
    assert send(processor, exists).rcode() == dns.rcode.NXDOMAIN
    rrset_exists = new_update()
    rrset_exists.present("host-a", "AAAA")  # prereq yxrrset
    assert send(processor, rrset_exists).rcode() == dns.rcode.NXRRSET
    value = new_update()
    value.present("host-a", "A", "127.0.0.9")  # value-dependent
    value.add("host-c", 5, "A", "127.0.0.7")
    assert send(processor, value).rcode() == dns.rcode.NXRRSET
    value = new_update()
    value.present("host-a", "A", "127.0.0.5")
    value.add("host-c", 5, "A", "127.0.0.7")
    assert send(processor, value).rcode() == dns.rcode.NOERROR
    assert len(zone.dynamic_records()) == 2


def test_update_is_all_or_nothing(processor: UpdateProcessor, zone: Zone) -> None:
    update = new_update()
    update.add("host-a", 5, "A", "127.0.0.5")
    update.add("host-b.example.com.", 5, "A", "127.0.0.6")
    assert send(processor, update).rcode() == dns.rcode.NOTZONE
    assert zone.dynamic_records() == []


def test_journal_failure_rolls_back(processor: UpdateProcessor, zone: Zone) -> None:
    first = new_update()
    first.add("host-a", 5, "A", "127.0.0.5")
    send(processor, first)
    assert processor.journal is not None
    processor.journal.path = Path("/proc/no-such-dir/journal.json")
    update = new_update()
    update.delete("host-a")
    update.add("host-b", 5, "A", "127.0.0.6")
    assert send(processor, update).rcode() == dns.rcode.SERVFAIL
    assert [r.name.to_text() for r in zone.dynamic_records()] == [
        "host-a.mesh.internal."
    ]


def test_other_zone_is_notauth(processor: UpdateProcessor) -> None:
    update = dns.update.UpdateMessage("example.com.", keyring=KEY)
    update.add("host-a", 5, "A", "127.0.0.5")
    assert send(processor, update).rcode() == dns.rcode.NOTAUTH


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 30), (1, 5), (60, 60), (10**6, 600)]
)
def test_lease_is_clamped_and_echoed(
    processor: UpdateProcessor, zone: Zone, requested: int | None, granted: int
) -> None:
    update = new_update()
    update.add("host-a", 5, "A", "127.0.0.5")
    if requested is not None:
        option = dns.edns.GenericOption(
            dns.edns.OptionType(LEASE_OPTION), struct.pack("!I", requested)
        )
        update.use_edns(0, options=[option])
    reply = send(processor, update, now=100.0)
    assert reply.rcode() == dns.rcode.NOERROR
    (record,) = zone.dynamic_records()
    assert record.deadline == 100.0 + granted
    echoed = [o for o in reply.options if o.otype == LEASE_OPTION]
    if requested is None:
        assert echoed == []
    else:
        assert struct.unpack("!I", echoed[0].to_wire())[0] == granted


def test_garbage_gets_formerr_or_nothing(processor: UpdateProcessor) -> None:
    assert processor.handle(b"\x12", 0, 0) is None
    reply = processor.handle(b"\x12\x34\x28\x00" + b"\x00\x01" * 4 + b"\xff", 0, 0)
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


def leased_update(lease: int, port: int) -> dns.update.UpdateMessage:
    update = new_update()
    update.add("_web._tcp", 5, "SRV", f"0 5 {port} host-a")
    update.add("host-a", 5, "A", "127.0.0.5")
    option = dns.edns.GenericOption(
        dns.edns.OptionType(LEASE_OPTION), struct.pack("!I", lease)
    )
    update.use_edns(0, options=[option])
    return update


def test_shorter_lease_renewal_cannot_shorten_a_shared_address(
    processor: UpdateProcessor, zone: Zone
) -> None:
    # Two servers on host-a share its A record: one leases 300 s, the other
    # 30 s and registers (renews the A) later, then dies without deleting.
    assert send(processor, leased_update(300, 8080), now=0.0).rcode() == 0
    assert send(processor, leased_update(30, 8081), now=10.0).rcode() == 0
    host_a = dns.name.from_text("host-a", dns.name.from_text(ORIGIN))
    (address,) = zone.rrset(host_a, dns.rdatatype.A)
    assert address.deadline == 300.0 and address.lease == 300
    # After the short lease ends, the long-lease SRV still has its address.
    answer = zone.lookup(
        dns.name.from_text("_web._tcp", dns.name.from_text(ORIGIN)),
        dns.rdatatype.SRV,
        now=100.0,
    )
    assert [r.rdata.port for r in answer.answer] == [8080]
    assert [r.rdata.to_text() for r in answer.additional] == ["127.0.0.5"]
    # A longer renewal still extends it.
    assert send(processor, leased_update(600, 8081), now=200.0).rcode() == 0
    (address,) = zone.rrset(host_a, dns.rdatatype.A)
    assert address.deadline == 800.0
