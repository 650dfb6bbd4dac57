# RFC 2136 dynamic updates, decoded and TSIG-verified with dnspython.
#
# dnslib cannot parse UPDATE messages whose records have empty RDATA (every
# RRset delete has one) and cannot verify TSIG, so this module uses dnspython
# alone and hands the server finished wire bytes.
#
# Order of work, as RFC 2136 section 3 lays it out:
#   1. verify TSIG (RFC 8945 section 5.2); unsigned updates are REFUSED,
#   2. the zone section names our zone (3.1),
#   3. prerequisites hold (3.2),
#   4. the update section is well formed (3.4.1, "prescan"),
#   5. apply every change, journal, then acknowledge (3.4.2, 3.5).
# Steps 1 to 4 change nothing, and step 5 is undone if the journal cannot be
# written, so an UPDATE is all or nothing.

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Mapping

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update

from mesh.responder.records import ANY, SERVED_TYPES, SOA, Journal, Zone

__all__ = ["LEASE_OPTION", "LeasePolicy", "UpdateProcessor"]

log = logging.getLogger(__name__)

# RFC 9664 section 4: the Update Lease EDNS(0) option.
LEASE_OPTION = 2

_META_TYPES = frozenset(
    {
        dns.rdatatype.ANY,
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
        dns.rdatatype.TSIG,
        dns.rdatatype.OPT,
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class LeasePolicy:
    """Lease bounds in seconds: requests are clamped to [minimum, maximum]."""

    default: float = 30.0
    minimum: float = 30.0
    maximum: float = 24 * 3600.0

    def grant(self, requested: float | None) -> float:
        wanted = self.default if requested is None else requested
        return min(max(wanted, self.minimum), self.maximum)


class _Refuse(Exception):
    """Ends processing with ``rcode``; nothing has been changed yet."""

    def __init__(self, rcode: int, why: str) -> None:
        super().__init__(why)
        self.rcode = rcode


class UpdateProcessor:
    """Applies signed UPDATE messages to a :class:`Zone`."""

    def __init__(
        self,
        zone: Zone,
        keyring: Mapping[dns.name.Name, dns.tsig.Key],
        journal: Journal | None = None,
        policy: LeasePolicy | None = None,
    ) -> None:
        self.zone = zone
        self.keyring = dict(keyring)
        self.journal = journal
        self.policy = policy or LeasePolicy()

    def handle(self, wire: bytes, now: float, wall_now: float) -> bytes | None:
        """Process one UPDATE; returns the reply, or ``None`` to drop it.

        ``now`` is monotonic (for lease deadlines), ``wall_now`` the wall
        clock (for the journal). TSIG checks read the wall clock themselves,
        as RFC 8945 requires.
        """
        try:
            query = dns.message.from_wire(wire, keyring=self.keyring)
        except dns.message.UnknownTSIGKey:
            return self._tsig_error(wire, dns.rcode.BADKEY, "unknown key")
        except (dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            return self._tsig_error(wire, dns.rcode.BADKEY, "key or algorithm mismatch")
        except dns.tsig.BadSignature:
            return self._tsig_error(wire, dns.rcode.BADSIG, "bad MAC")
        except dns.tsig.BadTime:
            return self._tsig_error(wire, dns.rcode.BADTIME, "time outside fudge")
        except dns.tsig.PeerError:
            # A request carrying a TSIG error code is not a request at all.
            return _formerr(wire)
        except (dns.exception.DNSException, ValueError, IndexError):
            return _formerr(wire)
        if not isinstance(query, dns.update.UpdateMessage):
            return _formerr(wire)
        response = dns.message.make_response(query)
        if not query.had_tsig:
            log.debug("update id %d refused: not signed", query.id)
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        lease, key_lease = _requested_lease(query)
        granted = self.policy.grant(lease)
        try:
            self._check_zone(query)
            self._check_prerequisites(query)
            self._prescan(query)
            changes = self._apply(query, granted, now, wall_now)
        except _Refuse as refusal:
            log.debug("update id %d: %s (%s)", query.id, refusal, _rcode(refusal.rcode))
            response.set_rcode(dns.rcode.Rcode(refusal.rcode))
        else:
            log.debug("update id %d applied %d changes", query.id, changes)
            response.set_rcode(dns.rcode.NOERROR)
            if lease is not None:
                # RFC 9664 section 4.1: the reply carries the lease granted.
                response.use_edns(
                    0,
                    options=[
                        dns.edns.GenericOption(
                            dns.edns.OptionType(LEASE_OPTION),
                            _lease_data(granted, key_lease),
                        )
                    ],
                )
        return response.to_wire()

    # ---- checks -----------------------------------------------------------

    def _check_zone(self, query: dns.update.UpdateMessage) -> None:
        # RFC 2136 section 3.1: exactly one zone, of type SOA, that we serve.
        if len(query.zone) != 1 or query.zone[0].rdtype != SOA:
            raise _Refuse(dns.rcode.FORMERR, "zone section is not one SOA question")
        zone_rr = query.zone[0]
        if zone_rr.name != self.zone.origin or zone_rr.rdclass != dns.rdataclass.IN:
            raise _Refuse(dns.rcode.NOTAUTH, f"not authoritative for {zone_rr.name}")

    def _check_prerequisites(self, query: dns.update.UpdateMessage) -> None:
        zone = self.zone
        # Value-dependent prerequisites are compared as whole RRsets
        # (section 3.2.3), so collect them before judging.
        wanted: dict[tuple[dns.name.Name, int], set[object]] = {}
        for rrset in query.prerequisite:
            name, rdtype = rrset.name, int(rrset.rdtype)
            if rrset.ttl != 0:
                raise _Refuse(dns.rcode.FORMERR, "prerequisite with nonzero TTL")
            if not zone.contains(name):
                raise _Refuse(dns.rcode.NOTZONE, f"prerequisite {name} outside zone")
            if rrset.deleting == dns.rdataclass.ANY:
                if len(rrset):
                    raise _Refuse(dns.rcode.FORMERR, "class ANY prerequisite with data")
                if rdtype == ANY:
                    if not zone.name_in_use(name):
                        raise _Refuse(dns.rcode.NXDOMAIN, f"{name} not in use")
                elif not zone.rrset(name, rdtype):
                    raise _Refuse(dns.rcode.NXRRSET, f"{name} has no such RRset")
            elif rrset.deleting == dns.rdataclass.NONE:
                if len(rrset):
                    raise _Refuse(
                        dns.rcode.FORMERR, "class NONE prerequisite with data"
                    )
                if rdtype == ANY:
                    if zone.name_in_use(name):
                        raise _Refuse(dns.rcode.YXDOMAIN, f"{name} is in use")
                elif zone.rrset(name, rdtype):
                    raise _Refuse(dns.rcode.YXRRSET, f"{name} has that RRset")
            elif rrset.deleting is None and rrset.rdclass == dns.rdataclass.IN:
                wanted.setdefault((name, rdtype), set()).update(rrset)
            else:
                raise _Refuse(dns.rcode.FORMERR, "prerequisite of unknown class")
        for (name, rdtype), rdatas in wanted.items():
            have = {r.rdata for r in zone.rrset(name, rdtype)}
            if have != rdatas:
                raise _Refuse(dns.rcode.NXRRSET, f"{name} RRset differs")

    def _prescan(self, query: dns.update.UpdateMessage) -> None:
        for rrset in query.update:
            name, rdtype = rrset.name, int(rrset.rdtype)
            if not self.zone.contains(name):
                raise _Refuse(dns.rcode.NOTZONE, f"update {name} outside zone")
            if rrset.deleting is None:
                if rrset.rdclass != dns.rdataclass.IN or rdtype in _META_TYPES:
                    raise _Refuse(dns.rcode.FORMERR, f"cannot add type {rdtype}")
                if rdtype not in SERVED_TYPES:
                    raise _Refuse(dns.rcode.REFUSED, f"type {rdtype} not served")
            elif rrset.deleting == dns.rdataclass.ANY:
                if rrset.ttl != 0 or len(rrset):
                    raise _Refuse(dns.rcode.FORMERR, "class ANY delete with data")
                if rdtype in _META_TYPES and rdtype != ANY:
                    raise _Refuse(dns.rcode.FORMERR, f"cannot delete type {rdtype}")
            elif rrset.deleting == dns.rdataclass.NONE:
                if rrset.ttl != 0 or rdtype in _META_TYPES:
                    raise _Refuse(dns.rcode.FORMERR, "bad class NONE delete")
            else:
                raise _Refuse(dns.rcode.FORMERR, "update of unknown class")

    # ---- changes ----------------------------------------------------------

    def _apply(
        self,
        query: dns.update.UpdateMessage,
        lease: float,
        now: float,
        wall_now: float,
    ) -> int:
        zone = self.zone
        names = {rrset.name for rrset in query.update}
        snapshot = zone.snapshot(names)
        version = zone.version
        changes = 0
        added: list[str] = []
        for rrset in query.update:
            name, rdtype = rrset.name, int(rrset.rdtype)
            if rrset.deleting is None:
                if rdtype == SOA:
                    # Section 3.4.2.2 lets an UPDATE replace the SOA; the serial
                    # is ours to manage, so such adds are ignored.
                    continue
                for rdata in rrset:
                    zone.add(
                        name, rrset.ttl, rdata, now + lease, wall_now + lease, lease
                    )
                    added.append(f"{name} {rrset.ttl} {rdata.to_text()}")
                    changes += 1
            elif rrset.deleting == dns.rdataclass.ANY:
                changes += len(zone.delete(name, rdtype))
            else:
                for rdata in rrset:
                    changes += len(zone.delete(name, rdtype, rdata))
        if not changes:
            return 0
        zone.bump_serial()
        if self.journal is not None:
            try:
                self.journal.save(zone)
            except OSError as exc:
                zone.restore(snapshot, version)
                log.error("cannot write journal %s: %s", self.journal.path, exc)
                raise _Refuse(dns.rcode.SERVFAIL, "journal write failed") from exc
        for text in added:
            log.info("registered %s (lease %gs)", text, lease)
        return changes

    # ---- TSIG failures ----------------------------------------------------

    def _tsig_error(self, wire: bytes, error: int, why: str) -> bytes | None:
        """The NOTAUTH reply RFC 8945 section 5.2 asks for, or ``None``."""
        try:
            query = dns.message.from_wire(wire, keyring=False)
        except (dns.exception.DNSException, ValueError, IndexError):
            return _formerr(wire)
        if query.tsig is None:
            return _formerr(wire)
        request = query.tsig[0]
        assert isinstance(request, dns.rdtypes.ANY.TSIG.TSIG)
        log.debug("update id %d rejected: %s (key %s)", query.id, why, query.keyname)
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.NOTAUTH)
        key = self.keyring.get(query.keyname) if query.keyname else None
        if error == dns.rcode.BADTIME and key is not None:
            # Section 5.2.3: a BADTIME reply is signed, and its Other Data
            # holds our time so the client can measure the skew.
            ours = int(time.time())
            response.request_mac = request.mac
            response.use_tsig(
                key,
                fudge=request.fudge,
                original_id=request.original_id,
                tsig_error=error,
                other_data=struct.pack("!HI", ours >> 32, ours & 0xFFFFFFFF),
            )
            return response.to_wire()
        # Sections 5.2.1 and 5.2.2: BADKEY and BADSIG replies are unsigned:
        # a TSIG record with the request's time, an empty MAC and the error.
        body = bytearray(response.to_wire())
        rdata = request.replace(mac=b"", error=error, other=b"").to_digestable()
        assert query.keyname is not None
        body += query.keyname.to_digestable()
        body += struct.pack(
            "!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(rdata)
        )
        body += rdata
        arcount = struct.unpack("!H", body[10:12])[0] + 1
        body[10:12] = struct.pack("!H", arcount)
        return bytes(body)


def _requested_lease(query: dns.message.Message) -> tuple[float | None, int | None]:
    """The LEASE and, when sent, KEY-LEASE of RFC 9664 section 4."""
    for option in query.options:
        if option.otype == LEASE_OPTION:
            data = option.to_wire()
            if data is not None and len(data) >= 8:
                lease, key_lease = struct.unpack("!II", data[:8])
                return float(lease), int(key_lease)
            if data is not None and len(data) >= 4:
                return float(struct.unpack("!I", data[:4])[0]), None
    return None, None


def _lease_data(granted: float, key_lease: int | None) -> bytes:
    # We hold no KEY records, so KEY-LEASE is echoed no longer than LEASE.
    if key_lease is None:
        return struct.pack("!I", int(granted))
    return struct.pack("!II", int(granted), min(key_lease, int(granted)))


def _formerr(wire: bytes) -> bytes | None:
    """A bare FORMERR reply when the header is readable, else ``None``."""
    if len(wire) < 12:
        return None
    flags = struct.unpack("!H", wire[2:4])[0]
    if flags & 0x8000:
        # Never answer a response: two servers could bounce errors forever.
        return None
    opcode_bits = flags & 0x7800
    return wire[:2] + struct.pack("!HHHHH", 0x8000 | opcode_bits | 1, 0, 0, 0, 0)


def _rcode(value: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode(value))
