"""Registration for servers: RFC 2136 UPDATE, TSIG-signed, with a lease.

Theory of operation. A server calls :meth:`Registrar.register` once; that
sends an UPDATE adding one SRV record and the target's A/AAAA records,
signed with TSIG (RFC 8945) and carrying the RFC 9664 update-lease option,
and returns a :class:`Registration`. The registration's thread re-sends the
same add at about 80% of the granted lease, with jitter. Adding a record
that is already there changes nothing (RFC 2136 section 3.4.2.2), so one
message both renews a lease and re-creates records a restarted responder
lost. :meth:`Registration.close` stops the thread and deletes the records.

The message building and reply reading are plain functions
(:func:`build_add`, :func:`build_delete`, :func:`read_reply`) so they are
tested without sockets. Only :func:`_exchange` does I/O.

BIND ignores the lease option and keeps records until they are deleted;
renewal is then harmless, and a server killed without closing leaves its
records behind until an operator removes them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import socket
import struct
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rdtypes.IN.SRV
import dns.tsig
import dns.update
import tenacity

from mesh.discovery.names import absolute_name
from mesh.discovery.resolve import Nameserver
from mesh.errors import ConfigError, RegistrationError, RegistrationRejected

__all__ = [
    "Record",
    "Registrar",
    "Registration",
    "build_add",
    "build_delete",
    "read_reply",
    "renewal_delay",
]

log = logging.getLogger(__name__)

# RFC 9664 section 4: option code 2, a 4-byte LEASE in seconds (an 8-byte
# form adds KEY-LEASE, which we neither send nor need).
LEASE_OPTION = 2

# Renew between 70% and 85% of the lease: about 80% as ARCHITECTURE.md asks,
# spread so that servers started together do not renew together.
RENEW_FRACTION = (0.70, 0.85)

# After a failed renewal, try again this share of the lease later (at least
# one second), so several tries fit before the lease runs out.
RETRY_FRACTION = 0.1

# TCP frames DNS messages with a two-byte length (RFC 1035 section 4.2.2).
_TCP_LENGTH = struct.Struct("!H")


@dataclasses.dataclass(frozen=True)
class Record:
    """What one registration puts in DNS: an SRV record and its addresses."""

    srv_name: dns.name.Name
    target: dns.name.Name
    port: int
    addresses: tuple[str, ...]
    priority: int = 0
    weight: int = 1
    ttl: int = 5

    def srv_rdata(self) -> dns.rdata.Rdata:
        return dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SRV,
            f"{self.priority} {self.weight} {self.port} {self.target}",
        )

    def describe(self) -> str:
        return f"{self.srv_name} -> {self.target}:{self.port}"


def _address_rdata(address: str) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.AAAA if ":" in address else dns.rdatatype.A
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, address)


def build_add(
    zone: dns.name.Name, key: dns.tsig.Key, record: Record, lease: float
) -> dns.update.UpdateMessage:
    """The UPDATE that adds (or renews) ``record`` with a requested lease."""
    update = dns.update.UpdateMessage(zone)
    update.add(record.srv_name, record.ttl, record.srv_rdata())
    for address in record.addresses:
        update.add(record.target, record.ttl, _address_rdata(address))
    # dnspython has no class for option 2; the cast only names the code.
    otype = typing.cast(dns.edns.OptionType, LEASE_OPTION)
    option = dns.edns.GenericOption(otype, struct.pack("!I", round(lease)))
    update.use_edns(0, options=[option])
    # The key carries its algorithm from the key file: never a library default.
    update.use_tsig(key)
    return update


def build_delete(
    zone: dns.name.Name,
    key: dns.tsig.Key,
    record: Record,
    addresses: Sequence[str] | None = None,
) -> dns.update.UpdateMessage:
    """The UPDATE that deletes ``record``'s SRV RR and the given address RRs.

    Each RR is deleted by value (RFC 2136 section 2.5.4), so another
    server's SRV record at the same name is left alone.
    """
    update = dns.update.UpdateMessage(zone)
    update.delete(record.srv_name, record.srv_rdata())
    for address in record.addresses if addresses is None else addresses:
        update.delete(record.target, _address_rdata(address))
    update.use_tsig(key)
    return update


def granted_lease(response: dns.message.Message) -> int | None:
    """The lease the server echoed (RFC 9664 section 4.3), if any."""
    for option in response.options:
        if option.otype == LEASE_OPTION and isinstance(option, dns.edns.GenericOption):
            if len(option.data) >= 4:
                (lease,) = struct.unpack("!I", option.data[:4])
                return int(lease)
    return None


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The update was applied; ``lease`` is what the server granted, if said."""

    lease: int | None


@dataclasses.dataclass(frozen=True)
class Transient:
    """Worth retrying: SERVFAIL, BADTIME, silence."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Rejected:
    """Retrying the same message cannot help: bad key, refused, not authorised."""

    rcode: str
    tsig_error: str | None
    reason: str


Verdict = Accepted | Transient | Rejected

_TSIG_ERRORS = {
    dns.rcode.BADSIG: "BADSIG",
    dns.rcode.BADKEY: "BADKEY",
    dns.rcode.BADTIME: "BADTIME",
    dns.rcode.BADTRUNC: "BADTRUNC",
}


def _server_time(rdata: dns.rdtypes.ANY.TSIG.TSIG) -> int | None:
    # RFC 8945 section 5.2.3: a BADTIME reply carries the server's clock as
    # a 48-bit count of seconds in Other Data.
    if len(rdata.other) == 6:
        high, low = struct.unpack("!HI", rdata.other)
        return int((high << 32) | low)
    return None


def read_reply(query: dns.message.Message, wire: bytes) -> Verdict:
    """Judge the reply ``wire`` to the signed and sent ``query``.

    The reply's TSIG is verified. A reply that cannot be verified (an error
    reply the server could not sign, or a forgery) is still read for its
    rcode, since it can only make us retry or give up, never believe a
    registration happened.
    """
    verified = True
    try:
        response = dns.message.from_wire(
            wire, keyring=query.keyring, request_mac=query.mac
        )
    except (dns.tsig.PeerError, dns.exception.DNSException):
        verified = False
        try:
            response = dns.message.from_wire(wire, keyring=False)
        except dns.exception.DNSException as exc:
            return Transient(f"unreadable reply ({exc})")
    if not query.is_response(response):
        return Transient("a reply that does not match the update")
    rcode = response.rcode()
    tsig_error: str | None = None
    if response.tsig:
        tsig = response.tsig[0]
        assert isinstance(tsig, dns.rdtypes.ANY.TSIG.TSIG)
        if tsig.error:
            tsig_error = _TSIG_ERRORS.get(tsig.error, str(tsig.error))
        if tsig.error == dns.rcode.BADTIME:
            server = _server_time(tsig)
            if server is not None and query.tsig:
                # Wall-clock time, on purpose: TSIG signs with it (C19, C24).
                ours = typing.cast(dns.rdtypes.ANY.TSIG.TSIG, query.tsig[0])
                log.warning(
                    "DNS server rejects our clock: we are %+d s off the server's",
                    ours.time_signed - server,
                )
            return Transient("TSIG BADTIME: the clocks differ by more than the fudge")
    rcode_text = dns.rcode.to_text(rcode)
    if rcode == dns.rcode.NOERROR:
        if not verified:
            return Transient("a success reply whose TSIG does not verify")
        return Accepted(granted_lease(response))
    if rcode == dns.rcode.SERVFAIL:
        return Transient("SERVFAIL")
    reason = rcode_text if tsig_error is None else f"{rcode_text} ({tsig_error})"
    return Rejected(rcode_text, tsig_error, reason)


def renewal_delay(lease: float, rng: random.Random) -> float:
    """Seconds until the next renewal of a lease just granted."""
    return lease * rng.uniform(*RENEW_FRACTION)


# ---------------------------------------------------------------------------
# I/O


def _exchange(wire: bytes, nameserver: Nameserver, timeout: float) -> bytes:
    """Send one message over UDP (TCP if truncated) and return the reply."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in nameserver.host else socket.AF_INET
    address = (nameserver.host, nameserver.port)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Connected, so only the nameserver's replies reach us and an ICMP
        # "port unreachable" surfaces as an error instead of a long wait.
        sock.connect(address)
        sock.send(wire)
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            reply = sock.recv(65535)
            if len(reply) >= 12 and reply[:2] == wire[:2]:
                break
    if not reply[2] & (dns.flags.TC >> 8):
        return reply
    with socket.create_connection(
        address, timeout=max(0.001, deadline - time.monotonic())
    ) as conn:
        conn.sendall(_TCP_LENGTH.pack(len(wire)) + wire)
        (length,) = _TCP_LENGTH.unpack(_recv_exactly(conn, 2, deadline))
        return _recv_exactly(conn, length, deadline)


def _recv_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return data


def _wait(event: threading.Event, seconds: float) -> None:
    event.wait(seconds)


class _Retry(Exception):
    """Every nameserver gave a transient answer; tenacity tries again."""


class Registrar:
    """Registers SRV records in ``zone`` through the first answering nameserver.

    ``key`` signs every UPDATE (its algorithm comes from the key file).
    ``lease`` is the lease asked for, ``timeout`` bounds one exchange with one
    nameserver, and ``budget`` the retries of one add or delete.
    """

    def __init__(
        self,
        nameservers: Sequence[str],
        zone: str,
        key: dns.tsig.Key,
        lease: float = 30.0,
        timeout: float = 2.0,
        budget: float = 10.0,
    ) -> None:
        if not nameservers:
            raise ConfigError("no nameservers configured. Set MESH_NAMESERVERS.")
        self.nameservers = [Nameserver.parse(ns) for ns in nameservers]
        self.zone = dns.name.from_text(zone)
        self.key = key
        self.lease = lease
        self.timeout = timeout
        self.budget = budget
        self._lock = threading.Lock()
        # (target, address) -> live registrations of this registrar using it:
        # an address record is deleted only when the last one closes.
        self._address_users: Counter[tuple[dns.name.Name, str]] = Counter()

    def __repr__(self) -> str:
        # Never the key's secret: only its name.
        return f"<Registrar zone={self.zone} key={self.key.name} via {self._asked()}>"

    def record(
        self,
        srv_name: str | dns.name.Name,
        target: str | dns.name.Name,
        port: int,
        addresses: Sequence[str],
        priority: int = 0,
        weight: int = 1,
        ttl: int = 5,
    ) -> Record:
        """A :class:`Record` with names made absolute in the zone and checked."""
        if not addresses:
            raise ConfigError(f"no address to register for {target}")
        for address in addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(
                    f"advertised address {address!r} is not an IP address"
                ) from None
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} is out of range")
        srv = absolute_name(srv_name, self.zone)
        host = absolute_name(target, self.zone)
        for name in (srv, host):
            if not name.is_subdomain(self.zone):
                raise ConfigError(f"{name} is not in zone {self.zone}")
        return Record(srv, host, port, tuple(addresses), priority, weight, ttl)

    def register(
        self,
        srv_name: str | dns.name.Name,
        target: str | dns.name.Name,
        port: int,
        addresses: Sequence[str],
        priority: int = 0,
        weight: int = 1,
        ttl: int = 5,
        renew: bool = True,
    ) -> Registration:
        """Add the records now and keep them alive until the result is closed.

        ``addresses`` are the advertised ones, which may differ from the
        bound ones (NAT, containers). Raises :class:`RegistrationRejected`
        if the server refuses, :class:`RegistrationError` if none answers
        within the budget. With ``renew=False`` nothing renews the lease.
        """
        record = self.record(srv_name, target, port, addresses, priority, weight, ttl)
        granted = self.add(record)
        with self._lock:
            for address in record.addresses:
                self._address_users[(record.target, address)] += 1
        log.info(
            "registered %s (%s), lease %s s",
            record.describe(),
            ", ".join(record.addresses),
            granted if granted is not None else "not stated",
        )
        return Registration(self, record, granted, renew)

    def add(self, record: Record, stop: threading.Event | None = None) -> int | None:
        """Send the add once, with retries; the granted lease if the server said."""
        verdict = self._send(
            lambda: build_add(self.zone, self.key, record, self.lease),
            record.describe(),
            stop,
        )
        return verdict.lease

    def unregister(
        self,
        srv_name: str | dns.name.Name,
        target: str | dns.name.Name,
        port: int,
        addresses: Sequence[str] = (),
    ) -> int:
        """Delete the SRV records of ``srv_name`` pointing at ``target:port``.

        The records are looked up first, since a delete by value must name
        the priority and weight too. ``addresses`` are deleted from the
        target as well. Returns how many SRV records were deleted.
        """
        srv = absolute_name(srv_name, self.zone)
        host = absolute_name(target, self.zone)
        found = [
            rd for rd in self._current_srv(srv) if rd.target == host and rd.port == port
        ]
        records = [Record(srv, host, port, (), rd.priority, rd.weight) for rd in found]
        if addresses and not records:
            records = [Record(srv, host, port, ())]
        for index, record in enumerate(records):
            record = dataclasses.replace(
                record, addresses=tuple(addresses) if index == 0 else ()
            )
            self._send(
                lambda record=record: build_delete(self.zone, self.key, record),  # type: ignore[misc]
                "delete " + record.describe(),
                None,
            )
            log.info("deleted %s", record.describe())
        return len(found)

    def _current_srv(self, srv: dns.name.Name) -> list[dns.rdtypes.IN.SRV.SRV]:
        query = dns.message.make_query(srv, dns.rdatatype.SRV)
        for nameserver in self.nameservers:
            try:
                response = dns.query.tcp(
                    query, nameserver.host, timeout=self.timeout, port=nameserver.port
                )
            except (OSError, dns.exception.DNSException) as exc:
                log.warning("cannot look up %s at %s: %s", srv, nameserver, exc)
                continue
            try:
                rrset = response.find_rrset(
                    response.answer, srv, dns.rdataclass.IN, dns.rdatatype.SRV
                )
            except KeyError:
                return []
            return [rd for rd in rrset if isinstance(rd, dns.rdtypes.IN.SRV.SRV)]
        return []

    def _withdraw(self, record: Record, budget: float) -> None:
        with self._lock:
            unused = []
            for address in record.addresses:
                self._address_users[(record.target, address)] -= 1
                if self._address_users[(record.target, address)] <= 0:
                    del self._address_users[(record.target, address)]
                    unused.append(address)
        deadline = time.monotonic() + budget
        self._send(
            lambda: build_delete(self.zone, self.key, record, []),
            "delete " + record.describe(),
            None,
            budget,
        )
        log.info("deleted %s", record.describe())
        if unused:
            self._delete_addresses(record, unused, deadline)

    def _delete_addresses(
        self, record: Record, addresses: list[str], deadline: float
    ) -> None:
        """Delete the target's addresses unless another SRV record still uses them.

        Several processes on one host (replicas, systemd instances) register
        SRV records of one service pointing at one target name; the first to
        stop must not take the address the others are still reached by. So
        the SRV RRset is read after our own record went, and the addresses
        are deleted only if no remaining record names our target, with that
        very RRset as an RFC 2136 prerequisite (section 2.4.2, or "RRset does
        not exist" when it is empty): a server registering in between makes
        the prerequisite fail, and we look again. A target shared by two
        services is not seen here; its address comes back at the other's
        next renewal.
        """
        what = f"delete addresses of {record.target}"
        for _ in range(3):
            remaining = self._current_srv(record.srv_name)
            if any(rd.target == record.target for rd in remaining):
                log.debug("%s kept: other SRV records still name it", record.target)
                return
            budget = deadline - time.monotonic()
            if budget <= 0:
                return

            def build(
                remaining: list[dns.rdtypes.IN.SRV.SRV] = remaining,
            ) -> dns.message.Message:
                update = dns.update.UpdateMessage(self.zone)
                if remaining:
                    rdataset = dns.rdataset.from_rdata_list(0, remaining)
                    update.present(record.srv_name, rdataset)
                else:
                    update.absent(record.srv_name, dns.rdatatype.SRV)
                for address in addresses:
                    update.delete(record.target, _address_rdata(address))
                update.use_tsig(self.key)
                return update

            try:
                self._send(build, what, None, budget)
                return
            except RegistrationRejected as exc:
                if exc.rcode not in ("NXRRSET", "YXRRSET"):
                    raise
                log.debug("%s: the SRV RRset changed meanwhile; looking again", what)

    def _asked(self) -> str:
        return ", ".join(str(ns) for ns in self.nameservers)

    def _send(
        self,
        build: Callable[[], dns.message.Message],
        what: str,
        stop: threading.Event | None,
        budget: float | None = None,
    ) -> Accepted:
        """Send what ``build`` makes until accepted, rejected or out of budget."""
        budget = self.budget if budget is None else budget
        stopped = stop or threading.Event()
        deadline = time.monotonic() + budget
        reasons: list[str] = []

        def attempt() -> Accepted:
            for nameserver in self.nameservers:
                # Rebuilt each time: a fresh id and a fresh TSIG time.
                query = build()
                wire = query.to_wire()
                try:
                    timeout = min(self.timeout, deadline - time.monotonic())
                    reply = _exchange(wire, nameserver, max(0.05, timeout))
                except (OSError, TimeoutError) as exc:
                    reasons.append(f"{nameserver} {type(exc).__name__}: {exc}")
                    continue
                verdict = read_reply(query, reply)
                if isinstance(verdict, Accepted):
                    return verdict
                if isinstance(verdict, Rejected):
                    raise RegistrationRejected(
                        f"{nameserver} refused update {what}: {verdict.reason}",
                        verdict.rcode,
                        verdict.tsig_error,
                    )
                reasons.append(f"{nameserver} {verdict.reason}")
                log.warning(
                    "update %s: %s %s; retrying", what, nameserver, verdict.reason
                )
            raise _Retry()

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retry),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=4.0),
            stop=tenacity.stop_any(
                tenacity.stop_after_delay(budget),
                tenacity.stop_when_event_set(stopped),
            ),
            # Sleep on the event, so close() cuts a backoff short.
            sleep=lambda seconds: _wait(stopped, seconds),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Retry:
            raise RegistrationError(
                f"no nameserver accepted update {what} within {budget:.1f} s: "
                + "; ".join(reasons[-len(self.nameservers) :])
            ) from None


class Registration:
    """One live registration; renews in a background thread until closed."""

    def __init__(
        self,
        registrar: Registrar,
        record: Record,
        granted: int | None,
        renew: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.registrar = registrar
        self.record = record
        self.lease = float(granted) if granted else registrar.lease
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if renew:
            self._thread = threading.Thread(
                target=self._renew_loop,
                name=f"srvmesh-renew {record.srv_name}",
                daemon=True,
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"<Registration {self.record.describe()} lease={self.lease:g}s>"

    def __enter__(self) -> Registration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def renewing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _renew_loop(self) -> None:
        delay = renewal_delay(self.lease, self._rng)
        while not self._stop.wait(delay):
            try:
                granted = self.registrar.add(self.record, self._stop)
            except RegistrationRejected as exc:
                # Nobody to raise to from here: say so loudly and keep trying,
                # in case an operator fixes the key while we run.
                log.error("renewal of %s rejected: %s", self.record.describe(), exc)
                delay = max(1.0, self.lease * RETRY_FRACTION)
                continue
            except RegistrationError as exc:
                log.warning("renewal of %s failed: %s", self.record.describe(), exc)
                delay = max(1.0, self.lease * RETRY_FRACTION)
                continue
            if granted:
                self.lease = float(granted)
            log.debug("renewed %s, lease %g s", self.record.describe(), self.lease)
            delay = renewal_delay(self.lease, self._rng)

    def close(self, timeout: float = 2.0) -> None:
        """Stop renewing and delete the records, within about ``timeout`` s.

        Idempotent. A failed delete is logged, not raised: the lease (on the
        bundled responder) removes the records anyway.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout / 2)
        try:
            self.registrar._withdraw(self.record, max(0.1, deadline - time.monotonic()))
        except RegistrationError as exc:
            log.warning("could not delete %s: %s", self.record.describe(), exc)
