"""The asyncio Hit client: :mod:`mesh.hit.client` on ``zmq.asyncio``.

Same wire protocol, same session core (:class:`ClientSession`), same
failover and error rules; only the waiting is done with ``await``. A Hit
belongs to the task that opened it. The resolver may be an
``AsyncResolver`` (``await resolve(name)``) or a plain one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import tenacity
import zmq
import zmq.asyncio

from mesh.curve import Curve
from mesh.errors import HitClosed, HitLost, HitTimeout, ProtocolError, WrongThread
from mesh.hit import protocol
from mesh.hit.client import (
    LINGER_MS,
    SLICE,
    HitOptions,
    Reply,
    _Outcome,
    _PassFailed,
    answer_or_raise,
    call_frames,
    connect_hit_socket,
    frames_size,
    no_connection,
    no_target_error,
)
from mesh.hit.protocol import Kind
from mesh.hit.session import ClientSession, ClientState

__all__ = ["AsyncClient", "AsyncHit"]

log = logging.getLogger(__name__)


class AsyncClient:
    """Opens Hits on the servers of one SRV name, from asyncio code.

    ``async with client.hit(metadata) as hit: await hit.call(...)``; the
    arguments and errors are those of :class:`mesh.hit.client.Client`.
    """

    def __init__(
        self,
        srv_name: str,
        nameservers: Sequence[str] | None = None,
        *,
        resolver: Any = None,
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
            from mesh.discovery.resolve import AsyncResolver

            resolver = AsyncResolver(list(nameservers))
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
        self._ctx: zmq.asyncio.Context | None = None
        self._pid = 0
        self._down: dict[str, float] = {}
        self._hits: weakref.WeakSet[AsyncHit] = weakref.WeakSet()

    def context(self) -> zmq.asyncio.Context:
        """This process's context: a forked child gets a fresh one (C04)."""
        if self._ctx is None or self._pid != os.getpid():
            self._ctx = zmq.asyncio.Context()
            self._ctx.set(zmq.MAX_SOCKETS, self.max_sockets)
            self._pid = os.getpid()
            self._down.clear()
        return self._ctx

    def mark_down(self, endpoint: str, now: float) -> None:
        self._down[endpoint] = now + self.down_period

    def hit(self, metadata: Mapping[str, Any] | None = None) -> _Opening:
        """``async with client.hit(metadata) as hit``: open, use, close."""
        return _Opening(self, metadata)

    async def open(self, metadata: Mapping[str, Any] | None = None) -> AsyncHit:
        """Open a Hit; the caller must ``await hit.close()``."""
        attempts: list[tuple[str, str]] = []
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.open_attempts),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
            + tenacity.wait_random(0, 0.05),
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, _PassFailed) and e.any_busy
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._one_pass(dict(metadata or {}), attempts)
        except _PassFailed:
            pass
        raise no_target_error(self.srv_name, attempts)

    async def _resolve(self) -> Sequence[Any]:
        result = self.resolver.resolve(self.srv_name)
        if inspect.isawaitable(result):
            result = await result
        return list(result)

    async def _one_pass(
        self, metadata: dict[str, Any], attempts: list[tuple[str, str]]
    ) -> AsyncHit:
        now = time.monotonic()
        targets = await self._resolve()
        down = {e for e, until in self._down.items() if until > now}
        ordered = [t for t in targets if t.endpoint not in down] + [
            t for t in targets if t.endpoint in down
        ]
        any_busy = False
        for target in ordered:
            try:
                return await self._open_on(target.endpoint, metadata)
            except _Outcome as outcome:
                attempts.append((target.endpoint, str(outcome)))
                log.warning(
                    "Hit on %s: %s; trying the next target", target.endpoint, outcome
                )
                any_busy = any_busy or outcome.busy
                if not outcome.busy:
                    self.mark_down(target.endpoint, time.monotonic())
        raise _PassFailed(any_busy)

    async def _open_on(self, endpoint: str, metadata: dict[str, Any]) -> AsyncHit:
        opts = self.options
        sock = self.context().socket(zmq.DEALER)
        ok = False
        try:
            connect_hit_socket(sock, endpoint, opts, self.curve)
            session = ClientSession(opts.ping_interval, opts.liveness_timeout)
            start = time.monotonic()
            request_id = session.request(Kind.OPEN, start, opts.open_timeout)
            frames = protocol.encode_open(
                request_id, metadata, opts.max_message_size, opts.max_frames
            )
            if not await _send(sock, frames, start + opts.open_timeout):
                raise _Outcome(no_connection(opts.open_timeout, self.curve))
            answer = await _receive(sock, session)
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
            hit = AsyncHit(self, sock, session, endpoint)
            ok = True
            self._hits.add(hit)
            log.debug("Hit %#x opened on %s", session.hit_id, endpoint)
            return hit
        finally:
            if not ok:
                sock.close(linger=0)

    def close(self) -> None:
        """Terminate the context once no Hit of this process is open."""
        ctx, self._ctx = self._ctx, None
        if ctx is None or self._pid != os.getpid():
            return
        if any(not h.closed for h in list(self._hits)):
            log.warning("client closed with Hits still open; leaving its context")
            return
        ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _Opening:
    def __init__(self, client: AsyncClient, metadata: Mapping[str, Any] | None) -> None:
        self._client = client
        self._metadata = metadata
        self._hit: AsyncHit | None = None

    async def __aenter__(self) -> AsyncHit:
        self._hit = await self._client.open(self._metadata)
        return self._hit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._hit is not None
        if exc_type is None:
            await self._hit.close()
        else:
            self._hit.abandon()


async def _send(sock: zmq.asyncio.Socket, frames: list[Any], deadline: float) -> bool:
    """Queue a message, waiting for a connected peer until ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    try:
        await asyncio.wait_for(sock.send_multipart(frames, copy=False), remaining)
    except TimeoutError:
        return False
    return True


def _send_now(sock: zmq.asyncio.Socket, frames: list[Any]) -> bool:
    """Send without waiting; False when it would have to wait.

    ``zmq.asyncio`` never raises ``zmq.Again`` here: it returns a future that
    holds it, and an unread failed future is logged when collected.
    """
    future = sock.send_multipart(frames, zmq.NOBLOCK)
    if not isinstance(future, asyncio.Future):
        return True
    if future.done():
        return not future.cancelled() and future.exception() is None
    # Queued behind a send still in progress: read its outcome when it ends.
    future.add_done_callback(_read_outcome)
    return True


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _receive(
    sock: zmq.asyncio.Socket, session: ClientSession
) -> protocol.Message | None:
    """The answer to the outstanding request, or None once the session gives up."""
    while True:
        step = session.next_step(time.monotonic())
        if step is None:
            return None
        if step.ping:
            # Not sent when not connected: the silence it leads to is the verdict.
            _send_now(sock, protocol.encode(Kind.PING, session.hit_id, step.ping))
        timeout_ms = int(min(step.timeout, SLICE) * 1000) + 1
        if not await sock.poll(timeout_ms):
            continue
        # Never a blocking recv here: under load, with the peer just killed,
        # the asyncio poll reported a message that a recv then waited for
        # forever.
        try:
            frames = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            continue
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


class AsyncHit:
    """One open Hit, used from the task that opened it; see :class:`Hit`."""

    def __init__(
        self,
        client: AsyncClient,
        sock: zmq.asyncio.Socket,
        session: ClientSession,
        endpoint: str,
    ) -> None:
        self.endpoint = endpoint
        self.hit_id = session.hit_id
        self._client = client
        self._options = client.options
        self._sock: zmq.asyncio.Socket | None = sock
        self._session = session
        self._owner_thread = threading.get_ident()
        self._owner_task = asyncio.current_task()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<AsyncHit {self.hit_id:#x} on {self.endpoint} {self._session.state.value}>"

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _check(self) -> zmq.asyncio.Socket:
        if (
            threading.get_ident() != self._owner_thread
            or asyncio.current_task() is not self._owner_task
            or os.getpid() != self._pid
        ):
            raise WrongThread(
                f"Hit {self.hit_id:#x} belongs to the task that opened it; "
                "open a Hit in this task instead"
            )
        if self._sock is None:
            raise HitClosed(f"Hit {self.hit_id:#x} on {self.endpoint} is over")
        return self._sock

    def abandon(self) -> None:
        """End the Hit without waiting; the server reaps it after any running call."""
        sock, self._sock = self._sock, None
        self._session.state = ClientState.LOST
        if sock is None:
            return
        try:
            _send_now(sock, protocol.encode(Kind.CLOSE, self.hit_id, 0))
        except zmq.ZMQError:
            pass
        sock.close(linger=LINGER_MS)

    def _lost(self) -> None:
        """Abandon the Hit and have the next open try its server last."""
        self.abandon()
        self._client.mark_down(self.endpoint, time.monotonic())

    async def call(
        self, method: str, *args: Any, timeout: float | None = None
    ) -> Reply:
        """Run ``method(*args)`` on the Hit's server thread; see ``Hit.call``."""
        sock = self._check()
        opts = self._options
        frames = call_frames(method, args, opts.max_message_size, opts.max_frames)
        timeout = opts.call_timeout if timeout is None else timeout
        session = self._session
        now = time.monotonic()
        request_id = session.request(Kind.CALL, now, timeout, frames_size(frames))
        what = f"Hit {self.hit_id:#x} on {self.endpoint}, call {method!r}"
        message = protocol.encode(Kind.CALL, self.hit_id, request_id, frames)
        # A server that is not even connected is as lost as a silent one.
        connect_wait = min(timeout, opts.liveness_timeout)
        try:
            if not await _send(sock, message, now + connect_wait):
                self._lost()
                raise HitLost(f"{what}: server not connected for {connect_wait:g} s")
            answer = await _receive(sock, session)
        except BaseException:
            # Cancelled mid-call: a later reply would be out of step.
            self.abandon()
            raise
        if answer is None:
            now = time.monotonic()
            if session.silent(now):
                self._lost()
                raise HitLost(
                    f"{what}: server silent for {session.lost_for(now):.1f} s"
                )
            self.abandon()
            raise HitTimeout(f"{what}: no reply within {timeout:g} s")
        try:
            return answer_or_raise(answer, what)
        except (HitLost, ProtocolError):
            self.abandon()
            raise

    async def close(self) -> None:
        """End the Hit: the server runs the handler's close() and answers OK."""
        if self._sock is None:
            return
        sock = self._check()
        session = self._session
        now = time.monotonic()
        request_id = session.request(Kind.CLOSE, now, self._options.open_timeout)
        try:
            frames = protocol.encode(Kind.CLOSE, self.hit_id, request_id)
            if await _send(sock, frames, now + self._options.open_timeout):
                if await _receive(sock, session) is None:
                    log.warning("Hit %#x: no answer to CLOSE", self.hit_id)
        finally:
            session.state = ClientState.CLOSED
            self._sock = None
            sock.close(linger=LINGER_MS)
        log.debug("Hit %#x closed", self.hit_id)
