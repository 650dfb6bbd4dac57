# The zone as data: records, leases, expiry and the journal.
#
# Theory of operation. A Zone holds every record the responder serves, keyed
# by owner name. dns.name.Name hashes and compares case-insensitively, so
# "_Svc._TCP.Mesh.Internal." and "_svc._tcp.mesh.internal." are one key (C15)
# while each Record keeps the case it was registered with.
#
# Records come from two places. Static records load from a master file and
# never expire; dynamic records arrive by RFC 2136 UPDATE and carry a lease:
# a deadline on the time.monotonic() clock, passed in as ``now`` by the caller
# so that tests use plain numbers and a wall-clock step cannot shorten or
# stretch a lease (C24). Every change bumps ``version`` so the server can drop
# its pre-encoded answers, and bumps the SOA serial (RFC 2136 section 3.6).
#
# The journal holds the dynamic records. It is rewritten whole, to a temporary
# file that is fsynced and renamed over the old one, before an UPDATE is
# acknowledged, so a SIGKILL at any instant leaves either the old or the new
# state on disk and never half of one.
#
# Nothing here opens a socket or reads a clock for durations.

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import dns.exception
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.SRV
import dns.rrset
import dns.zone

from mesh.errors import ConfigError

__all__ = ["Answer", "Journal", "Record", "Zone", "SERVED_TYPES"]

log = logging.getLogger(__name__)

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
NS = dns.rdatatype.NS
SOA = dns.rdatatype.SOA
SRV = dns.rdatatype.SRV
TXT = dns.rdatatype.TXT
ANY = dns.rdatatype.ANY

# The types the issue asks for; anything else in an UPDATE gets REFUSED
# rather than being stored and then served by an encoder that never saw it.
SERVED_TYPES = frozenset({SOA, NS, SRV, A, AAAA, TXT})

# Negative answers should expire quickly: a client that asks for a service a
# second before it registers must not cache the NXDOMAIN for long.
DEFAULT_NEGATIVE_TTL = 5

# Journal format version, so a later layout can refuse an older file clearly.
_JOURNAL_VERSION = 1


@dataclasses.dataclass(slots=True)
class Record:
    """One resource record as served.

    ``deadline`` is the lease end on the monotonic clock, ``None`` for static
    records, which never expire. ``expires_at`` is the same instant on the
    wall clock, kept only for the journal. ``lease`` is the length of the
    lease that set the deadline, kept so a restart can bound the remaining
    time by it (see :class:`Journal`).
    """

    name: dns.name.Name
    ttl: int
    rdata: dns.rdata.Rdata
    deadline: float | None = None
    expires_at: float | None = None
    lease: float | None = None

    @property
    def rdtype(self) -> int:
        return int(self.rdata.rdtype)

    @property
    def static(self) -> bool:
        return self.deadline is None

    def lease_remaining(self, now: float) -> float | None:
        """Seconds of lease left at ``now``, or ``None`` for a static record."""
        return None if self.deadline is None else max(0.0, self.deadline - now)

    def to_text(self) -> str:
        return f"{self.name} {self.ttl} IN {dns.rdatatype.to_text(self.rdata.rdtype)} {self.rdata.to_text()}"


@dataclasses.dataclass(slots=True)
class Answer:
    """What to say to one question; the server encodes it.

    ``rcode`` is a dns.rcode value. ``authority`` holds the SOA of negative
    answers; ``negative_ttl`` is the TTL to give it there (RFC 2308 section 3).
    """

    rcode: int
    answer: list[Record] = dataclasses.field(default_factory=list)
    authority: list[Record] = dataclasses.field(default_factory=list)
    additional: list[Record] = dataclasses.field(default_factory=list)


# RRsets of one owner name, by type.
Node = dict[int, list[Record]]


class Zone:
    """The authoritative data of one zone, with leases.

    Not thread-safe: the server's loop owns it and other threads go through
    the lock of :class:`mesh.responder.server.Responder`.
    """

    def __init__(
        self,
        origin: str | dns.name.Name = "mesh.internal.",
        negative_ttl: int = DEFAULT_NEGATIVE_TTL,
    ) -> None:
        if isinstance(origin, str):
            origin = dns.name.from_text(origin)
        self.origin = origin
        self.negative_ttl = negative_ttl
        self.nodes: dict[dns.name.Name, Node] = {}
        # Bumped on every change; the server's answer cache is valid for one.
        self.version = 0
        # The earliest lease deadline, so the hot path checks one float.
        self.next_deadline = float("inf")
        self._add_default_apex()

    # ---- building -------------------------------------------------------

    def _add_default_apex(self) -> None:
        ns_name = dns.name.from_text("ns", self.origin)
        mbox = dns.name.from_text("hostmaster", self.origin)
        # SOA timers other than MINIMUM matter only to secondaries, which a
        # mesh responder does not have; MINIMUM is the negative-caching TTL.
        soa = dns.rdata.from_text(
            "IN",
            "SOA",
            f"{ns_name} {mbox} 1 3600 600 86400 {self.negative_ttl}",
        )
        self._put(Record(self.origin, self.negative_ttl, soa))
        self._put(
            Record(
                self.origin,
                3600,
                dns.rdata.from_text("IN", "NS", ns_name.to_text()),
            )
        )

    def load_file(self, path: str | os.PathLike[str]) -> int:
        """Load static records from a master file; returns how many.

        A SOA or NS RRset in the file replaces the synthesized default one.
        """
        try:
            zone = dns.zone.from_file(
                str(path),
                origin=self.origin,
                relativize=False,
                check_origin=False,
            )
        except (OSError, dns.exception.DNSException) as exc:
            raise ConfigError(f"cannot load zone file {path}: {exc}") from exc
        count = 0
        for name, rdataset in zone.iterate_rdatasets():
            if not name.is_subdomain(self.origin):
                continue
            if rdataset.rdtype not in SERVED_TYPES:
                log.warning(
                    "zone file %s: skipping %s %s (type not served)",
                    path,
                    name,
                    dns.rdatatype.to_text(rdataset.rdtype),
                )
                continue
            node = self.nodes.setdefault(name, {})
            if rdataset.rdtype in (SOA, NS) and name == self.origin:
                node.pop(rdataset.rdtype, None)
            for rdata in rdataset:
                self._put(Record(name, rdataset.ttl, rdata))
                count += 1
        if SOA in self.nodes[self.origin]:
            soa = self.soa()
            self.negative_ttl = min(soa.ttl, _soa_rdata(soa).minimum)
        self._changed()
        return count

    def _put(self, record: Record) -> None:
        rrset = self.nodes.setdefault(record.name, {}).setdefault(record.rdtype, [])
        for i, old in enumerate(rrset):
            if old.rdata == record.rdata:
                if (
                    old.deadline is not None
                    and record.deadline is not None
                    and old.deadline > record.deadline
                ):
                    # Two servers on one host share its A/AAAA record. If the
                    # one with the shorter lease could pull the deadline in,
                    # its death would take the address away while the other
                    # server's SRV still points at it; so a renewal only ever
                    # extends the lease a record already holds.
                    record.deadline = old.deadline
                    record.expires_at = old.expires_at
                    record.lease = old.lease
                rrset[i] = record
                break
        else:
            rrset.append(record)
        # RFC 2181 section 5.2: the records of one RRset share one TTL.
        for other in rrset:
            other.ttl = record.ttl
        if record.deadline is not None and record.deadline < self.next_deadline:
            self.next_deadline = record.deadline

    def _changed(self) -> None:
        self.version += 1

    def bump_serial(self) -> None:
        soa = self.soa()
        rd = _soa_rdata(soa)
        # RFC 1982 serial arithmetic: wrap within 32 bits, skipping zero.
        serial = (rd.serial + 1) % 2**32 or 1
        soa.rdata = rd.replace(serial=serial)
        self._changed()

    # ---- reading --------------------------------------------------------

    def soa(self) -> Record:
        return self.nodes[self.origin][SOA][0]

    @property
    def serial(self) -> int:
        return int(_soa_rdata(self.soa()).serial)

    def contains(self, name: dns.name.Name) -> bool:
        """True when ``name`` is at or below the origin."""
        return name.is_subdomain(self.origin)

    def rrset(self, name: dns.name.Name, rdtype: int) -> list[Record]:
        node = self.nodes.get(name)
        return list(node.get(rdtype, ())) if node else []

    def name_in_use(self, name: dns.name.Name) -> bool:
        node = self.nodes.get(name)
        return node is not None and any(node.values())

    def records(self) -> Iterator[Record]:
        for node in self.nodes.values():
            for rrset in node.values():
                yield from rrset

    def dynamic_records(self) -> list[Record]:
        return [r for r in self.records() if not r.static]

    def _exists_below(self, name: dns.name.Name) -> bool:
        # An empty non-terminal (a name with children but no records of its
        # own) answers NODATA, not NXDOMAIN (RFC 8020). Only misses get here,
        # and misses are cached by the server, so a scan is affordable.
        return any(
            n != name and n.is_subdomain(name) and self.name_in_use(n)
            for n in self.nodes
        )

    def lookup(self, qname: dns.name.Name, qtype: int, now: float) -> Answer:
        """Answer one question at ``now`` (monotonic seconds)."""
        if not self.contains(qname):
            return Answer(dns.rcode.REFUSED)
        if now >= self.next_deadline:
            self.expire(now)
        node = self.nodes.get(qname)
        if not node or not any(node.values()):
            if self._exists_below(qname):
                return self._negative(dns.rcode.NOERROR)
            return self._negative(dns.rcode.NXDOMAIN)
        if qtype == ANY:
            records = [r for rrset in node.values() for r in rrset]
        else:
            records = list(node.get(qtype, ()))
        if not records:
            return self._negative(dns.rcode.NOERROR)
        answer = Answer(dns.rcode.NOERROR, answer=records)
        # RFC 2782: the additional section carries the targets' addresses, so
        # a client needs no second round trip.
        targets: list[dns.name.Name] = []
        for record in records:
            if record.rdtype == SRV:
                targets.append(record.rdata.target)  # type: ignore[attr-defined]
            elif record.rdtype == NS:
                targets.append(record.rdata.target)  # type: ignore[attr-defined]
        seen: set[dns.name.Name] = set()
        for target in targets:
            if target in seen or not self.contains(target):
                continue
            seen.add(target)
            tnode = self.nodes.get(target, {})
            answer.additional.extend(tnode.get(A, ()))
            answer.additional.extend(tnode.get(AAAA, ()))
        return answer

    def _negative(self, rcode: int) -> Answer:
        soa = self.soa()
        ttl = min(soa.ttl, _soa_rdata(soa).minimum, self.negative_ttl)
        return Answer(rcode, authority=[Record(soa.name, ttl, soa.rdata)])

    # ---- leases ---------------------------------------------------------

    def expire(self, now: float) -> list[Record]:
        """Remove every record whose lease ended at or before ``now``."""
        expired: list[Record] = []
        next_deadline = float("inf")
        for name in list(self.nodes):
            node = self.nodes[name]
            for rdtype in list(node):
                keep = []
                for record in node[rdtype]:
                    if record.deadline is not None and record.deadline <= now:
                        expired.append(record)
                    else:
                        keep.append(record)
                        if record.deadline is not None:
                            next_deadline = min(next_deadline, record.deadline)
                if keep:
                    node[rdtype] = keep
                else:
                    del node[rdtype]
            if not node:
                del self.nodes[name]
        self.next_deadline = next_deadline
        if expired:
            for record in expired:
                log.info("expired %s", record.to_text())
            self.bump_serial()
        return expired

    # ---- changes (used by update.py) ------------------------------------

    def add(
        self,
        name: dns.name.Name,
        ttl: int,
        rdata: dns.rdata.Rdata,
        deadline: float,
        expires_at: float,
        lease: float | None = None,
    ) -> None:
        """Add or renew one dynamic record.

        A renewal keeps the later of the old and the new deadline.
        ``lease`` is the granted lease length; without it a journal reload
        can bound the record only by the responder's maximum lease.
        """
        for old in self.nodes.get(name, {}).get(int(rdata.rdtype), ()):
            if old.rdata == rdata and old.static:
                # Re-adding a static record only refreshes its TTL; it must
                # not turn into a leased record that can then expire.
                old.ttl = ttl
                self._changed()
                return
        self._put(Record(name, ttl, rdata, deadline, expires_at, lease))
        self._changed()

    def delete(
        self,
        name: dns.name.Name,
        rdtype: int = ANY,
        rdata: dns.rdata.Rdata | None = None,
    ) -> list[Record]:
        """Delete dynamic records: one RR, an RRset, or a whole name.

        Static records and the apex SOA and NS are never deleted: RFC 2136
        section 3.4.2.3 protects the apex, and static records would come back
        from the zone file on restart anyway.
        """
        node = self.nodes.get(name)
        if not node:
            return []
        removed: list[Record] = []
        types = list(node) if rdtype == ANY else [rdtype]
        for t in types:
            if name == self.origin and t in (SOA, NS):
                continue
            keep = []
            for record in node.get(t, ()):
                match = rdata is None or record.rdata == rdata
                if match and not record.static:
                    removed.append(record)
                else:
                    keep.append(record)
            if keep:
                node[t] = keep
            else:
                node.pop(t, None)
        if not node:
            del self.nodes[name]
        if removed:
            self._changed()
        return removed

    def snapshot(self, names: Iterable[dns.name.Name]) -> dict[dns.name.Name, Node]:
        """Copies of the nodes at ``names``, for :meth:`restore`."""
        snap: dict[dns.name.Name, Node] = {}
        for name in names:
            node = self.nodes.get(name, {})
            snap[name] = {
                t: [dataclasses.replace(r) for r in rrset] for t, rrset in node.items()
            }
        snap[self.origin] = {
            t: [dataclasses.replace(r) for r in rrset]
            for t, rrset in self.nodes.get(self.origin, {}).items()
        }
        return snap

    def restore(self, snap: dict[dns.name.Name, Node], version: int) -> None:
        """Undo a failed transaction: put the snapshot nodes back."""
        for name, node in snap.items():
            if node:
                self.nodes[name] = node
            else:
                self.nodes.pop(name, None)
        self.next_deadline = min(
            (r.deadline for r in self.records() if r.deadline is not None),
            default=float("inf"),
        )
        # Even a restored zone gets a fresh version: the cache may hold an
        # answer rendered from the discarded state.
        self.version = version + 1


def _soa_rdata(record: Record) -> dns.rdtypes.ANY.SOA.SOA:
    rdata = record.rdata
    assert isinstance(rdata, dns.rdtypes.ANY.SOA.SOA)
    return rdata


class Journal:
    """The dynamic records of a zone on disk, rewritten atomically.

    Leases are stored as wall-clock expiry times. The monotonic clock starts
    at an arbitrary point per boot, so a monotonic deadline written by one
    process means nothing to the next. The wall clock is the only clock two
    processes share; it is read once on save (already done, as expires_at)
    and once on load, where the remaining time is turned back into a
    monotonic deadline. A wall-clock step while the responder is down can
    only shift expiry. Each entry also stores the lease that was granted, and
    the remaining time is capped at that lease (and at ``max_lease``), so a
    backward step cannot stretch a record past the lease it was given.
    Journals written before the lease was stored are capped at ``max_lease``
    only.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, zone: Zone) -> None:
        """Write every dynamic record and the serial; returns after fsync."""
        entries = [
            {
                "name": r.name.to_text(),
                "ttl": r.ttl,
                "type": dns.rdatatype.to_text(r.rdata.rdtype),
                "rdata": r.rdata.to_text(),
                "expires_at": r.expires_at,
                "lease": r.lease,
            }
            for r in zone.dynamic_records()
        ]
        data = json.dumps(
            {
                "version": _JOURNAL_VERSION,
                "zone": zone.origin.to_text(),
                "serial": zone.serial,
                "records": entries,
            },
            indent=1,
        ).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename itself lives in the directory; without this fsync a
        # power cut could bring back the old file after we acknowledged.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, zone: Zone, now: float, wall_now: float, max_lease: float) -> int:
        """Replay the journal into ``zone``; returns how many records live on.

        ``now`` is monotonic, ``wall_now`` the wall clock, both read once by
        the caller.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise ConfigError(f"cannot read journal {self.path}: {exc}") from exc
        try:
            doc = json.loads(raw)
            if doc.get("version") != _JOURNAL_VERSION:
                raise ValueError(f"unknown journal version {doc.get('version')!r}")
            if dns.name.from_text(doc["zone"]) != zone.origin:
                log.warning(
                    "journal %s is for zone %s, not %s; ignoring it",
                    self.path,
                    doc["zone"],
                    zone.origin,
                )
                return 0
            restored = 0
            for entry in doc["records"]:
                granted = entry.get("lease")
                cap = max_lease if granted is None else min(float(granted), max_lease)
                remaining = min(float(entry["expires_at"]) - wall_now, cap)
                if remaining <= 0:
                    continue
                name = dns.name.from_text(entry["name"])
                rdata = dns.rdata.from_text("IN", entry["type"], entry["rdata"])
                zone.add(
                    name,
                    int(entry["ttl"]),
                    rdata,
                    now + remaining,
                    wall_now + remaining,
                    None if granted is None else float(granted),
                )
                restored += 1
            serial = int(doc.get("serial", 0))
        except (ValueError, KeyError, TypeError, dns.exception.DNSException) as exc:
            raise ConfigError(
                f"journal {self.path} is damaged ({exc}). "
                "Move it aside to start with no registrations."
            ) from exc
        # Keep the serial rising across restarts, so secondaries and
        # humans comparing serials never see it go backwards.
        if serial > zone.serial:
            soa = zone.soa()
            soa.rdata = _soa_rdata(soa).replace(serial=serial)
        zone.bump_serial()
        return restored
