"""The host master: one of the pool's own members, relaying broadcasts.

The member that wins the election (:mod:`mesh.pool.election`) runs a
:class:`Master` on one more thread of its process. It binds two ROUTER
sockets on ephemeral ports of its host address: one for the members of its
host, one for the masters of other hosts. It reaches every other master
through one DEALER per endpoint, learnt from DNS (``_master._tcp.<pool>``,
re-resolved on a timer and whenever a peer is lost) and from the heartbeats
peers send, which carry their endpoint: a new master announces itself to all
the others at once instead of waiting for their next DNS lookup.

Routing a broadcast
-------------------
The issuing member's master (the *origin*) sends ``FWD`` to every live peer,
tells the issuer which hosts it forwarded to (``hosts``), then queues the
request for its own members and lists them (``expect``). A peer master does
the same for its members and sends its ``expect`` back to the origin. Each
member's ``WORKING``/``REPLY``/``FAILED`` goes to its master, which relays it
to the origin, which relays it to the issuer. Every master keeps a route per
broadcast id until the broadcast's deadline (a master that only serves its
own members drops it as soon as they have all answered), so an answer for an
expired or unknown id has nowhere to go and is dropped.

Sends never drop silently: the member ROUTER has ``ROUTER_MANDATORY`` on and
every send is non-blocking, so an unknown identity (EHOSTUNREACH) or a full
queue (EAGAIN) turns into an ``undeliverable`` outcome at once. A peer that
stops heartbeating is declared lost after the liveness window and every open
broadcast that counted on it hears ``host_lost``.

Wire format (multipart): ``[kind, json header, payload?]``; from members the
ROUTER prepends their identity (the member id). Events towards the issuer are
``[EV, broadcast id, (json header, payload)...]``: one or more events of one
broadcast. With the id in a frame of its own, the origin master and the
issuing member route them without parsing any header, and the origin relays
a peer's events unchanged. A master gathers the events of each broadcast
while it works through what arrived and sends them together before it waits
again, so answers that arrive together travel as one message.

Status
------
Anyone may send ``[STATUS, {}]`` to a master's peer endpoint (the one in
DNS) and gets ``[STATUS, json]`` back on the same connection: the master's
record, its members with how long ago each was heard, and the peers it knows.
It changes nothing, so ``mesh status`` can ask every master it finds;
:func:`query_status` is that client.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from mesh.curve import Curve, warn_if_exposed
from mesh.pool.directory import MasterDirectory, zmq_endpoint
from mesh.pool.election import Election, MasterRecord, process_start_time
from mesh.pool.tracker import MemberInfo

__all__ = ["Master", "decode", "encode", "query_status", "recv_nowait", "send_nowait"]

log = logging.getLogger(__name__)

# How often the master asks DNS for its peers when nothing else prompts it.
# A new peer announces itself by heartbeat, so this only catches peers that
# have not heard of us yet; a guess that keeps DNS traffic low.
RESOLVE_INTERVAL = 2.0
# Routes outlive their broadcast's deadline by this much so the last relays
# still find their way; afterwards anything for that id is dropped.
ROUTE_GRACE = 1.0
# A broadcast's timeout comes from the wire, so it is clamped: a route lives
# that long and holds one of the max_pending_broadcasts slots. An hour is far
# beyond any gather a caller waits on, and short enough that a forged or
# mistaken timeout frees its slot eventually.
MAX_BROADCAST_TIMEOUT = 3600.0
# Masters of other hosts one master keeps. Each costs a DEALER socket (a file
# descriptor, out of the context's 1023 by default), so unauthenticated
# heartbeats must not add them without end; far more hosts than one pool has.
MAX_PEERS = 256
# A lost peer is forgotten after this long unless DNS still lists it: until
# then every broadcast reports its host unreachable, which is the truth for a
# while after a crash but noise once the host is decommissioned.
FORGET_PEER_AFTER = 5 * RESOLVE_INTERVAL
# Every header the master parses is a few hundred bytes; a bigger one is not
# from the pool and is refused before JSON spends time or memory on it.
MAX_HEADER_SIZE = 64 * 1024
# How often, at most, dropped wire messages are summarised at WARNING: a flood
# of garbage must not turn into a flood of log lines.
DROP_WARNING_INTERVAL = 10.0


def encode(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def decode(frame: bytes) -> dict[str, Any]:
    try:
        value = json.loads(frame)
    except RecursionError:
        # Deeply nested arrays exhaust the parser's stack; as bad as any
        # other malformed header, and the caller handles ValueError.
        raise ValueError(f"header {frame[:40]!r} is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"header {frame[:40]!r} is not a JSON object")
    return value


# pyzmq's send_multipart combines IntFlag members for every frame and its
# recv_multipart asks RCVMORE through getsockopt, which looks the option up
# as an enum; each builds an enum value per frame. On a broadcast's relay
# path that was about a sixth of the masters' time. Plain ints and the
# frame's own ``more`` flag skip it.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


def send_nowait(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """``send_multipart(frames, NOBLOCK)`` without the enum arithmetic.

    Raises :class:`zmq.Again` or :class:`zmq.ZMQError` as it would. libzmq
    queues a multipart message whole or not at all, so only the first frame
    can fail.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK if i == last else _MORE_NOBLOCK)


def recv_nowait(sock: zmq.Socket[bytes]) -> list[bytes]:
    """``recv_multipart(NOBLOCK)``, faster; raises :class:`zmq.Again` when empty."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


# What parsing a message from the wire may raise; any of them drops that one
# message and nothing else. OverflowError covers int() of an infinite float.
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, ArithmeticError)


def _header(frames: list[bytes], index: int) -> dict[str, Any]:
    if len(frames) <= index:
        raise IndexError(f"{frames[1][:20]!r} message has no header frame")
    frame = frames[index]
    if len(frame) > MAX_HEADER_SIZE:
        raise ValueError(f"header of {len(frame)} bytes is over {MAX_HEADER_SIZE}")
    return decode(frame)


def _need(frames: list[bytes], count: int) -> None:
    # Check before acting, so a short message changes no state at all.
    if len(frames) < count:
        raise IndexError(f"{frames[1][:20]!r} message has {len(frames)} frames")


def wire_timeout(value: object) -> float:
    """A broadcast timeout from the wire, clamped to ``[0, MAX_BROADCAST_TIMEOUT]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout {value!r} is not a number")
    timeout = float(value)
    if not math.isfinite(timeout):
        # inf never expires and NaN compares false with every deadline.
        raise ValueError(f"timeout {value!r} is not finite")
    return min(max(timeout, 0.0), MAX_BROADCAST_TIMEOUT)


def wire_epoch(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"epoch {value!r} is not a non-negative integer")
    return value


def wire_host(value: object) -> str:
    """A master's host from the wire: an IP address, as masters register them."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"host {str(value)[:80]!r} is not an IP address")
    ipaddress.ip_address(value)
    return value


def wire_endpoint(host: str, value: object) -> str:
    """A peer endpoint from the wire: ``tcp://<host>:<port>`` of the sender's host.

    A master's peer endpoint is always on its own host address, so anything
    else (another scheme, a name libzmq would resolve on its I/O thread, a
    port out of range) is not from a master and would only make
    ``connect`` raise or dial somewhere the sender chose.
    """
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise ValueError(f"endpoint {str(value)[:80]!r} is not tcp://host:port")
    _, sep, port = value[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {value[:80]!r} has no valid port")
    if zmq_endpoint(host, int(port)) != value:
        raise ValueError(f"endpoint {value[:80]!r} is not on host {host!r}")
    return value


class _QueueFull(str):
    """A send error that may clear by itself: the peer's queue is full."""


@dataclasses.dataclass
class _LocalMember:
    info: MemberInfo
    last_heard: float


@dataclasses.dataclass
class _Peer:
    host: str
    endpoint: str
    epoch: int
    last_heard: float
    alive: bool = True


@dataclasses.dataclass
class _Route:
    origin_host: str
    # The issuing member's id when the broadcast started on this host.
    issuer: str | None
    expires: float
    pending_members: set[str] = dataclasses.field(default_factory=set)
    forwarded_hosts: set[str] = dataclasses.field(default_factory=set)


class Master:
    """Runs the master role on its own thread until :meth:`stop`."""

    def __init__(
        self,
        context: zmq.Context[Any],
        pool: str,
        host: str,
        member_id: str,
        election: Election,
        directory: MasterDirectory | None,
        heartbeat_interval: float,
        heartbeat_liveness: int,
        curve: Curve | None = None,
        *,
        max_members: int = 1024,
        max_pending: int = 256,
        max_peers: int = MAX_PEERS,
        max_message_size: int = 2 * 1024**3,
    ) -> None:
        self.context = context
        self.max_message_size = max_message_size
        self.max_members = max_members
        self.max_pending = max_pending
        self.max_peers = max_peers
        # Wire messages dropped since the last WARNING that summarised them.
        self._dropped = 0
        self._drop_warned = -math.inf
        # Ids refused a seat, so the log says so once per member, not per beat.
        self._refused: set[str] = set()
        self.curve = curve
        self.pool = pool
        self.host = host
        self.member_id = member_id
        self.election = election
        self.directory = directory
        self.interval = heartbeat_interval
        self.liveness_timeout = heartbeat_interval * heartbeat_liveness
        self.record: MasterRecord | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"pool-master-{pool}", daemon=True
        )
        self._members: dict[str, _LocalMember] = {}
        # Members lost without a goodbye whose process still lives (stopped,
        # swapped out), with when they were last heard. Each broadcast lists
        # them as failed, so a result never omits a member that still exists.
        self._silent: dict[str, _LocalMember] = {}
        self._peers: dict[str, _Peer] = {}
        self._dns_endpoints: dict[str, str] = {}
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._routes: dict[str, _Route] = {}
        # Events waiting for the next flush, by broadcast id, with their route
        # (kept here too: a settled route may leave _routes before the flush).
        self._outbox: dict[str, tuple[_Route, list[bytes]]] = {}
        self._resolve_now = True
        # When each broadcast's events first met a full queue, for _flush.
        self._full_since: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> MasterRecord:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"master of pool {self.pool!r} did not start")
        if self._error is not None or self.record is None:
            raise RuntimeError(
                f"master of pool {self.pool!r} failed: {self._error}"
            ) from self._error
        return self.record

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"pool-dns-{self.pool}"
        )
        local = self.context.socket(zmq.ROUTER)
        peer = self.context.socket(zmq.ROUTER)
        withdraw: Callable[[], None] | None = None
        try:
            for sock in (local, peer):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.IPV6, 1)
                # libzmq drops the connection of a peer whose frame is larger,
                # before a byte of it is buffered: a flood costs no memory.
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size + 64 * 1024)
                if self.curve is not None:
                    self.curve.server(sock)
            warn_if_exposed(self.host, self.curve, f"master of pool {self.pool!r}")
            local_port = local.bind_to_random_port(_bind_address(self.host))
            peer_port = peer.bind_to_random_port(_bind_address(self.host))
            self._local = local
            self._peer_sock = peer
            start_time = process_start_time(os.getpid()) or 0
            self.record = MasterRecord(
                host=self.host,
                endpoint=zmq_endpoint(self.host, local_port),
                peer_endpoint=zmq_endpoint(self.host, peer_port),
                pid=os.getpid(),
                start_time=start_time,
                epoch=self.election.next_epoch(),
                member_id=self.member_id,
            )
            self.election.write_record(self.record)
            log.info(
                "master of pool %r on %s: epoch %d, members %s, peers %s",
                self.pool,
                self.host,
                self.record.epoch,
                self.record.endpoint,
                self.record.peer_endpoint,
            )
            self._ready.set()
            withdraw = self._loop(local, peer, peer_port, executor)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            log.exception("master of pool %r failed", self.pool)
        finally:
            # A short linger lets the goodbyes leave; nothing else is waited for.
            self._say_goodbye(local)
            for dealer in self._dealers.values():
                dealer.close(linger=100)
            self._dealers.clear()
            local.close(linger=100)
            peer.close(linger=0)
            if withdraw is not None:
                try:
                    withdraw()
                except Exception as exc:
                    log.warning("could not withdraw master record: %s", exc)
            executor.shutdown(wait=False, cancel_futures=True)

    def _loop(
        self,
        local: zmq.Socket[bytes],
        peer: zmq.Socket[bytes],
        peer_port: int,
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> Callable[[], None] | None:
        poller = zmq.Poller()
        poller.register(local, zmq.POLLIN)
        poller.register(peer, zmq.POLLIN)
        next_beat = 0.0
        next_resolve = 0.0
        registering: concurrent.futures.Future[Callable[[], None]] | None = None
        withdraw: Callable[[], None] | None = None
        resolving: concurrent.futures.Future[list[tuple[str, str]]] | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if self.directory is not None:
                if withdraw is None and registering is None:
                    registering = executor.submit(
                        self.directory.register, self.pool, self.host, peer_port
                    )
                if registering is not None and registering.done():
                    try:
                        withdraw = registering.result()
                        log.info("registered master of pool %r", self.pool)
                    except Exception as exc:
                        log.warning("master registration failed, retrying: %s", exc)
                    registering = None
                if resolving is None and (self._resolve_now or now >= next_resolve):
                    self._resolve_now = False
                    next_resolve = now + RESOLVE_INTERVAL
                    resolving = executor.submit(self.directory.resolve, self.pool)
                if resolving is not None and resolving.done():
                    try:
                        self._on_resolved(resolving.result())
                    except Exception as exc:
                        log.warning(
                            "resolving masters of %r failed: %s", self.pool, exc
                        )
                    resolving = None
            if now >= next_beat:
                next_beat = now + self.interval
                self._heartbeat(local, now)
                # Once a beat is often enough: a route outlives its deadline
                # by ROUTE_GRACE anyway, and scanning every route on every
                # message cost more than the rest of the relay when many
                # broadcasts were open.
                self._expire(now)
            self._flush()
            wait = max(0.0, min(next_beat - now, self.interval / 2))
            if self._outbox:
                # Events a full queue refused wait for their next try only
                # briefly; the issuer is waiting for them.
                wait = min(wait, 0.01)
            for sock, _ in poller.poll(int(wait * 1000) + 1):
                # Drain what is queued, but bounded so heartbeats stay on time.
                for _ in range(256):
                    try:
                        frames = recv_nowait(sock)
                    except zmq.Again:
                        break
                    try:
                        if sock is local:
                            self._on_local(frames, time.monotonic())
                        else:
                            self._on_peer(frames, time.monotonic())
                    except _MALFORMED as exc:
                        self._drop(f"malformed pool message: {exc}")
        if registering is not None:
            try:
                withdraw = registering.result(timeout=2.0)
            except Exception:
                withdraw = None
        return withdraw

    def _drop(self, reason: str) -> None:
        """Log a dropped wire message: each at DEBUG, a summary now and then."""
        log.debug("dropping %s", reason)
        self._dropped += 1
        now = time.monotonic()
        if now - self._drop_warned >= DROP_WARNING_INTERVAL:
            log.warning(
                "pool %r: dropped %d messages from the wire (the last: %s)",
                self.pool,
                self._dropped,
                reason,
            )
            self._dropped = 0
            self._drop_warned = now

    # -- heartbeats and liveness ----------------------------------------------

    def _heartbeat(self, local: zmq.Socket[bytes], now: float) -> None:
        assert self.record is not None
        beat = encode({"epoch": self.record.epoch})
        for member_id in list(self._members):
            member = self._members[member_id]
            if now - member.last_heard > self.liveness_timeout:
                self._member_lost(member_id, "heartbeats stopped")
                continue
            error = self._send_local(member_id, [b"HB", beat])
            if error is not None:
                self._member_lost(member_id, error)
        if self._silent:
            # Their member files say whether they still exist; a process
            # that is gone no longer belongs in any result.
            live = self.election.live_members()
            for member_id in [m for m in self._silent if m not in live]:
                del self._silent[member_id]
        header = self._peer_beat()
        for endpoint in list(self._dealers):
            self._send_dealer(endpoint, [b"HB", header])
        for peer in list(self._peers.values()):
            if peer.alive and now - peer.last_heard > self.liveness_timeout:
                self._peer_lost(peer, "its master stopped heartbeating")
            elif (
                not peer.alive
                and now - peer.last_heard > FORGET_PEER_AFTER
                and peer.host not in self._dns_endpoints.values()
            ):
                log.info("pool %r: forgetting the master of %s", self.pool, peer.host)
                del self._peers[peer.host]

    def _member_lost(self, member_id: str, reason: str, clean: bool = False) -> None:
        member = self._members.pop(member_id, None)
        if member is None:
            return
        if not clean:
            self._silent[member_id] = member
        # A member that said goodbye is routine; one that went silent is not.
        log.log(
            logging.INFO if clean else logging.WARNING,
            "pool %r lost member %s (pid %d): %s",
            self.pool,
            member_id,
            member.info.pid,
            reason,
        )
        for bid, route in list(self._routes.items()):
            if route.issuer == member_id:
                # Nobody is waiting for this broadcast any more.
                del self._routes[bid]
            elif member_id in route.pending_members:
                route.pending_members.discard(member_id)
                self._to_origin(
                    bid, route, {"ev": "failed", "member": member_id, "reason": reason}
                )
                self._drop_if_settled(bid, route)

    def _peer_lost(self, peer: _Peer, reason: str, clean: bool = False) -> None:
        peer.alive = False
        log.log(
            logging.INFO if clean else logging.WARNING,
            "pool %r lost the master of %s: %s",
            self.pool,
            peer.host,
            reason,
        )
        dealer = self._dealers.pop(peer.endpoint, None)
        if dealer is not None:
            dealer.close(linger=0)
        self._resolve_now = True
        text = f"master of {peer.host} lost: {reason}"
        for bid, route in list(self._routes.items()):
            if route.origin_host == peer.host and route.issuer is None:
                del self._routes[bid]
            elif route.issuer is not None and peer.host in route.forwarded_hosts:
                route.forwarded_hosts.discard(peer.host)
                self._to_origin(
                    bid, route, {"ev": "host_lost", "host": peer.host, "reason": text}
                )

    def _expire(self, now: float) -> None:
        for bid in [b for b, r in self._routes.items() if r.expires < now]:
            del self._routes[bid]

    def _drop_if_settled(self, bid: str, route: _Route) -> None:
        """Forget a peer's broadcast once every member here has answered.

        Nothing more can be relayed for it: a later answer for that id is a
        duplicate or late, and is dropped as if the route had expired. The
        origin keeps its route until the deadline, for the other hosts.
        """
        if route.issuer is None and not route.pending_members:
            self._routes.pop(bid, None)

    # -- peers ------------------------------------------------------------------

    def _on_resolved(self, masters: list[tuple[str, str]]) -> None:
        assert self.record is not None
        found = {ep: host for host, ep in masters if host != self.host}
        self._dns_endpoints = found
        for endpoint in found:
            self._ensure_dealer(endpoint)
        current = {p.endpoint for p in self._peers.values() if p.alive}
        for endpoint in list(self._dealers):
            if endpoint not in found and endpoint not in current:
                self._dealers.pop(endpoint).close(linger=0)

    def _known_hosts(self) -> set[str]:
        return (set(self._dns_endpoints.values()) | set(self._peers)) - {self.host}

    def _peer_beat(self) -> bytes:
        assert self.record is not None
        return encode(
            {
                "host": self.host,
                "epoch": self.record.epoch,
                "endpoint": self.record.peer_endpoint,
            }
        )

    def _ensure_dealer(self, endpoint: str) -> None:
        if endpoint in self._dealers:
            return
        try:
            dealer = self.context.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            # Out of sockets or descriptors: this peer goes unserved until
            # one frees, the master and its other peers carry on.
            log.warning("no socket for the master at %s: %s", endpoint, exc)
            return
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.IPV6, 1)
            if self.curve is not None:
                self.curve.client(dealer)
            dealer.connect(endpoint)
        except zmq.ZMQError as exc:
            dealer.close(linger=0)
            log.warning("cannot connect to the master at %s: %s", endpoint, exc)
            return
        self._dealers[endpoint] = dealer
        # Announce ourselves now rather than at the next beat: after a
        # takeover, the peers route to this master from its first heartbeat,
        # and waiting for the beat kept them on the dead one up to ``i``.
        self._send_dealer(endpoint, [b"HB", self._peer_beat()])

    def _send_dealer(self, endpoint: str, frames: list[bytes]) -> str | None:
        dealer = self._dealers.get(endpoint)
        if dealer is None:
            return f"no connection to {endpoint}"
        try:
            send_nowait(dealer, frames)
        except zmq.Again:
            return _QueueFull(f"send queue to {endpoint} is full")
        return None

    def _send_peer(self, host: str, frames: list[bytes]) -> str | None:
        peer = self._peers.get(host)
        if peer is None or not peer.alive:
            return f"no live master known on {host}"
        return self._send_dealer(peer.endpoint, frames)

    def _on_peer(self, frames: list[bytes], now: float) -> None:
        _need(frames, 2)
        kind = frames[1]
        if kind == b"STATUS":
            self._answer_status(frames[0], now)
            return
        if kind == b"EV":
            bid = frames[2].decode()
            origin = self._routes.get(bid)
            if origin is None or origin.issuer is None:
                log.debug("dropping event for unknown broadcast %s", bid)
                return
            events = frames[3:]
            if len(events) % 2:
                raise ValueError(f"event frames of {bid} are not header/payload pairs")
            # The peer's events already name their broadcast and host.
            self._outbox.setdefault(bid, (origin, []))[1].extend(events)
            return
        if kind not in (b"HB", b"FWD", b"BYE"):
            self._drop(f"unknown peer message {kind[:20]!r}")
            return
        header = _header(frames, 2)
        host = wire_host(header["host"])
        if host == self.host:
            raise ValueError(f"{kind!r} from a peer claims this host, {host}")
        if kind == b"HB":
            endpoint = wire_endpoint(host, header["endpoint"])
            self._peer_heartbeat(host, endpoint, wire_epoch(header["epoch"]), now)
        elif kind == b"FWD":
            self._forwarded(host, header, frames, now)
        elif kind == b"BYE":
            peer = self._peers.get(host)
            if (
                peer is not None
                and peer.alive
                and peer.endpoint == header.get("endpoint")
            ):
                self._peer_lost(peer, "its master resigned", clean=True)

    def _forwarded(
        self, host: str, header: dict[str, Any], frames: list[bytes], now: float
    ) -> None:
        """A peer's ``FWD``: deliver its broadcast to the members here."""
        # Everything is checked before anything changes.
        _need(frames, 4)
        endpoint = wire_endpoint(host, header["endpoint"])
        epoch = wire_epoch(header["epoch"])
        bid = str(header["bid"])
        timeout = wire_timeout(header["timeout"])
        exclude = header.get("exclude")
        if bid in self._routes or bid in self._outbox:
            # Replacing the open route would hand its answers to the sender.
            self._drop(f"FWD of {bid[:80]!r} from {host}: that id is in use")
            return
        if not self._peer_heartbeat(host, endpoint, epoch, now):
            return
        route = _Route(
            origin_host=host, issuer=None, expires=now + timeout + ROUTE_GRACE
        )
        forwarded = sum(r.issuer is None for r in self._routes.values())
        if forwarded >= self.max_pending:
            reason = (
                f"{forwarded} broadcasts of other hosts pending on the master of "
                f"pool {self.pool!r} on {self.host}: max_pending_broadcasts is "
                f"{self.max_pending}"
            )
            self._drop(f"FWD of {bid[:80]!r} from {host}: {reason}")
            # Not kept: the origin hears at once that this host is out of
            # reach for this broadcast, instead of waiting for its deadline.
            self._to_origin(
                bid, route, {"ev": "host_lost", "host": self.host, "reason": reason}
            )
            return
        self._routes[bid] = route
        self._deliver_local(bid, route, exclude, timeout, frames[3])

    def _peer_heartbeat(self, host: str, endpoint: str, epoch: int, now: float) -> bool:
        """Note that the master of ``host`` is alive; False when it has no room."""
        peer = self._peers.get(host)
        if peer is None and len(self._peers) >= self.max_peers:
            if not self._evict_lost_peer():
                self._drop(
                    f"heartbeat of {host}: {len(self._peers)} peers known, "
                    f"at most {self.max_peers}"
                )
                return False
        if peer is not None and peer.alive and epoch < peer.epoch:
            # An old master of that host, not yet dead: ignore it. Once the
            # newer one is lost it counts again, or one forged heartbeat with
            # a huge epoch would cut that host off for good.
            return True
        if peer is None or peer.endpoint != endpoint or epoch != peer.epoch:
            if peer is not None and peer.alive:
                # The old master is gone even though it never went silent for
                # the liveness window: without this its open routes would
                # wait for it until their deadline.
                self._peer_lost(peer, f"replaced by epoch {epoch}")
            if peer is not None and peer.endpoint != endpoint:
                old = self._dealers.pop(peer.endpoint, None)
                if old is not None and peer.endpoint not in self._dns_endpoints:
                    old.close(linger=0)
                elif old is not None:
                    self._dealers[peer.endpoint] = old
            log.info(
                "pool %r: master of %s is %s (epoch %d)",
                self.pool,
                host,
                endpoint,
                epoch,
            )
            peer = _Peer(host, endpoint, epoch, now)
            self._peers[host] = peer
            self._ensure_dealer(endpoint)
        elif not peer.alive:
            log.info("pool %r: master of %s is back", self.pool, host)
            # Its dealer was closed when it was declared lost.
            self._ensure_dealer(endpoint)
        peer.alive = True
        peer.last_heard = now
        return True

    def _evict_lost_peer(self) -> bool:
        """Forget the longest-lost peer DNS no longer lists, to make room."""
        listed = set(self._dns_endpoints.values())
        lost = [p for p in self._peers.values() if not p.alive and p.host not in listed]
        if not lost:
            return False
        oldest = min(lost, key=lambda p: p.last_heard)
        log.info("pool %r: forgetting the master of %s", self.pool, oldest.host)
        del self._peers[oldest.host]
        return True

    def _answer_status(self, identity: bytes, now: float) -> None:
        assert self.record is not None
        status = {
            "pool": self.pool,
            "record": dataclasses.asdict(self.record),
            "members": [
                {**m.info.to_wire(), "heard_ago": round(now - m.last_heard, 3)}
                for m in sorted(self._members.values(), key=lambda m: m.info.id)
            ],
            "peers": [
                {
                    "host": p.host,
                    "endpoint": p.endpoint,
                    "epoch": p.epoch,
                    "alive": p.alive,
                    "heard_ago": round(now - p.last_heard, 3),
                }
                for p in sorted(self._peers.values(), key=lambda p: p.host)
            ],
            "broadcasts": len(self._routes),
        }
        try:
            self._peer_sock.send_multipart(
                [identity, b"STATUS", encode(status)], zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:
            # The asker left or its queue is full; it will time out.
            log.debug("cannot answer a status query: %s", exc)

    # -- local members ----------------------------------------------------------

    def _send_local(self, member_id: str, frames: list[bytes]) -> str | None:
        try:
            send_nowait(self._local, [member_id.encode(), *frames])
        except zmq.Again:
            return _QueueFull("send queue full")
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "not connected"
            raise
        return None

    def _on_local(self, frames: list[bytes], now: float) -> None:
        _need(frames, 2)
        member_id = frames[0].decode()
        kind = frames[1]
        if kind == b"HB":
            info = MemberInfo.from_wire(_header(frames, 2))
            if info.id != member_id:
                # Requests go to info.id: a heartbeat naming another member
                # would have this one's seat serve, and count, that one.
                raise ValueError(f"heartbeat of {member_id!r} names {info.id!r}")
            known = self._members.get(member_id)
            if known is None and len(self._members) >= self.max_members:
                self._refuse(member_id)
                return
            if known is None:
                self._silent.pop(member_id, None)
                log.info(
                    "pool %r: member %s joined (pid %d)", self.pool, member_id, info.pid
                )
                self._members[member_id] = _LocalMember(info, now)
            else:
                known.last_heard = now
            return
        member = self._members.get(member_id)
        if member is None and kind == b"BCAST":
            # Refused a seat, or dropped as lost: it waits for an answer.
            bid = str(_header(frames, 2)["bid"])
            if bid in self._routes or bid in self._outbox:
                # The rejection would join that broadcast's events.
                self._drop(f"BCAST of {bid[:80]!r} from {member_id}: id in use")
                return
            self._to_origin(
                bid,
                _Route(self.host, member_id, now),
                {"ev": "rejected", "reason": f"{member_id} is no member here"},
            )
            return
        if member is None:
            log.debug("dropping %r from unknown member %s", kind, member_id)
            return
        member.last_heard = now
        if kind == b"BCAST":
            _need(frames, 4)
            self._broadcast(member_id, _header(frames, 2), frames[3], now)
        elif kind in (b"WORKING", b"REPLY", b"FAILED"):
            _need(frames, 3 if kind == b"WORKING" else 4)
            bid = frames[2].decode()
            route = self._routes.get(bid)
            if route is None or member_id not in route.pending_members:
                # Expired, unknown or already settled: late or duplicate.
                return
            if kind == b"WORKING":
                self._to_origin(bid, route, {"ev": "working", "member": member_id})
            elif kind == b"REPLY":
                route.pending_members.discard(member_id)
                self._to_origin(
                    bid, route, {"ev": "reply", "member": member_id}, frames[3]
                )
                self._drop_if_settled(bid, route)
            else:
                route.pending_members.discard(member_id)
                reason = frames[3].decode(errors="replace")
                self._to_origin(
                    bid, route, {"ev": "failed", "member": member_id, "reason": reason}
                )
                self._drop_if_settled(bid, route)
        elif kind == b"DONE":
            _need(frames, 3)
            # The issuer has its result: later answers have nobody to go to.
            route = self._routes.get(frames[2].decode())
            if route is not None and route.issuer == member_id:
                del self._routes[frames[2].decode()]
        elif kind == b"BYE":
            self._member_lost(member_id, "left the pool", clean=True)

    def _refuse(self, member_id: str) -> None:
        reason = (
            f"pool {self.pool!r} on {self.host} is full: max_pool_members is "
            f"{self.max_members}"
        )
        if member_id not in self._refused:
            if len(self._refused) >= self.max_members:
                self._refused.clear()
            self._refused.add(member_id)
            log.warning("refusing member %s: %s", member_id, reason)
        self._send_local(member_id, [b"REFUSED", reason.encode()])

    def _broadcast(
        self, issuer: str, header: dict[str, Any], payload: bytes, now: float
    ) -> None:
        assert self.record is not None
        bid = str(header["bid"])
        timeout = wire_timeout(header["timeout"])
        exclude = None if header.get("include_self", True) else issuer
        if bid in self._routes or bid in self._outbox:
            # Ids carry a random part, so only a broken or forging member
            # repeats one; its answer would land in the open broadcast.
            self._drop(f"BCAST of {bid[:80]!r} from {issuer}: that id is in use")
            return
        route = _Route(self.host, issuer, now + timeout + ROUTE_GRACE)
        pending = sum(r.issuer is not None for r in self._routes.values())
        if pending >= self.max_pending:
            reason = (
                f"{pending} broadcasts pending on the master of pool {self.pool!r} "
                f"on {self.host}: max_pending_broadcasts is {self.max_pending}"
            )
            log.warning("rejecting broadcast %s of %s: %s", bid, issuer, reason)
            # The route is not kept: only this one event goes back.
            self._to_origin(bid, route, {"ev": "rejected", "reason": reason})
            return
        self._routes[bid] = route
        fwd = encode(
            {
                "bid": bid,
                "host": self.host,
                "epoch": self.record.epoch,
                "endpoint": self.record.peer_endpoint,
                "timeout": timeout,
                "exclude": exclude,
            }
        )
        unreachable: dict[str, str] = {}
        for host in sorted(self._known_hosts()):
            error = self._send_peer(host, [b"FWD", fwd, payload])
            if error is None:
                route.forwarded_hosts.add(host)
            else:
                unreachable[host] = error
        self._to_origin(
            bid,
            route,
            {
                "ev": "hosts",
                "forwarded": sorted(route.forwarded_hosts | {self.host}),
                "unreachable": unreachable,
            },
        )
        self._deliver_local(bid, route, exclude, timeout, payload)

    def _deliver_local(
        self,
        bid: str,
        route: _Route,
        exclude: str | None,
        timeout: float,
        payload: bytes,
    ) -> None:
        targets = [m for m in self._members.values() if m.info.id != exclude]
        silent = [m for m in self._silent.values() if m.info.id != exclude]
        route.pending_members = {m.info.id for m in targets}
        # The list goes out before the requests, so the origin knows every
        # member before any of their answers can arrive.
        self._to_origin(
            bid,
            route,
            {
                "ev": "expect",
                "host": self.host,
                "members": [m.info.to_wire() for m in targets + silent],
            },
        )
        now = time.monotonic()
        for member in silent:
            reason = (
                f"silent since {now - member.last_heard:.1f}s ago "
                "(heartbeats stopped, process still alive)"
            )
            self._to_origin(
                bid, route, {"ev": "failed", "member": member.info.id, "reason": reason}
            )
        request = encode({"timeout": timeout})
        for member in targets:
            error = self._send_local(
                member.info.id, [b"REQ", bid.encode(), request, payload]
            )
            if error is not None:
                route.pending_members.discard(member.info.id)
                self._to_origin(
                    bid,
                    route,
                    {"ev": "undeliverable", "member": member.info.id, "reason": error},
                )
        self._drop_if_settled(bid, route)

    def _to_origin(
        self, bid: str, route: _Route, event: dict[str, Any], payload: bytes = b""
    ) -> None:
        event = {**event, "bid": bid, "host": event.get("host", self.host)}
        self._outbox.setdefault(bid, (route, []))[1].extend((encode(event), payload))

    def _flush(self) -> None:
        """Send every gathered event, one message per broadcast.

        A full queue is retried on the next turn, for one liveness window at
        most (a receiver that reads nothing that long is as good as gone, and
        the retries keep this loop awake); only then, or when the receiver is
        gone, are the events dropped, and never without a warning: the issuer
        is left to time those members out.
        """
        outbox, self._outbox = self._outbox, {}
        now = time.monotonic()
        for bid, (route, events) in outbox.items():
            full_since = self._full_since.pop(bid, now)
            frames = [b"EV", bid.encode(), *events]
            if route.issuer is not None:
                error = self._send_local(route.issuer, frames)
                receiver = f"issuer {route.issuer}"
            else:
                error = self._send_peer(route.origin_host, frames)
                receiver = f"the master of {route.origin_host}"
            if error is None:
                continue
            retry_until = min(route.expires, full_since + self.liveness_timeout)
            if isinstance(error, _QueueFull) and now < retry_until:
                # Ahead of anything gathered since, to keep the order.
                self._outbox.setdefault(bid, (route, []))[1][:0] = events
                self._full_since[bid] = full_since
            elif route.issuer is not None and not isinstance(error, _QueueFull):
                # The issuer left: nobody waits for this broadcast any more.
                log.info("issuer of %s is gone (%s); dropping its route", bid, error)
                self._routes.pop(bid, None)
            else:
                log.warning(
                    "dropping %d events of broadcast %s for %s: %s",
                    len(events) // 2,
                    bid,
                    receiver,
                    error,
                )

    def _say_goodbye(self, local: zmq.Socket[bytes]) -> None:
        """On a clean exit, tell members and peers so they move on at once."""
        if self.record is None or not hasattr(self, "_local"):
            return
        # What was gathered still goes out: the issuers wait for it.
        with contextlib.suppress(zmq.ZMQError):
            self._flush()
        for member_id in list(self._members):
            self._send_local(
                member_id, [b"RESIGN", encode({"epoch": self.record.epoch})]
            )
        bye = encode({"host": self.host, "endpoint": self.record.peer_endpoint})
        for endpoint in list(self._dealers):
            self._send_dealer(endpoint, [b"BYE", bye])


def query_status(
    context: zmq.Context[Any],
    endpoint: str,
    timeout: float,
    curve: Curve | None = None,
) -> dict[str, Any] | None:
    """Ask the master at ``endpoint`` (its peer endpoint) for its status.

    Returns the decoded answer, or ``None`` when none came within
    ``timeout`` seconds (a stale DNS record, a hung or unreachable master).
    """
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Nothing queued for a master that is not there: no send waits on it.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.IPV6, 1)
    if curve is not None:
        curve.client(sock)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.send_multipart([b"STATUS", encode({})], zmq.NOBLOCK)
                break
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.poll(int(min(remaining, 0.1) * 1000) + 1, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return None
            frames = sock.recv_multipart()
            if len(frames) >= 2 and frames[0] == b"STATUS":
                return decode(frames[1])
    finally:
        sock.close(linger=0)


def _bind_address(host: str) -> str:
    # bind_to_random_port wants the endpoint without a port.
    return zmq_endpoint(host, 0).rsplit(":", 1)[0]
