"""The Hit server: one ROUTER port in front, one thread per Hit behind it.

The front loop owns the TCP ROUTER socket and an inproc ROUTER that every Hit
worker connects a DEALER to (identity = the hit id). It only moves frames: the
routing decisions are :class:`mesh.hit.session.HitTable`'s. Payload frames are
received with ``copy=False`` and passed on as the same zmq messages, so a
large blob crosses the front loop without being copied.

Each worker thread creates, uses and closes its own socket (C08), builds the
handler at OPEN, runs every CALL and finally ``close()`` on itself. The front
tells a worker to stop with a one-frame ``reap`` message and a worker tells the
front it is gone with one empty frame; neither ever touches the other's socket.

Handler contract
----------------
``handler_factory(metadata)`` is called on the Hit's thread when it opens,
with the client's metadata dict, and returns the handler. A CALL of
``method`` runs ``handler.method(*args)`` with each argument frame as a
``memoryview`` (use ``bytes(arg)`` or ``str(arg, "utf-8")``). The return value
becomes the reply frames: ``None`` is none, bytes or any buffer is one frame,
``str`` is UTF-8, ``int``/``float`` their decimal text, and a list or tuple is
one frame per item. Names starting with ``_`` and ``close`` cannot be called.
If the handler has ``close()``, it runs on the same thread when the Hit ends
(client CLOSE, idle reaping, server shutdown).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from mesh.curve import Curve, ServerAuth, warn_if_exposed
from mesh.errors import HitError, ProtocolError
from mesh.hit import protocol
from mesh.hit.protocol import Kind
from mesh.hit.session import Answer, Drop, Forward, HitTable, Start

__all__ = ["HitServer", "Registrar", "reply_frames"]

log = logging.getLogger(__name__)

HandlerFactory = Callable[[dict[str, Any]], Any]

_REAP = b"reap"
_GONE = b""
# How long one poll may block: the bound on reacting to a stop request.
_SLICE_MS = 100
# Headroom over max_message_size for the header and method frames, so the
# per-frame MAXMSGSIZE limit never refuses a payload the size check accepts.
_FRAME_HEADROOM = 64 * 1024
# Answers at least this large are announced with a PONG carrying their size,
# so the client allows for their transfer time (see ClientSession). Smaller
# ones arrive well within any liveness timeout.
_ANNOUNCE_BYTES = 1024 * 1024
# Sockets besides the workers': the front, the back, and a margin for a
# caller's own sockets on this context (C07).
_EXTRA_SOCKETS = 32


class Registration(Protocol):
    def close(self) -> None: ...


class Registrar(Protocol):
    """What the server needs from ``mesh.discovery.register.Registrar``."""

    def register(
        self,
        srv_name: str,
        target: str,
        port: int,
        addresses: Sequence[str],
        priority: int = 0,
        weight: int = 1,
    ) -> Registration: ...


def _text(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, int | float):
        return str(value).encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return value  # type: ignore[return-value]
    try:
        return memoryview(value)  # type: ignore[return-value]
    except TypeError:
        raise TypeError(
            f"handler returned {type(value).__name__}; return bytes, a buffer, "
            "str, int, float, None, or a list of those"
        ) from None


def reply_frames(result: Any) -> list[Any]:
    """The REPLY frames for a handler's return value (see the module docstring)."""
    if result is None:
        return []
    if isinstance(result, list | tuple):
        return [_text(item) for item in result]
    return [_text(result)]


def _close_handler(handler: Any, hit_id: int) -> None:
    close = getattr(handler, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        # Nobody to raise to: the client is gone or already has its OK.
        log.exception("Hit %#x: handler close() raised", hit_id)


def _run_call(
    handler: Any, message: protocol.Message, limits: tuple[int, int] | None
) -> list[Any]:
    method = message.method
    function = None
    if not method.startswith("_") and method != "close":
        function = getattr(handler, method, None)
    if not callable(function):
        return protocol.encode_error(
            message.hit_id,
            message.request_id,
            "NoSuchMethod",
            f"{type(handler).__name__} has no method {method!r}",
        )
    try:
        frames = reply_frames(function(*message.args))
    except Exception as exc:
        log.debug("Hit %#x: %s raised %r", message.hit_id, method, exc)
        return protocol.encode_error(
            message.hit_id, message.request_id, type(exc).__name__, str(exc)
        )
    if limits is not None:
        too_big = _over_limits(frames, limits)
        if too_big:
            log.debug("Hit %#x: %s reply refused: %s", message.hit_id, method, too_big)
            return protocol.encode_error(
                message.hit_id, message.request_id, "MessageTooLarge", too_big
            )
    return protocol.encode(Kind.REPLY, message.hit_id, message.request_id, frames)


def _over_limits(frames: Sequence[Any], limits: tuple[int, int]) -> str:
    """Why a reply would be past the client's limits ("" when it is not).

    The client's socket would drop an oversized reply, and the call would
    look like a timeout; an ERROR tells it what happened instead.
    """
    max_size, max_frames = limits
    size = sum(protocol.frame_size(f) for f in frames)
    if size > max_size:
        return f"reply of {size} bytes is over the client's limit of {max_size}"
    if len(frames) + 1 > max_frames:
        return (
            f"reply of {len(frames) + 1} frames is over the client's limit of "
            f"{max_frames}"
        )
    return ""


def _worker(
    ctx: zmq.Context[zmq.Socket[bytes]],
    back_endpoint: str,
    hit_id: int,
    factory: HandlerFactory,
    open_message: protocol.Message,
    stop: threading.Event,
) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, hit_id.to_bytes(8, "big"))
    # inproc delivers at once; the linger only covers the last OK and GONE.
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(back_endpoint)
    handler: Any = None
    try:
        try:
            handler = factory(open_message.metadata)
        except Exception as exc:
            log.warning("Hit %#x: handler factory raised %r", hit_id, exc)
            sock.send_multipart(
                protocol.encode_error(
                    hit_id, open_message.request_id, type(exc).__name__, str(exc)
                )
            )
            return
        log.debug("Hit %#x opened on thread %d", hit_id, threading.get_ident())
        limits = open_message.limits
        sock.send_multipart(protocol.encode(Kind.OK, hit_id, open_message.request_id))
        while not stop.is_set():
            if not sock.poll(_SLICE_MS * 5):
                continue
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 1 and frames[0].bytes == _REAP:
                log.debug("Hit %#x reaped", hit_id)
                break
            message = protocol.decode(frames)
            if message.kind is Kind.CALL:
                sock.send_multipart(_run_call(handler, message, limits), copy=False)
            elif message.kind is Kind.CLOSE:
                _close_handler(handler, hit_id)
                handler = None
                sock.send_multipart(
                    protocol.encode(Kind.OK, hit_id, message.request_id)
                )
                log.debug("Hit %#x closed by the client", hit_id)
                break
    finally:
        if handler is not None:
            _close_handler(handler, hit_id)
        with contextlib.suppress(zmq.ZMQError):
            sock.send(_GONE)
        sock.close()


class HitServer:
    """Serves Hits of one handler on one TCP port.

    Use as a context manager (runs the front loop on a background thread), or
    call :meth:`serve_forever` on the thread that should run it. Registration
    happens after the bind when ``registrar`` and ``srv_name`` are given, and
    is removed first thing on drain or stop.
    """

    def __init__(
        self,
        handler_factory: HandlerFactory,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        max_hits: int = 256,
        idle_timeout: float = 300.0,
        max_message_size: int = 2 * 1024**3,
        max_frames: int = 1024,
        drain_timeout: float = 10.0,
        registrar: Registrar | None = None,
        srv_name: str | None = None,
        target: str | None = None,
        advertise: Sequence[str] | None = None,
        priority: int = 0,
        weight: int = 1,
        curve: Curve | None = None,
    ) -> None:
        self.handler_factory = handler_factory
        self.bind_address = bind
        self.port = port
        self.max_hits = max_hits
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self.max_frames = max_frames
        self.drain_timeout = drain_timeout
        self.registrar = registrar
        self.srv_name = srv_name
        self.target = target
        self.advertise = list(advertise) if advertise else [bind]
        self.priority = priority
        self.weight = weight
        if curve is not None:
            curve.allow_list()
        self.curve = curve
        self.table = HitTable(max_hits, idle_timeout)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx.setsockopt(zmq.LINGER, 500)
        self._ctx.set(zmq.MAX_SOCKETS, max_hits + _EXTRA_SOCKETS)
        self._back_endpoint = f"inproc://srvmesh-hit-{secrets.token_hex(8)}"
        self._workers: dict[int, threading.Thread] = {}
        self._worker_stop = threading.Event()
        self._ready = threading.Event()
        self._drain = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._registration: Registration | None = None

    @property
    def endpoint(self) -> str:
        host = self.bind_address
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{self.port}"

    # -- control, from any thread ------------------------------------------

    def start(self, timeout: float = 30.0) -> HitServer:
        """Run the front loop on a background thread; return once bound and,
        with a registrar, registered (its retries take up to its budget)."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="hit-front", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise HitError(
                f"Hit server on {self.bind_address} did not start in {timeout} s"
            )
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def drain(self) -> None:
        """Deregister, answer BUSY to opens, end once open Hits finish."""
        self._drain.set()

    def stop(self) -> None:
        """Deregister and end now; open Hits are closed on their threads."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> HitServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the front loop ----------------------------------------------------

    def serve_forever(self) -> None:
        """Bind, register, route until drained or stopped, then clean up."""
        auth = None
        try:
            if self.curve is not None:
                # Before the bind: a Curve socket without ZAP accepts any key.
                auth = ServerAuth(self._ctx, self.curve).start()
            front = self._ctx.socket(zmq.ROUTER)
            back = self._ctx.socket(zmq.ROUTER)
        except BaseException as exc:
            if auth is not None:
                auth.stop()
            self._startup_error = exc
            self._ready.set()
            raise
        try:
            try:
                self._bind(front, back)
                # Before start() returns: a caller that starts a server and
                # at once resolves its name must find it (a test did not).
                self._register()
            except BaseException as exc:
                self._startup_error = exc
                raise
            finally:
                self._ready.set()
            self._loop(front, back)
            self._shutdown(front, back)
        finally:
            self._deregister()
            front.close(linger=500)
            back.close(linger=0)
            if auth is not None:
                auth.stop()
            if not any(t.is_alive() for t in self._workers.values()):
                self._ctx.term()
            else:
                # A handler that never returns keeps its socket; terminating
                # the context would wait for it forever (C03).
                log.warning("leaving the zmq context: some Hit threads are stuck")
            self._done.set()

    def _bind(self, front: zmq.Socket[bytes], back: zmq.Socket[bytes]) -> None:
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A client that reconnects (a network blip, a restarted connection)
        # comes back with its Hit socket's fixed routing id; handing the id
        # over to the new connection keeps its Hit instead of refusing it.
        front.setsockopt(zmq.ROUTER_HANDOVER, 1)
        front.setsockopt(zmq.MAXMSGSIZE, self.max_message_size + _FRAME_HEADROOM)
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.curve is not None:
            self.curve.server(front)
        warn_if_exposed(self.bind_address, self.curve, "Hit server")
        host = self.bind_address
        if ":" in host:
            front.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        try:
            front.bind(f"tcp://{host}:{self.port or '*'}")
        except zmq.ZMQError as exc:
            raise HitError(
                f"cannot bind {self.bind_address}:{self.port}: {exc.strerror}"
            ) from exc
        last = front.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(last, bytes)
        self.port = int(last.decode().rsplit(":", 1)[1])
        back.bind(self._back_endpoint)
        log.info("serving Hits on %s", self.endpoint)

    def _register(self) -> None:
        if self.registrar is None or not self.srv_name:
            return
        target = self.target or self.bind_address
        self._registration = self.registrar.register(
            self.srv_name,
            target,
            self.port,
            self.advertise,
            priority=self.priority,
            weight=self.weight,
        )
        log.info("registered %s -> %s:%d", self.srv_name, target, self.port)

    def _deregister(self) -> None:
        registration, self._registration = self._registration, None
        if registration is None:
            return
        try:
            registration.close()
            log.info("deregistered %s", self.srv_name)
        except Exception as exc:
            log.warning("could not deregister %s: %r", self.srv_name, exc)

    def _loop(self, front: zmq.Socket[bytes], back: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        idle_check = time.monotonic() + 1.0
        drain_deadline = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._drain.is_set() and not self.table.draining:
                log.info("draining: %d Hits open", len(self.table))
                self._deregister()
                self.table.draining = True
                drain_deadline = now + self.drain_timeout
            if self.table.draining and (not self.table or now >= drain_deadline):
                return
            events = dict(poller.poll(_SLICE_MS))
            now = time.monotonic()
            if back in events:
                self._pump_back(front, back, now)
            if front in events:
                self._pump_front(front, back, now)
            if now >= idle_check:
                for hit_id in self.table.idle(now):
                    log.info(
                        "Hit %#x idle for %.0f s, reaping", hit_id, self.idle_timeout
                    )
                    self._reap(back, hit_id)
                idle_check = now + min(1.0, self.idle_timeout / 4)

    def _shutdown(self, front: zmq.Socket[bytes], back: zmq.Socket[bytes]) -> None:
        self._deregister()
        for hit_id in self.table.close_all():
            self._reap(back, hit_id)
        # Give each worker a moment to run its handler's close() and say so.
        deadline = time.monotonic() + 3.0
        while self.table and time.monotonic() < deadline:
            if back.poll(_SLICE_MS):
                self._pump_back(front, back, time.monotonic())
        self._worker_stop.set()
        for thread in self._workers.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _reap(self, back: zmq.Socket[bytes], hit_id: int) -> None:
        try:
            back.send_multipart([hit_id.to_bytes(8, "big"), _REAP], zmq.NOBLOCK)
        except zmq.ZMQError:
            # Not connected yet or already gone: the worker ends by itself.
            log.debug("Hit %#x: reap not delivered", hit_id)

    def _pump_back(
        self, front: zmq.Socket[bytes], back: zmq.Socket[bytes], now: float
    ) -> None:
        for _ in range(1000):
            try:
                frames = back.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            hit_id = int.from_bytes(frames[0].bytes, "big")
            if len(frames) == 2 and not frames[1].buffer.nbytes:
                self.table.worker_gone(hit_id)
                thread = self._workers.pop(hit_id, None)
                if thread is not None:
                    thread.join(1.0)
                continue
            header = protocol.decode_header(frames[1])
            decision = self.table.from_worker(header, now)
            if isinstance(decision, Forward):
                size = sum(f.buffer.nbytes for f in frames[2:])
                if size >= _ANNOUNCE_BYTES:
                    announce = protocol.encode(
                        Kind.PONG, header.hit_id, header.request_id, [b"%d" % size]
                    )
                    self._send_front(front, [decision.peer, *announce])
                self._send_front(front, [decision.peer, *frames[1:]])
            else:
                log.debug("Hit %#x: dropping worker message: %s", hit_id, decision)

    def _pump_front(
        self, front: zmq.Socket[bytes], back: zmq.Socket[bytes], now: float
    ) -> None:
        for _ in range(1000):
            try:
                first = front.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames, extra = self._recv_rest(front, first)
            if extra:
                self._too_many_frames(front, frames, len(frames) - 1 + extra)
                continue
            try:
                self._from_client(front, back, frames, now)
            except zmq.ZMQError:
                raise
            except Exception:
                # One peer's message must never end the loop every Hit
                # depends on; the fuzz test found one such message before.
                log.exception("dropping a client message that could not be handled")

    def _recv_rest(
        self, front: zmq.Socket[bytes], first: zmq.Frame
    ) -> tuple[list[zmq.Frame], int]:
        """The rest of a message, keeping at most max_frames after the peer id.

        Frames past the limit are read and dropped one at a time, so a peer
        sending millions of empty frames costs us time but not memory.
        """
        frames = [first]
        extra = 0
        while front.getsockopt(zmq.RCVMORE):
            # The parts of a multipart message arrive together: no wait here.
            frame = front.recv(copy=False)
            if len(frames) <= self.max_frames:
                frames.append(frame)
            else:
                extra += 1
        return frames, extra

    def _too_many_frames(
        self, front: zmq.Socket[bytes], frames: list[zmq.Frame], count: int
    ) -> None:
        peer = frames[0].bytes
        text = f"message of {count} frames exceeds the limit of {self.max_frames}"
        try:
            header = protocol.decode_header(frames[1])
        except ProtocolError:
            log.debug("dropping a message from a peer: %s", text)
            return
        log.debug("Hit %#x: protocol error: %s", header.hit_id, text)
        error = protocol.encode_error(
            header.hit_id, header.request_id, "ProtocolError", text
        )
        self._send_front(front, [peer, *error])

    def _from_client(
        self,
        front: zmq.Socket[bytes],
        back: zmq.Socket[bytes],
        frames: list[zmq.Frame],
        now: float,
    ) -> None:
        peer = frames[0].bytes
        body = frames[1:]
        try:
            message = protocol.decode(body)
            size = sum(f.buffer.nbytes for f in body)
            if size > self.max_message_size + _FRAME_HEADROOM:
                raise ProtocolError(
                    f"message of {size} bytes exceeds the limit of "
                    f"{self.max_message_size}"
                )
        except ProtocolError as exc:
            try:
                header = protocol.decode_header(body[0]) if body else None
            except ProtocolError:
                header = None
            if header is None:
                log.debug("dropping %d garbage frames from a peer: %s", len(body), exc)
                return
            log.debug("Hit %#x: protocol error: %s", header.hit_id, exc)
            self._send_front(
                front,
                [
                    peer,
                    *protocol.encode_error(
                        header.hit_id, header.request_id, "ProtocolError", str(exc)
                    ),
                ],
            )
            return
        decision = self.table.from_client(peer, message.header, now)
        log.debug(
            "%s %#x/%d -> %s",
            message.kind.name,
            message.hit_id,
            message.request_id,
            decision,
        )
        if isinstance(decision, Answer):
            reply = protocol.encode(
                decision.kind,
                decision.hit_id,
                decision.request_id,
                [f.encode() for f in decision.frames],
            )
            self._send_front(front, [peer, *reply])
        elif isinstance(decision, Start):
            if not self._start_worker(decision.hit_id, message):
                busy = protocol.encode(
                    Kind.BUSY, 0, message.request_id, [b"out of threads"]
                )
                self._send_front(front, [peer, *busy])
        elif isinstance(decision, Forward):
            try:
                back.send_multipart(
                    [decision.hit_id.to_bytes(8, "big"), *body], zmq.NOBLOCK, copy=False
                )
            except zmq.ZMQError as exc:
                log.warning("Hit %#x: worker unreachable: %s", decision.hit_id, exc)
        elif isinstance(decision, Drop):
            pass

    def _start_worker(self, hit_id: int, message: protocol.Message) -> bool:
        thread = threading.Thread(
            target=_worker,
            args=(
                self._ctx,
                self._back_endpoint,
                hit_id,
                self.handler_factory,
                message,
                self._worker_stop,
            ),
            name=f"hit-{hit_id:016x}",
            daemon=True,
        )
        self._workers[hit_id] = thread
        try:
            thread.start()
        except RuntimeError as exc:
            # Out of threads: refuse this Hit only, the others keep working.
            log.warning("Hit %#x: cannot start a thread: %s", hit_id, exc)
            self._workers.pop(hit_id, None)
            self.table.worker_gone(hit_id)
            return False
        return True

    def _send_front(self, front: zmq.Socket[bytes], frames: list[Any]) -> None:
        try:
            front.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            # The client went away (or stopped reading); its Hit will idle out.
            log.debug("dropping a message to a gone peer: %s", exc.strerror)
