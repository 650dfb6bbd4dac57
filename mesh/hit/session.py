"""The Hit session rules, without sockets, threads or clocks.

Theory of operation. A Hit is a conversation between one client socket and
one server worker thread. The server's front loop owns a :class:`HitTable`:
for each message from a client it decides whether to answer at once (BUSY,
PONG, a protocol ERROR), to start a worker (OPEN), or to forward the frames to
the Hit's worker (CALL, CLOSE); for each message from a worker it decides
which client gets it. The table also decides which Hits are idle long enough
to be reaped and when a drain is over. Every method takes ``now`` (a
``time.monotonic()`` value) so tests pass numbers instead of sleeping.

Server-side Hit states::

    OPENING --OK--> OPEN --CALL--> CALLING --REPLY/ERROR--> OPEN
       |              |                |
       +--ERROR-------+--CLOSE/reap----+--CLOSE--> CLOSING --worker gone--> removed

The client side is one :class:`ClientSession` per Hit, shared by the blocking
and the asyncio client. It numbers requests, recognises the answer to the
outstanding one (anything else is stale and dropped), and says when to ping
and when the server must be given up for lost.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from collections.abc import Callable

from mesh.hit.protocol import Header, Kind, Message

__all__ = [
    "Answer",
    "ClientSession",
    "ClientState",
    "Drop",
    "Forward",
    "HitState",
    "HitTable",
    "Start",
    "Wait",
]


class HitState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CALLING = "calling"
    CLOSING = "closing"


@dataclasses.dataclass(slots=True)
class ServerHit:
    hit_id: int
    peer: bytes
    state: HitState
    last_active: float
    request_id: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """Send this message to ``peer`` from the front loop itself."""

    peer: bytes
    kind: Kind
    hit_id: int
    request_id: int
    frames: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Start:
    """Start a worker thread for ``hit_id`` and give it the OPEN."""

    hit_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Forward:
    """Pass the frames on unchanged: to the worker, or to the client ``peer``."""

    hit_id: int
    peer: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Decision = Answer | Start | Forward | Drop


def _protocol_error(peer: bytes, header: Header, text: str) -> Answer:
    return Answer(
        peer, Kind.ERROR, header.hit_id, header.request_id, ("ProtocolError", text)
    )


class HitTable:
    """Every Hit a server has, and the front loop's routing decisions."""

    def __init__(
        self,
        max_hits: int,
        idle_timeout: float,
        new_hit_id: Callable[[], int] | None = None,
    ) -> None:
        self.max_hits = max_hits
        self.idle_timeout = idle_timeout
        self.hits: dict[int, ServerHit] = {}
        self.draining = False
        self._new_hit_id = new_hit_id or (lambda: secrets.randbits(63) + 1)

    def __len__(self) -> int:
        return len(self.hits)

    def from_client(self, peer: bytes, header: Header, now: float) -> Decision:
        kind = header.kind
        if kind is Kind.OPEN:
            if self.draining:
                return Answer(peer, Kind.BUSY, 0, header.request_id, ("draining",))
            if len(self.hits) >= self.max_hits:
                reason = f"at the cap of {self.max_hits} Hits"
                return Answer(peer, Kind.BUSY, 0, header.request_id, (reason,))
            hit_id = self._new_hit_id()
            while hit_id in self.hits:
                hit_id = self._new_hit_id()
            self.hits[hit_id] = ServerHit(
                hit_id, peer, HitState.OPENING, now, header.request_id
            )
            return Start(hit_id)
        if kind not in (Kind.CALL, Kind.CLOSE, Kind.PING):
            return _protocol_error(peer, header, f"a client cannot send {kind.name}")
        hit = self.hits.get(header.hit_id)
        if hit is None:
            # HitLost on the client: this server does not know the Hit (reaped,
            # or the server restarted on the same port).
            return Answer(
                peer,
                Kind.ERROR,
                header.hit_id,
                header.request_id,
                ("UnknownHit", f"no Hit {header.hit_id:#x} on this server"),
            )
        if hit.peer != peer:
            return _protocol_error(peer, header, f"Hit {hit.hit_id:#x} is not yours")
        if kind is Kind.PING:
            return Answer(peer, Kind.PONG, hit.hit_id, header.request_id)
        if kind is Kind.CLOSE:
            if hit.state is HitState.CLOSING:
                return Drop("close of a closing Hit")
            hit.state = HitState.CLOSING
            hit.last_active = now
            return Forward(hit.hit_id)
        if hit.state is not HitState.OPEN:
            return _protocol_error(
                peer, header, f"CALL while Hit {hit.hit_id:#x} is {hit.state.value}"
            )
        hit.state = HitState.CALLING
        hit.request_id = header.request_id
        hit.last_active = now
        return Forward(hit.hit_id)

    def from_worker(self, header: Header, now: float) -> Decision:
        hit = self.hits.get(header.hit_id)
        if hit is None:
            return Drop(f"answer from unknown Hit {header.hit_id:#x}")
        hit.last_active = now
        if hit.state is HitState.OPENING:
            hit.state = HitState.OPEN if header.kind is Kind.OK else HitState.CLOSING
        elif hit.state is HitState.CALLING and header.request_id == hit.request_id:
            hit.state = HitState.OPEN
        return Forward(hit.hit_id, hit.peer)

    def worker_gone(self, hit_id: int) -> ServerHit | None:
        return self.hits.pop(hit_id, None)

    def idle(self, now: float) -> list[int]:
        """Hits idle past the timeout; they move to CLOSING, to be reaped."""
        expired = [
            h.hit_id
            for h in self.hits.values()
            if h.state is HitState.OPEN and now - h.last_active > self.idle_timeout
        ]
        for hit_id in expired:
            self.hits[hit_id].state = HitState.CLOSING
        return expired

    def close_all(self) -> list[int]:
        """Every Hit not already closing; they move to CLOSING, to be reaped."""
        victims = [
            h.hit_id for h in self.hits.values() if h.state is not HitState.CLOSING
        ]
        for hit_id in victims:
            self.hits[hit_id].state = HitState.CLOSING
        return victims


# The slowest rate (bytes/s) we still take for a transfer in progress rather
# than a dead server: loopback moves about 1 GB/s and a loaded 2-core box a
# fraction of that, so this is a guess with a wide margin, not a measurement.
# It only lengthens the wait for a server that dies during a big transfer.
TRANSFER_FLOOR = 32 * 1024 * 1024


class ClientState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CALLING = "calling"
    CLOSED = "closed"
    LOST = "lost"


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do yet: wait up to ``timeout`` seconds for a message."""

    timeout: float
    ping: int = 0  # send a PING with this request id first, when not 0


class ClientSession:
    """One Hit seen from the client: request ids, staleness and liveness.

    ``deadline`` is when the outstanding request times out. While waiting, a
    PING goes out every ``ping_interval``; when nothing at all has been heard
    from the server for ``liveness_timeout``, the server is lost.

    Silence explained by our own transfer does not count: a large CALL gives
    its PINGs a queue to wait in before they even leave, and a large REPLY
    holds back the PONGs queued behind it. So a CALL of ``size`` bytes, and a
    PONG announcing an answer of ``size`` bytes, each add ``size /
    TRANSFER_FLOOR`` seconds to the allowance, until a message shows the
    transfer is over.
    """

    def __init__(self, ping_interval: float, liveness_timeout: float) -> None:
        self.state = ClientState.OPENING
        self.hit_id = 0
        self.ping_interval = ping_interval
        self.liveness_timeout = liveness_timeout
        self._next_id = 1
        self.outstanding = 0
        self.deadline = 0.0
        self._last_heard = 0.0
        self._last_ping = 0.0
        self._allowance = 0.0

    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def request(self, kind: Kind, now: float, timeout: float, size: int = 0) -> int:
        """Start a request (OPEN, CALL or CLOSE) of ``size`` bytes; its id."""
        self.outstanding = self._new_id()
        self.deadline = now + timeout
        self._last_heard = self._last_ping = now
        self._allowance = size / TRANSFER_FLOOR
        if kind is Kind.CALL:
            self.state = ClientState.CALLING
        return self.outstanding

    def next_step(self, now: float) -> Wait | None:
        """What to do while a request is outstanding; None: its deadline passed."""
        if now >= self.deadline:
            return None
        remaining = self.deadline - now
        if self.state is not ClientState.CALLING:
            return Wait(remaining)
        if self.silent(now):
            return None
        ping = 0
        if now - self._last_ping >= self.ping_interval:
            ping = self._new_id()
            self._last_ping = now
        return Wait(min(remaining, self.ping_interval), ping)

    def lost_for(self, now: float) -> float:
        """Seconds since the server was last heard from."""
        return now - self._last_heard

    def silent(self, now: float) -> bool:
        """True once the server has been silent for longer than we allow."""
        return now - self._last_heard >= self.liveness_timeout + self._allowance

    def accept(self, message: Message, now: float) -> bool:
        """True when ``message`` answers the outstanding request.

        Any message from the server proves it alive; PONGs and stale answers
        are then dropped (False).
        """
        if self.hit_id and message.hit_id not in (self.hit_id, 0):
            return False
        self._last_heard = now
        if message.kind is Kind.PONG:
            if message.announced:
                self._allowance = message.announced / TRANSFER_FLOOR
            elif message.request_id > self.outstanding:
                # A PING sent after our CALL went out after it: upload done.
                self._allowance = 0.0
            return False
        if message.request_id != self.outstanding:
            return False
        self.outstanding = 0
        if self.state is ClientState.OPENING and message.kind is Kind.OK:
            self.hit_id = message.hit_id
            self.state = ClientState.OPEN
        elif self.state is ClientState.CALLING:
            self.state = ClientState.OPEN
        return True
