"""The blocking Hit client.

A :class:`Client` resolves its SRV name and opens Hits; each :class:`Hit` has
its own DEALER socket connected straight to the server that accepted it. A
DEALER rather than a REQ: REQ refuses to send again after a lost reply (the
EFSM trap, C01), while a DEALER with request ids in every message lets us
drop stale replies, ping the server during a long call, and never wedge.

Every wait has a deadline and polls in short slices, so Ctrl-C interrupts a
blocked call. Sockets have IMMEDIATE set (nothing is queued for a server
that is not connected, C20) and close with a short linger (C03).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, overload

import tenacity
import zmq

from mesh.curve import Curve
from mesh.errors import (
    HitClosed,
    HitLost,
    HitTimeout,
    MessageTooLarge,
    NoTargetAvailable,
    ProtocolError,
    RemoteError,
    WrongThread,
)
from mesh.hit import protocol
from mesh.hit.protocol import Kind
from mesh.hit.session import ClientSession, ClientState

__all__ = ["Client", "Hit", "Reply", "TargetLike", "ResolverLike"]

log = logging.getLogger(__name__)

# The longest a single poll blocks, so KeyboardInterrupt and stop checks are
# seen promptly even inside a long call.
SLICE = 0.1
# Linger for Hit sockets: long enough for a final CLOSE to leave, short enough
# that a dead server never holds up exit (C03).
LINGER_MS = 200


class TargetLike(Protocol):
    @property
    def endpoint(self) -> str: ...


class ResolverLike(Protocol):
    def resolve(self, name: str) -> Sequence[Any]: ...


class Reply(Sequence[memoryview]):
    """The frames of a REPLY; ``bytes()``, ``text()`` and ``json()`` read one."""

    __slots__ = ("frames",)

    def __init__(self, frames: Sequence[memoryview]) -> None:
        self.frames = tuple(frames)

    @overload
    def __getitem__(self, index: int) -> memoryview: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, index: int | slice) -> memoryview | Sequence[memoryview]:
        return self.frames[index]

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return f"Reply({[f.nbytes for f in self.frames]} bytes)"

    def bytes(self, index: int = 0) -> bytes:
        return self.frames[index].tobytes() if self.frames else b""

    def text(self, index: int = 0) -> str:
        return str(self.frames[index], "utf-8") if self.frames else ""

    def json(self, index: int = 0) -> Any:
        return json.loads(self.frames[index].tobytes())


def arg_frame(arg: Any) -> Any:
    """One CALL argument as a frame: str is UTF-8, buffers pass uncopied."""
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bytes | bytearray | memoryview):
        return arg
    try:
        return memoryview(arg)
    except TypeError:
        raise TypeError(
            f"a Hit argument must be bytes, str or a buffer, not {type(arg).__name__}"
        ) from None


def call_frames(
    method: str, args: Sequence[Any], limit: int, max_frames: int
) -> list[Any]:
    """The CALL frames after the header; raises before anything is sent.

    Past ``max_frames`` (header included) the error's ``size`` and ``limit``
    count frames, not bytes.
    """
    frames = [method.encode(), *(arg_frame(a) for a in args)]
    if len(frames) + 1 > max_frames:
        raise MessageTooLarge(
            f"call {method!r} has {len(frames) + 1} frames, over the limit of "
            f"{max_frames}",
            len(frames) + 1,
            max_frames,
        )
    size = sum(protocol.frame_size(f) for f in frames)
    if size > limit:
        raise MessageTooLarge(
            f"call {method!r} carries {size} bytes, over the limit of {limit}",
            size,
            limit,
        )
    return frames


def frames_size(frames: Sequence[Any]) -> int:
    return sum(protocol.frame_size(f) for f in frames)


def hit_routing_id() -> bytes:
    """A fixed identity for one Hit socket, so a reconnect keeps its Hit.

    Random, so one Hit's id tells nothing about another's; the first byte is
    never zero, which libzmq reserves for the ids it makes up itself.
    """
    return b"H" + secrets.token_bytes(15)


def answer_or_raise(message: protocol.Message, what: str) -> Reply:
    """A REPLY's frames; an ERROR becomes the matching exception."""
    if message.kind is Kind.REPLY or message.kind is Kind.OK:
        return Reply(message.frames)
    if message.kind is Kind.ERROR:
        type_name, text = message.text(0), message.text(1)
        if type_name == "UnknownHit":
            raise HitLost(f"{what}: the server no longer knows this Hit ({text})")
        if type_name == "ProtocolError":
            raise ProtocolError(f"{what}: the server refused our frames: {text}")
        raise RemoteError(type_name, text)
    raise ProtocolError(f"{what}: unexpected {message.kind.name} answer")


class _PassFailed(Exception):
    def __init__(self, any_busy: bool) -> None:
        super().__init__("every target failed")
        self.any_busy = any_busy


def open_retrying(attempts: int) -> tenacity.Retrying:
    """Walk the targets again, after a jittered backoff, only when some were BUSY.

    A refused or silent target will not heal in a fraction of a second; a
    busy one may, so only BUSY justifies another pass.
    """
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
        + tenacity.wait_random(0, 0.05),
        retry=tenacity.retry_if_exception(
            lambda e: isinstance(e, _PassFailed) and e.any_busy
        ),
        reraise=True,
    )


def no_target_error(
    srv_name: str, attempts: list[tuple[str, str]]
) -> NoTargetAvailable:
    tried = "; ".join(f"{t}: {what}" for t, what in attempts) or "no targets"
    return NoTargetAvailable(
        f"no target of {srv_name} accepted a Hit ({tried})", attempts
    )


def no_connection(timeout: float, curve: Curve | None) -> str:
    """Why an OPEN could not even be sent: the words a user needs to act."""
    text = f"no connection within {timeout:g} s (refused or unreachable"
    # A refused Curve handshake looks the same from here: the socket never
    # becomes ready to send. Name the likely cause rather than guess less.
    if curve is None:
        text += ", or the server requires Curve and this client has no key"
    elif not curve.server_key_given:
        text += (
            ", or a Curve mismatch: MESH_CURVE_SERVER_KEY is not set, so this "
            "client expects the servers to use its own keypair"
        )
    else:
        text += (
            ", or the server refused this client's Curve key: is its public "
            "key in the server's allow-list?"
        )
    return text + ")"


def connect_hit_socket(
    sock: zmq.Socket[Any], endpoint: str, opts: HitOptions, curve: Curve | None
) -> None:
    """Set up one Hit's DEALER (both clients) and connect it to ``endpoint``."""
    sock.setsockopt(zmq.LINGER, 0)
    # Nothing is queued for a peer that is not connected (C20).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.ROUTING_ID, hit_routing_id())
    sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_size + 64 * 1024)
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    if curve is not None:
        curve.client(sock)
    sock.connect(endpoint)


@dataclasses.dataclass
class HitOptions:
    """The knobs one Hit needs, copied from its client."""

    open_timeout: float
    call_timeout: float
    max_message_size: int
    ping_interval: float
    liveness_timeout: float
    max_frames: int = 1024


class _Outcome(Exception):
    """Why one target did not give us a Hit (``busy`` is worth a retry)."""

    def __init__(self, text: str, busy: bool = False) -> None:
        super().__init__(text)
        self.busy = busy


class Client:
    """Opens Hits on the servers of one SRV name.

    Give either ``nameservers`` (``host:port`` strings; a
    :class:`mesh.discovery.resolve.Resolver` is made) or any ``resolver``
    with ``resolve(name) -> [Target, ...]`` in the order to try. Safe to
    share between threads; each Hit belongs to the thread that opened it.
    """

    def __init__(
        self,
        srv_name: str,
        nameservers: Sequence[str] | None = None,
        *,
        resolver: ResolverLike | None = None,
        open_timeout: float = 2.0,
        call_timeout: float = 30.0,
        max_message_size: int = 2 * 1024**3,
        ping_interval: float = 1.0,
        liveness_timeout: float = 5.0,
        open_attempts: int = 3,
        down_period: float = 10.0,
        max_sockets: int = 4096,
        curve: Curve | None = None,
        max_frames: int = 1024,
    ) -> None:
        if resolver is None:
            if not nameservers:
                raise ValueError("give nameservers or a resolver")
            from mesh.discovery.resolve import Resolver

            resolver = Resolver(list(nameservers))
        self.srv_name = srv_name
        self.resolver = resolver
        self.options = HitOptions(
            open_timeout,
            call_timeout,
            max_message_size,
            ping_interval,
            liveness_timeout,
            max_frames,
        )
        self.open_attempts = open_attempts
        self.down_period = down_period
        self.max_sockets = max_sockets
        self.curve = curve
        self._lock = threading.Lock()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pid = 0
        self._down: dict[str, float] = {}
        self._hits: weakref.WeakSet[Hit] = weakref.WeakSet()

    def context(self) -> zmq.Context[zmq.Socket[bytes]]:
        """This process's context: a forked child gets a fresh one (C04)."""
        pid = os.getpid()
        with self._lock:
            if self._ctx is None or self._pid != pid:
                # The parent's context belongs to the parent's I/O thread,
                # which does not exist here; never use or terminate it.
                self._ctx = zmq.Context()
                self._ctx.set(zmq.MAX_SOCKETS, self.max_sockets)
                self._pid = pid
                self._down.clear()
            return self._ctx

    def ordered(self, targets: Sequence[Any], now: float) -> list[Any]:
        """The resolver's order, with targets recently found dead moved last."""
        with self._lock:
            down = {e for e, until in self._down.items() if until > now}
        return [t for t in targets if t.endpoint not in down] + [
            t for t in targets if t.endpoint in down
        ]

    def mark_down(self, endpoint: str, now: float) -> None:
        with self._lock:
            self._down[endpoint] = now + self.down_period

    def hit(self, metadata: Mapping[str, Any] | None = None) -> Hit:
        """Open a Hit on the first target that accepts it.

        Raises :class:`NoTargetAvailable` naming each target and its answer.
        """
        attempts: list[tuple[str, str]] = []
        try:
            for attempt in open_retrying(self.open_attempts):
                with attempt:
                    return self._one_pass(dict(metadata or {}), attempts)
        except _PassFailed:
            pass
        raise no_target_error(self.srv_name, attempts)

    def _one_pass(
        self, metadata: dict[str, Any], attempts: list[tuple[str, str]]
    ) -> Hit:
        targets = self.ordered(self.resolver.resolve(self.srv_name), time.monotonic())
        any_busy = False
        for target in targets:
            try:
                return self._open_on(target, metadata)
            except _Outcome as outcome:
                attempts.append((target.endpoint, str(outcome)))
                log.warning(
                    "Hit on %s: %s; trying the next target", target.endpoint, outcome
                )
                any_busy = any_busy or outcome.busy
                if not outcome.busy:
                    self.mark_down(target.endpoint, time.monotonic())
        raise _PassFailed(any_busy)

    def _open_on(self, target: Any, metadata: dict[str, Any]) -> Hit:
        endpoint = target.endpoint
        opts = self.options
        sock = self.context().socket(zmq.DEALER)
        ok = False
        try:
            connect_hit_socket(sock, endpoint, opts, self.curve)
            session = ClientSession(opts.ping_interval, opts.liveness_timeout)
            start = time.monotonic()
            deadline = start + opts.open_timeout
            request_id = session.request(Kind.OPEN, start, opts.open_timeout)
            frames = protocol.encode_open(
                request_id, metadata, opts.max_message_size, opts.max_frames
            )
            if not send(sock, frames, deadline):
                raise _Outcome(no_connection(opts.open_timeout, self.curve))
            answer = receive(sock, session)
            if answer is None:
                raise _Outcome(
                    f"connected, but no answer within {opts.open_timeout:g} s"
                )
            if answer.kind is Kind.BUSY:
                raise _Outcome(f"BUSY ({answer.text(0)})", busy=True)
            if answer.kind is Kind.ERROR:
                raise _Outcome(f"ERROR {answer.text(0)}: {answer.text(1)}")
            if answer.kind is not Kind.OK:
                raise _Outcome(f"answered OPEN with {answer.kind.name}")
            hit = Hit(self, sock, session, endpoint)
            ok = True
            log.debug("Hit %#x opened on %s", session.hit_id, endpoint)
            self._hits.add(hit)
            return hit
        finally:
            if not ok:
                sock.close(linger=0)

    def close(self) -> None:
        """Terminate the context once no Hit of this process is open."""
        with self._lock:
            ctx, self._ctx = self._ctx, None
        if ctx is None or self._pid != os.getpid():
            return
        if any(not h.closed for h in list(self._hits)):
            # A Hit open on another thread owns a socket; term would wait on it.
            log.warning("client closed with Hits still open; leaving its context")
            return
        ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def send(sock: zmq.Socket[bytes], frames: list[Any], deadline: float) -> bool:
    """Queue a message, waiting for a connected peer until ``deadline``."""
    while True:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.poll(int(min(remaining, SLICE) * 1000) + 1, zmq.POLLOUT)


def receive(sock: zmq.Socket[bytes], session: ClientSession) -> protocol.Message | None:
    """The answer to the outstanding request, or None once the session gives up."""
    while True:
        step = session.next_step(time.monotonic())
        if step is None:
            return None
        if step.ping:
            try:
                sock.send_multipart(
                    protocol.encode(Kind.PING, session.hit_id, step.ping), zmq.NOBLOCK
                )
            except zmq.Again:
                # Not connected: the silence it leads to is the verdict.
                pass
        if not sock.poll(int(min(step.timeout, SLICE) * 1000) + 1):
            continue
        frames = sock.recv_multipart(copy=False)
        try:
            message = protocol.decode(frames)
        except ProtocolError as exc:
            log.debug("dropping undecodable answer: %s", exc)
            continue
        if session.accept(message, time.monotonic()):
            return message
        if message.kind is not Kind.PONG:
            log.debug(
                "Hit %#x: dropping stale %s for request %d",
                session.hit_id,
                message.kind.name,
                message.request_id,
            )


class Hit:
    """One open Hit: every call runs on one server thread, in order.

    Belongs to the thread that opened it. After :class:`HitLost` (or its
    subclass :class:`HitTimeout`) the Hit is over: its server state is gone
    and further calls raise :class:`HitClosed`.
    """

    def __init__(
        self,
        client: Client,
        sock: zmq.Socket[bytes],
        session: ClientSession,
        endpoint: str,
    ) -> None:
        self.endpoint = endpoint
        self.hit_id = session.hit_id
        self._client = client
        self._options = client.options
        self._sock: zmq.Socket[bytes] | None = sock
        self._session = session
        self._owner = threading.get_ident()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Hit {self.hit_id:#x} on {self.endpoint} {self._session.state.value}>"

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _check(self) -> zmq.Socket[bytes]:
        if threading.get_ident() != self._owner or os.getpid() != self._pid:
            raise WrongThread(
                f"Hit {self.hit_id:#x} belongs to thread {self._owner} of process "
                f"{self._pid}; open a Hit in this thread instead"
            )
        if self._sock is None:
            raise HitClosed(f"Hit {self.hit_id:#x} on {self.endpoint} is over")
        return self._sock

    def _end(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=LINGER_MS)

    def _abandon(self) -> None:
        """Tell the server, without waiting, that it may reap this Hit."""
        sock = self._sock
        if sock is not None:
            try:
                sock.send_multipart(
                    protocol.encode(Kind.CLOSE, self.hit_id, 0), zmq.NOBLOCK
                )
            except zmq.ZMQError:
                pass
        self._session.state = ClientState.LOST
        self._end()

    def _lost(self) -> None:
        """Abandon the Hit and have the next open try its server last."""
        self._abandon()
        self._client.mark_down(self.endpoint, time.monotonic())

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Reply:
        """Run ``method(*args)`` on the Hit's server thread and return its reply.

        Arguments are bytes, str or buffers (sent without copying). Raises
        :class:`RemoteError` when the handler raised (the Hit stays usable),
        :class:`HitTimeout` after ``timeout`` (default: the client's
        ``call_timeout``), :class:`HitLost` when the server stops answering
        pings, :class:`MessageTooLarge` before sending an oversized call.
        """
        sock = self._check()
        opts = self._options
        frames = call_frames(method, args, opts.max_message_size, opts.max_frames)
        timeout = opts.call_timeout if timeout is None else timeout
        session = self._session
        now = time.monotonic()
        request_id = session.request(Kind.CALL, now, timeout, frames_size(frames))
        what = f"Hit {self.hit_id:#x} on {self.endpoint}, call {method!r}"
        # A server that is not even connected is as lost as a silent one.
        connect_wait = min(timeout, opts.liveness_timeout)
        try:
            if not send(
                sock,
                protocol.encode(Kind.CALL, self.hit_id, request_id, frames),
                now + connect_wait,
            ):
                self._lost()
                raise HitLost(f"{what}: server not connected for {connect_wait:g} s")
            answer = receive(sock, session)
        except BaseException:
            # Ctrl-C (or anything) mid-call: the reply would be out of step.
            self._abandon()
            raise
        if answer is None:
            now = time.monotonic()
            if session.silent(now):
                self._lost()
                raise HitLost(
                    f"{what}: server silent for {session.lost_for(now):.1f} s"
                )
            self._abandon()
            raise HitTimeout(f"{what}: no reply within {timeout:g} s")
        try:
            return answer_or_raise(answer, what)
        except (HitLost, ProtocolError):
            self._abandon()
            raise

    def close(self) -> None:
        """End the Hit: the server runs the handler's close() and answers OK."""
        if self._sock is None:
            return
        sock = self._check()
        session = self._session
        now = time.monotonic()
        request_id = session.request(Kind.CLOSE, now, self._options.open_timeout)
        try:
            frames = protocol.encode(Kind.CLOSE, self.hit_id, request_id)
            if send(sock, frames, now + self._options.open_timeout):
                if receive(sock, session) is None:
                    log.warning("Hit %#x: no answer to CLOSE", self.hit_id)
        finally:
            session.state = ClientState.CLOSED
            self._end()
        log.debug("Hit %#x closed", self.hit_id)

    def __enter__(self) -> Hit:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif self._sock is not None and threading.get_ident() == self._owner:
            # Do not hide the caller's exception behind a slow CLOSE.
            self._abandon()
