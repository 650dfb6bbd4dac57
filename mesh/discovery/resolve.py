"""SRV resolution for clients: ask the configured nameservers, cache, order.

Theory of operation. A resolution is written once, as a generator
(:func:`_resolution`) that yields the questions it needs answered and
receives either a response message or a :class:`_Failure` naming what every
nameserver did. It never touches a socket or a clock, so the blocking
:class:`Resolver` and the asyncio :class:`AsyncResolver` drive the same code,
and the tests drive it with fabricated responses. :class:`_Attempts` decides
which nameserver to ask next and for how long, from the deadline and ``now``.
:class:`ResolverCore` holds the cache and turns a cached answer into targets
in RFC 2782 order; it takes ``now`` as an argument everywhere.

Rules this module keeps, with the failure modes they answer:

- Queries go only to the configured ``host:port`` nameservers, never to the
  system resolver or dnspython's module default (C14).
- Names are absolute before the first query, so no search domain is tried.
- NXDOMAIN, NODATA, "not offered", SERVFAIL and silence are distinct errors
  (C10); a NODATA reply is final and is not retried on the next nameserver.
  When no nameserver gave a usable answer and time is left, the question is
  asked again after an exponential, jittered backoff (tenacity), never past
  the resolution's deadline, so a briefly failing responder does not fail
  the resolution and a dead one still fails within the lifetime (C10, C14).
- A cached answer is never served past its TTL (C20), except as serve-stale:
  when no nameserver answers, the last good answer is used for
  ``stale_grace`` seconds with a warning (RFC 8767 in spirit). After a failed
  resolution DNS is asked again only every ``stale_refresh`` seconds, and by
  one caller at a time; everyone else gets the stale answer at once, so an
  outage does not make every new Hit wait out the resolver's lifetime.
- ADDITIONAL address records are matched to SRV targets by DNS name
  equality, which is case-insensitive (C15); a target that is an alias
  (CNAME) is refused, as RFC 2782 forbids it (C13).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import threading
import time
import typing
from collections.abc import Callable, Generator, Sequence

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.rrset
import tenacity

from mesh.config import format_hostport, parse_hostport
from mesh.discovery.names import absolute_name
from mesh.errors import (
    ConfigError,
    DiscoveryServerFailure,
    DiscoveryTimeout,
    DiscoveryUnavailable,
    NameNotFound,
    NoServiceRecords,
    ServiceNotAvailable,
    ServiceNotFound,
)

__all__ = ["AsyncResolver", "Resolver", "ResolverCore", "Target"]

log = logging.getLogger(__name__)

# Negative answers are cached for the SOA minimum (RFC 2308), but never longer
# than this: a client that asked just before a server registered must see it
# soon. Five seconds matches the default SRV TTL.
NEGATIVE_TTL_CAP = 5.0

# A cached entry expires up to this fraction of its TTL early, at random, so
# that clients which resolved together do not all re-query together (C20).
# Early is safe; late would serve an answer older than its TTL.
TTL_JITTER = 0.1

# When a target's address lookup failed for lack of an answer, the resolution
# is cached only this long, so the target comes back as soon as DNS does.
PARTIAL_ANSWER_TTL = 1.0

# While serving stale, how often DNS is asked again (RFC 8767 section 5 calls
# this the failure recheck timer and suggests 30 s). We use the default SRV
# TTL instead: a recovered responder is then noticed about as fast as a
# changed record would be, at the price of one caller per period waiting for
# the resolver's lifetime.
STALE_REFRESH = 5.0

# Backoff between rounds of asking after every nameserver failed (C10): full
# jitter, doubling from up to 0.1 s to at most 1 s. A responder that
# SERVFAILs while it restarts is usually back within a second; the cap keeps
# several more rounds inside the default 5 s lifetime.
BACKOFF_MULTIPLIER = 0.1
BACKOFF_MAX = 1.0

# Big enough for a few dozen SRV targets with their addresses, small enough to
# avoid IP fragmentation (the DNS flag day 2020 value).
EDNS_PAYLOAD = 1232

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_FAILED_RCODES = frozenset(
    {dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR}
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One address of one SRV target, in the order a client should try them."""

    host: str
    port: int
    name: str
    priority: int
    weight: int

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint; IPv6 addresses are always bracketed (C21)."""
        if ":" in self.host:
            return f"tcp://[{self.host}]:{self.port}"
        return f"tcp://{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Nameserver:
    """A configured nameserver: an IP address and a port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Nameserver:
        host, port = parse_hostport(text, default_port=53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # Looking the nameserver itself up would go through the system
            # resolver, which is exactly what C14 forbids.
            raise ConfigError(
                f"nameserver {text!r} is not an IP address. "
                "Give it as 127.0.0.1:5353 or [::1]:5353."
            ) from None
        return cls(host, port)

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


# ---------------------------------------------------------------------------
# Which nameserver next, for how long


@dataclasses.dataclass
class _Failure:
    """No nameserver gave a usable answer; ``errors`` says what each did."""

    errors: list[tuple[str, str]]
    server_failure: bool


class _Attempts:
    """Hands out (nameserver, timeout) pairs until one answers or time runs out.

    Nameservers are asked in the configured order, round after round, until
    the deadline. One that answers SERVFAIL/REFUSED or cannot be reached is
    not asked again in this resolution. In each round the remaining time is
    shared among the servers not yet asked, so a dead first server cannot use
    up the whole lifetime before the second is tried (C14).
    """

    def __init__(
        self, nameservers: Sequence[Nameserver], timeout: float, deadline: float
    ) -> None:
        self.nameservers = list(nameservers)
        self.timeout = timeout
        self.deadline = deadline
        self.errors: list[tuple[str, str]] = []
        self._dropped: set[Nameserver] = set()
        self._round: list[Nameserver] = []
        self._server_failure = False

    def next(self, now: float) -> tuple[Nameserver, float] | None:
        remaining = self.deadline - now
        if remaining <= 0:
            return None
        if not self._round:
            self._round = [ns for ns in self.nameservers if ns not in self._dropped]
            if not self._round:
                return None
        nameserver = self._round.pop(0)
        share = remaining / (len(self._round) + 1)
        return nameserver, min(self.timeout, share)

    def timed_out(self, nameserver: Nameserver, waited: float) -> None:
        self.errors.append((str(nameserver), f"no answer in {waited:.2f} s"))

    def unreachable(self, nameserver: Nameserver, reason: str) -> None:
        self.errors.append((str(nameserver), reason))
        self._dropped.add(nameserver)

    def failed(self, nameserver: Nameserver, rcode: str) -> None:
        self.errors.append((str(nameserver), f"answered {rcode}"))
        self._dropped.add(nameserver)
        self._server_failure = True

    def failure(self) -> _Failure:
        return _Failure(self.errors, self._server_failure)


def _check_response(
    attempts: _Attempts, nameserver: Nameserver, response: dns.message.Message
) -> bool:
    """Record a failing rcode and say whether the response is an answer."""
    rcode = response.rcode()
    if rcode in _FAILED_RCODES:
        attempts.failed(nameserver, dns.rcode.to_text(rcode))
        return False
    if not isinstance(response, dns.message.QueryMessage):
        attempts.failed(nameserver, "a reply that is not a query response")
        return False
    try:
        response.resolve_chaining()
    except dns.exception.DNSException as exc:
        # A CNAME loop, or an answer alongside NXDOMAIN: a broken server.
        attempts.failed(nameserver, f"a malformed answer ({exc})")
        return False
    return True


def _make_query(
    qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.message.Message:
    # RD off: we ask the authority directly and want no recursion on our
    # behalf; answers from a recursive server still come back fine.
    query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    query.flags &= ~dns.flags.RD
    return query


# ---------------------------------------------------------------------------
# The resolution itself, without I/O

_Question = tuple[dns.name.Name, dns.rdatatype.RdataType]
_Reply = dns.message.Message | _Failure


@dataclasses.dataclass(frozen=True)
class _ServiceAnswer:
    """A usable SRV RRset and the targets behind each of its records."""

    rdataset: dns.rdataset.Rdataset
    # Keyed by id() of the rdata object inside ``rdataset``: processing_order()
    # returns those same objects, and id() is far cheaper than rdata hashing.
    targets: dict[int, tuple[Target, ...]]
    ttl: float

    def ordered(self) -> list[Target]:
        """Targets in RFC 2782 order: priority, then a weighted shuffle.

        ``processing_order`` draws from the global ``random`` module, so tests
        seed that. Weight 0 records get a small nonzero weight there, which is
        RFC 2782's "very small chance of being selected".
        """
        out: list[Target] = []
        for rdata in self.rdataset.processing_order():
            out.extend(self.targets[id(rdata)])
        return out


@dataclasses.dataclass(frozen=True)
class _Negative:
    """A cached NXDOMAIN, NODATA, "not offered" or "no usable target"."""

    kind: type[ServiceNotFound] | type[ServiceNotAvailable]
    message: str
    ttl: float


class _ResolutionError(Exception):
    """Carries a negative outcome out of the generator, with its cache TTL."""

    def __init__(self, negative: _Negative) -> None:
        super().__init__(negative.message)
        self.negative = negative


class _Unavailable(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__("unavailable")
        self.failure = failure


def _is_usable_address(text: str, target: dns.name.Name) -> bool:
    address = ipaddress.ip_address(text)
    if address.is_link_local or address.is_unspecified or address.is_multicast:
        # A link-local address needs a scope id DNS cannot carry (C21).
        log.warning("skipping address %s of SRV target %s: not routable", text, target)
        return False
    return True


def _addresses_in(
    message: dns.message.Message, section: list[dns.rrset.RRset], name: dns.name.Name
) -> tuple[list[str], float] | None:
    """Addresses for ``name`` in a section, v4 first, with their lowest TTL.

    ``None`` means the section says nothing about the name. Name equality in
    dnspython ignores case, which is what C15 needs.
    """
    found: list[str] = []
    ttl = float("inf")
    seen = False
    for rdtype in _ADDRESS_TYPES:
        try:
            rrset = message.find_rrset(section, name, dns.rdataclass.IN, rdtype)
        except KeyError:
            continue
        seen = True
        ttl = min(ttl, rrset.ttl)
        found.extend(rd.address for rd in rrset)
    return (found, ttl) if seen else None


def _chaining(reply: dns.message.Message) -> dns.message.ChainingResult:
    # Replies to queries are parsed as QueryMessage, the class that knows how
    # to follow CNAMEs and find the negative-caching TTL (RFC 2308).
    # _check_response has already refused any reply this would fail on.
    return typing.cast(dns.message.QueryMessage, reply).resolve_chaining()


def _has_cname(
    message: dns.message.Message, section: list[dns.rrset.RRset], name: dns.name.Name
) -> bool:
    try:
        message.find_rrset(section, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
    except KeyError:
        return False
    return True


def _resolution(
    qname: dns.name.Name, negative_ttl_cap: float
) -> Generator[_Question, _Reply, _ServiceAnswer]:
    """Resolve one SRV name to a :class:`_ServiceAnswer`.

    Yields questions and receives replies. Raises :class:`_ResolutionError`
    for a final negative answer and :class:`_Unavailable` when the SRV query
    itself got no usable answer.
    """
    reply = yield (qname, dns.rdatatype.SRV)
    if isinstance(reply, _Failure):
        raise _Unavailable(reply)
    chain = _chaining(reply)
    negative_ttl = min(float(chain.minimum_ttl), negative_ttl_cap)
    if reply.rcode() == dns.rcode.NXDOMAIN:
        raise _ResolutionError(
            _Negative(NameNotFound, f"no such name {qname} (NXDOMAIN)", negative_ttl)
        )
    srv_rrset = chain.answer
    if srv_rrset is None or len(srv_rrset) == 0:
        raise _ResolutionError(
            _Negative(NoServiceRecords, f"{qname} has no SRV records", negative_ttl)
        )
    ttl = float(srv_rrset.ttl)
    records = [rd for rd in srv_rrset if isinstance(rd, dns.rdtypes.IN.SRV.SRV)]
    offered = [rd for rd in records if rd.target != dns.name.root]
    if not offered:
        # RFC 2782: a lone "." target means "decidedly not available here".
        raise _ResolutionError(
            _Negative(
                ServiceNotAvailable,
                f"{qname} is not offered here (SRV target '.')",
                ttl,
            )
        )
    usable = dns.rdataset.Rdataset(dns.rdataclass.IN, dns.rdatatype.SRV)
    targets: dict[int, tuple[Target, ...]] = {}
    addresses_by_name: dict[dns.name.Name, list[str] | None] = {}
    for rd in offered:
        if rd.target not in addresses_by_name:
            found, address_ttl, lookup_failed = yield from _target_addresses(
                reply, rd.target
            )
            addresses_by_name[rd.target] = found
            ttl = min(ttl, address_ttl)
            if lookup_failed:
                ttl = min(ttl, PARTIAL_ANSWER_TTL)
        addresses = addresses_by_name[rd.target]
        if not addresses:
            continue
        usable.add(rd)
        targets[id(rd)] = tuple(
            Target(a, rd.port, rd.target.to_text(), rd.priority, rd.weight)
            for a in addresses
        )
    if not targets:
        raise _ResolutionError(
            _Negative(
                ServiceNotFound,
                f"no SRV target of {qname} has a usable address",
                min(ttl, negative_ttl_cap),
            )
        )
    return _ServiceAnswer(usable, targets, ttl)


def _target_addresses(
    srv_reply: dns.message.Message, target: dns.name.Name
) -> Generator[_Question, _Reply, tuple[list[str] | None, float, bool]]:
    """(usable addresses or None, their TTL, whether a lookup went unanswered)."""
    if _has_cname(srv_reply, srv_reply.additional, target):
        log.warning("skipping SRV target %s: it is an alias (CNAME)", target)
        return None, float("inf"), False
    glue = _addresses_in(srv_reply, srv_reply.additional, target)
    if glue is not None:
        found, ttl = glue
        return [a for a in found if _is_usable_address(a, target)], ttl, False
    # No address in ADDITIONAL: ask for the target's A and AAAA ourselves.
    found = []
    ttl = float("inf")
    failed = False
    for rdtype in _ADDRESS_TYPES:
        reply = yield (target, rdtype)
        if isinstance(reply, _Failure):
            failed = True
            log.warning(
                "no answer for %s %s: %s",
                target,
                dns.rdatatype.to_text(rdtype),
                "; ".join(f"{ns} {what}" for ns, what in reply.errors),
            )
            continue
        if _has_cname(reply, reply.answer, target):
            log.warning("skipping SRV target %s: it is an alias (CNAME)", target)
            return None, float("inf"), False
        answer = _addresses_in(reply, reply.answer, target)
        if answer is None:
            ttl = min(ttl, float(_chaining(reply).minimum_ttl))
            continue
        ttl = min(ttl, answer[1])
        found.extend(a for a in answer[0] if _is_usable_address(a, target))
    if not found:
        log.warning("skipping SRV target %s: it has no address", target)
    return found, ttl, failed


# ---------------------------------------------------------------------------
# The cache and the error mapping


@dataclasses.dataclass
class _Entry:
    value: _ServiceAnswer | _Negative
    fresh_until: float
    stale_until: float
    # Non-zero once a resolution failed and the stale answer is being served:
    # until then, callers get it without asking DNS.
    stale_hold_until: float = 0.0


class ResolverCore:
    """The cache and error mapping shared by both resolvers; no I/O, no clock.

    Every method takes ``now`` (a ``time.monotonic()`` value). Thread-safe.
    """

    def __init__(
        self,
        nameservers: Sequence[str],
        zone: str = "mesh.internal.",
        stale_grace: float = 60.0,
        negative_ttl_cap: float = NEGATIVE_TTL_CAP,
        rng: random.Random | None = None,
        stale_refresh: float = STALE_REFRESH,
    ) -> None:
        if not nameservers:
            raise ConfigError("no nameservers configured. Set MESH_NAMESERVERS.")
        self.nameservers = [Nameserver.parse(ns) for ns in nameservers]
        self.zone = dns.name.from_text(zone)
        self.stale_grace = stale_grace
        self.stale_refresh = stale_refresh
        self.negative_ttl_cap = negative_ttl_cap
        self._rng = rng or random.Random()
        self._entries: dict[dns.name.Name, _Entry] = {}
        self._lock = threading.Lock()

    @property
    def asked(self) -> list[str]:
        return [str(ns) for ns in self.nameservers]

    def qname(self, name: str | dns.name.Name) -> dns.name.Name:
        return absolute_name(name, self.zone)

    def cached(self, qname: dns.name.Name, now: float) -> list[Target] | None:
        """Ordered targets from a fresh cache entry, or ``None`` on a miss.

        Raises the cached error for a fresh negative entry. While a stale
        answer is being served, returns it until the next recheck is due;
        the caller that sees ``None`` then is the one that asks DNS, and the
        hold moves on so that concurrent callers keep the stale answer.
        """
        with self._lock:
            entry = self._entries.get(qname)
            if entry is None:
                return None
            if now < entry.fresh_until:
                return self._outcome(qname, entry.value)
            if not entry.stale_hold_until or now >= entry.stale_until:
                return None
            if now >= entry.stale_hold_until:
                entry.stale_hold_until = now + self.stale_refresh
                return None
        assert isinstance(entry.value, _ServiceAnswer)
        return entry.value.ordered()

    def stale(self, qname: dns.name.Name, now: float) -> list[Target] | None:
        """Ordered targets from the last good answer, if within the grace.

        Starts (or extends) the hold during which :meth:`cached` serves it.
        """
        with self._lock:
            entry = self._entries.get(qname)
            if entry is None or not isinstance(entry.value, _ServiceAnswer):
                return None
            if now >= entry.stale_until:
                return None
            entry.stale_hold_until = now + self.stale_refresh
        return entry.value.ordered()

    def store(
        self, qname: dns.name.Name, value: _ServiceAnswer | _Negative, now: float
    ) -> None:
        ttl = max(0.0, value.ttl)
        fresh_until = now + ttl - self._rng.uniform(0.0, TTL_JITTER * ttl)
        with self._lock:
            previous = self._entries.get(qname)
            if isinstance(value, _ServiceAnswer):
                stale_until = now + ttl + self.stale_grace
            elif previous is not None and isinstance(previous.value, _ServiceAnswer):
                # An authoritative "gone" ends serve-stale for the old answer.
                stale_until = fresh_until
            else:
                stale_until = fresh_until
            self._entries[qname] = _Entry(value, fresh_until, stale_until)

    def forget(self, qname: dns.name.Name) -> None:
        with self._lock:
            self._entries.pop(qname, None)

    def _outcome(
        self, qname: dns.name.Name, value: _ServiceAnswer | _Negative
    ) -> list[Target]:
        if isinstance(value, _ServiceAnswer):
            return value.ordered()
        raise value.kind(
            value.message + f" (asked {', '.join(self.asked)})", str(qname), self.asked
        )

    def unavailable(
        self, qname: dns.name.Name, failure: _Failure
    ) -> DiscoveryUnavailable:
        """The error for a resolution no nameserver answered."""
        detail = (
            "; ".join(f"{ns} {what}" for ns, what in failure.errors) or "no time left"
        )
        kind: type[DiscoveryUnavailable]
        if failure.server_failure:
            kind = DiscoveryServerFailure
        else:
            kind = DiscoveryTimeout
        return kind(f"cannot resolve {qname}: {detail}", str(qname), self.asked)

    def finish(
        self,
        qname: dns.name.Name,
        outcome: _ServiceAnswer | _ResolutionError | _Unavailable,
        now: float,
    ) -> list[Target]:
        """Cache what a resolution found and return targets or raise."""
        if isinstance(outcome, _Unavailable):
            stale = self.stale(qname, now)
            error = self.unavailable(qname, outcome.failure)
            if stale is not None:
                log.warning(
                    "%s; serving the last good answer for %s, asking again in %.0f s",
                    error,
                    qname,
                    self.stale_refresh,
                )
                return stale
            raise error
        value = outcome.negative if isinstance(outcome, _ResolutionError) else outcome
        self.store(qname, value, now)
        return self._outcome(qname, value)


# ---------------------------------------------------------------------------
# The two drivers


def _backoff(
    question: _Question, deadline: float, clock: Callable[[], float]
) -> dict[str, typing.Any]:
    """tenacity settings shared by both drivers for re-asking ``question``.

    Only a :class:`_Failure` is retried. A round that ends in timeouts has
    already used the time up to ``deadline``, so in practice the retries
    follow fast failures: SERVFAIL, REFUSED, a refused port. Stopping before
    a sleep that would reach ``deadline`` keeps the lifetime bound (C14);
    the last failure is then returned as the reply.
    """
    qname, rdtype = question

    def stop(state: tenacity.RetryCallState) -> bool:
        return clock() + state.upcoming_sleep >= deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        failure = state.outcome.result() if state.outcome else None
        detail = (
            "; ".join(f"{ns} {what}" for ns, what in failure.errors)
            if isinstance(failure, _Failure)
            else "no answer"
        )
        log.debug(
            "%s %s: %s; asking again in %.2f s",
            qname,
            dns.rdatatype.to_text(rdtype),
            detail,
            state.upcoming_sleep,
        )

    return {
        "retry": tenacity.retry_if_result(lambda reply: isinstance(reply, _Failure)),
        "wait": tenacity.wait_random_exponential(
            multiplier=BACKOFF_MULTIPLIER, max=BACKOFF_MAX
        ),
        "stop": stop,
        "before_sleep": before_sleep,
        "retry_error_callback": lambda state: state.outcome.result(),
    }


class Resolver:
    """Blocking SRV resolver with a TTL cache; share one between threads.

    ``timeout`` bounds one query to one nameserver, ``lifetime`` the whole
    resolution (SRV plus any address lookups). ``stale_grace`` is how long
    the last good answer is used while no nameserver answers, and
    ``stale_refresh`` how often DNS is asked again meanwhile.
    """

    def __init__(
        self,
        nameservers: Sequence[str],
        timeout: float = 2.0,
        lifetime: float = 5.0,
        stale_grace: float = 60.0,
        zone: str = "mesh.internal.",
        negative_ttl_cap: float = NEGATIVE_TTL_CAP,
        clock: Callable[[], float] = time.monotonic,
        stale_refresh: float = STALE_REFRESH,
    ) -> None:
        self.core = ResolverCore(
            nameservers,
            zone,
            stale_grace,
            negative_ttl_cap,
            stale_refresh=stale_refresh,
        )
        self.timeout = timeout
        self.lifetime = lifetime
        self._clock = clock

    def resolve(self, srv_name: str | dns.name.Name) -> list[Target]:
        """Targets of ``srv_name`` in the order to try them.

        Raises :class:`~mesh.errors.NameNotFound`,
        :class:`~mesh.errors.NoServiceRecords`,
        :class:`~mesh.errors.ServiceNotAvailable`,
        :class:`~mesh.errors.DiscoveryTimeout` or
        :class:`~mesh.errors.DiscoveryServerFailure`.
        """
        qname = self.core.qname(srv_name)
        cached = self.core.cached(qname, self._clock())
        if cached is not None:
            return cached
        deadline = self._clock() + self.lifetime
        steps = _resolution(qname, self.core.negative_ttl_cap)
        outcome: _ServiceAnswer | _ResolutionError | _Unavailable
        try:
            question = next(steps)
            while True:
                question = steps.send(self._ask(question, deadline))
        except StopIteration as stop:
            outcome = stop.value
        except (_ResolutionError, _Unavailable) as exc:
            outcome = exc
        return self.core.finish(qname, outcome, self._clock())

    def forget(self, srv_name: str | dns.name.Name) -> None:
        """Drop the cached answer, e.g. after every target failed."""
        self.core.forget(self.core.qname(srv_name))

    def _ask(self, question: _Question, deadline: float) -> _Reply:
        retrying = tenacity.Retrying(
            sleep=time.sleep, **_backoff(question, deadline, self._clock)
        )
        reply: _Reply = retrying(self._ask_once, question, deadline)
        return reply

    def _ask_once(self, question: _Question, deadline: float) -> _Reply:
        qname, rdtype = question
        attempts = _Attempts(self.core.nameservers, self.timeout, deadline)
        while (step := attempts.next(self._clock())) is not None:
            nameserver, timeout = step
            query = _make_query(qname, rdtype)
            log.debug(
                "asking %s for %s %s", nameserver, qname, dns.rdatatype.to_text(rdtype)
            )
            try:
                response = self._exchange(query, nameserver, timeout)
            except dns.exception.Timeout:
                attempts.timed_out(nameserver, timeout)
                continue
            except (OSError, dns.exception.DNSException, ValueError) as exc:
                attempts.unreachable(nameserver, f"{type(exc).__name__}: {exc}")
                continue
            if _check_response(attempts, nameserver, response):
                return response
        return attempts.failure()

    def _exchange(
        self, query: dns.message.Message, nameserver: Nameserver, timeout: float
    ) -> dns.message.Message:
        # dnspython's udp_with_fallback gives the TCP retry a fresh timeout;
        # here UDP and TCP share one, so an attempt never overruns its share
        # of the lifetime (C14).
        deadline = self._clock() + timeout
        response = dns.query.udp(
            query, nameserver.host, timeout=timeout, port=nameserver.port
        )
        if not response.flags & dns.flags.TC:
            return response
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise dns.exception.Timeout(timeout=timeout)  # type: ignore[no-untyped-call]
        log.debug(
            "%s truncated the answer for %s; asking over TCP",
            nameserver,
            query.question[0].name,
        )
        return dns.query.tcp(
            query, nameserver.host, timeout=remaining, port=nameserver.port
        )


class AsyncResolver:
    """The asyncio twin of :class:`Resolver`: same rules, same cache core."""

    def __init__(
        self,
        nameservers: Sequence[str],
        timeout: float = 2.0,
        lifetime: float = 5.0,
        stale_grace: float = 60.0,
        zone: str = "mesh.internal.",
        negative_ttl_cap: float = NEGATIVE_TTL_CAP,
        clock: Callable[[], float] = time.monotonic,
        stale_refresh: float = STALE_REFRESH,
    ) -> None:
        self.core = ResolverCore(
            nameservers,
            zone,
            stale_grace,
            negative_ttl_cap,
            stale_refresh=stale_refresh,
        )
        self.timeout = timeout
        self.lifetime = lifetime
        self._clock = clock

    async def resolve(self, srv_name: str | dns.name.Name) -> list[Target]:
        """See :meth:`Resolver.resolve`."""
        qname = self.core.qname(srv_name)
        cached = self.core.cached(qname, self._clock())
        if cached is not None:
            return cached
        deadline = self._clock() + self.lifetime
        steps = _resolution(qname, self.core.negative_ttl_cap)
        outcome: _ServiceAnswer | _ResolutionError | _Unavailable
        try:
            question = next(steps)
            while True:
                question = steps.send(await self._ask(question, deadline))
        except StopIteration as stop:
            outcome = stop.value
        except (_ResolutionError, _Unavailable) as exc:
            outcome = exc
        return self.core.finish(qname, outcome, self._clock())

    def forget(self, srv_name: str | dns.name.Name) -> None:
        self.core.forget(self.core.qname(srv_name))

    async def _ask(self, question: _Question, deadline: float) -> _Reply:
        retrying = tenacity.AsyncRetrying(
            sleep=asyncio.sleep, **_backoff(question, deadline, self._clock)
        )
        reply: _Reply = await retrying(self._ask_once, question, deadline)
        return reply

    async def _ask_once(self, question: _Question, deadline: float) -> _Reply:
        qname, rdtype = question
        attempts = _Attempts(self.core.nameservers, self.timeout, deadline)
        while (step := attempts.next(self._clock())) is not None:
            nameserver, timeout = step
            query = _make_query(qname, rdtype)
            try:
                # dnspython's own timeout covers each of UDP and TCP; the
                # wait_for bounds the pair so one attempt cannot overrun.
                response, _ = await asyncio.wait_for(
                    dns.asyncquery.udp_with_fallback(
                        query, nameserver.host, timeout=timeout, port=nameserver.port
                    ),
                    timeout,
                )
            except (dns.exception.Timeout, TimeoutError):
                attempts.timed_out(nameserver, timeout)
                continue
            except (OSError, dns.exception.DNSException, ValueError) as exc:
                attempts.unreachable(nameserver, f"{type(exc).__name__}: {exc}")
                continue
            if _check_response(attempts, nameserver, response):
                return response
        return attempts.failure()
