"""A pool member: an embeddable component that answers and sends broadcasts.

Threads and sockets
-------------------
A :class:`PoolMember` runs one *member thread* that owns every socket it
uses: a DEALER to the host master and an inproc PULL for handler results.
Handlers run on a separate *worker thread* (so a slow handler never stops
heartbeats); it owns one inproc PUSH. A ``broadcast()`` call opens no socket:
it puts its :class:`~mesh.pool.tracker.GatherTracker` on a queue, wakes the
member thread through a pipe and waits on a future. The member thread feeds
each tracker the events its master relays and resolves the future once the
tracker is done, so an event is handled once, on the thread that received
it. The member thread also takes part in the election; when it wins, a
:class:`~mesh.pool.master.Master` thread starts in the same process. No
socket crosses threads (C08).

Times with the defaults (heartbeat 250 ms x liveness 4)
------------------------------------------------------
Let ``i`` be ``heartbeat_interval`` and ``L = i * heartbeat_liveness``.

- A member that dies is failed in every open broadcast after at most ``L``
  (1 s) of silence; one whose socket goes away is failed on the master's next
  heartbeat send (``i``, 250 ms).
- A crashed master frees its lock at once; the members poll the lock every
  ``i``, so a new master is bound and recorded within about ``i`` (plus the
  DNS registration, a few ms on a local responder). The other members read
  the new record on their next tick, so broadcasts complete again within
  about ``i`` of the new record, ``2 i`` (0.5 s) after the crash. Remote
  masters learn the new endpoint from the heartbeat it sends each peer it
  finds, at once, or from DNS within ``RESOLVE_INTERVAL``.
- A hung master is voted out after ``L`` of silence (1 s); the vote needs
  one more tick for the other voters (``i``) and the kill plus takeover adds
  about ``2 i``: about ``L + 3 i`` (1.75 s), inside the 3 s goal.
- A master that exits cleanly tells its members (``RESIGN``); they try the
  lock on the spot, so a successor takes over within one loop turn.

``scripts/bench pool`` measures each of these; docs/pool.md has the figures.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from mesh.config import Settings
from mesh.curve import Curve, ServerAuth
from mesh.errors import BroadcastRejected, ConfigError, MasterUnavailable, PoolError
from mesh.pool.directory import DnsDirectory, FileDirectory, MasterDirectory
from mesh.pool.election import (
    Election,
    MasterRecord,
    MasterState,
    MasterWatch,
    kill_quorum,
    process_alive,
    process_start_time,
)
from mesh.pool.master import Master, decode, encode, recv_nowait, send_nowait
from mesh.pool.tracker import BroadcastResult, GatherTracker, MemberInfo

__all__ = ["PoolMember", "demo_handler", "main"]

log = logging.getLogger(__name__)

#: Default budget of a broadcast when the caller gives no deadline.
DEFAULT_TIMEOUT = 10.0
# The member thread settles every broadcast by its deadline; a caller waits
# this much longer only to notice a member thread that died.
CALL_GRACE = 5.0

_ids = itertools.count()


@dataclasses.dataclass
class _Call:
    """One ``broadcast()`` handed to the member thread, answered through ``done``."""

    tracker: GatherTracker
    header: bytes
    payload: bytes
    done: concurrent.futures.Future[BroadcastResult] = dataclasses.field(
        default_factory=concurrent.futures.Future
    )


class _Answers:
    """Replies the master's queue could not take yet, retried in order.

    Each waits at most until its ``deadline``: a member whose messages
    cannot reach its master for the liveness window has been failed there
    already, and the reply could no longer change the result.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[float, list[bytes]]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def add(self, frames: list[bytes], deadline: float) -> None:
        self._queue.append((deadline, frames))

    def clear(self) -> None:
        self._queue.clear()

    def flush(
        self, send: Callable[[list[bytes]], bool], now: float
    ) -> list[list[bytes]]:
        """Send what the queue takes; returns the answers dropped as expired."""
        expired = []
        while self._queue:
            deadline, frames = self._queue[0]
            if deadline <= now:
                expired.append(frames)
            elif not send(frames):
                break
            self._queue.popleft()
        return expired


class PoolMember:
    """One member of ``pool`` on this host, to embed in a server process.

    ``on_broadcast`` runs on the member's worker thread for every broadcast
    it receives, one at a time; its return value is the reply and an
    exception becomes a ``failed`` outcome carrying the exception's text.

    ``directory`` is how masters find each other; by default DNS through
    ``settings`` (``None`` disables it: a single-host pool). ``eligible=False``
    keeps this member out of the election, for short-lived members such as
    ``mesh broadcast``.
    """

    def __init__(
        self,
        pool: str,
        settings: Settings,
        on_broadcast: Callable[[bytes], bytes],
        host_address: str = "127.0.0.1",
        *,
        directory: MasterDirectory | None | str = "dns",
        eligible: bool = True,
        member_id: str | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.on_broadcast = on_broadcast
        self.host = host_address
        self.eligible = eligible
        pid = os.getpid()
        self.info = MemberInfo(
            member_id or f"{host_address}-{pid}-{secrets.token_hex(3)}",
            host_address,
            pid,
        )
        self._directory_spec = directory
        self._dns_directory: DnsDirectory | None = None
        self.interval = settings.heartbeat_interval
        self.liveness_timeout = (
            settings.heartbeat_interval * settings.heartbeat_liveness
        )
        self.curve = Curve.from_settings(settings)
        if self.curve is not None and eligible:
            self.curve.allow_list()
            if self.curve.public != self.curve.server_public:
                # Remote masters and local members connect to a master with
                # the servers' public key; any other key would lock them out.
                raise ConfigError(
                    f"pool {pool!r}: this member may become master, which needs "
                    "the servers' keypair, but curve_secret_key is another pair "
                    "than curve_server_key"
                )
        self._context: zmq.Context[Any] = zmq.Context()
        # Started with the first term as master: only a master listens.
        self._auth: ServerAuth | None = None
        self._results_endpoint = f"inproc://pool-results-{self.info.id}"
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._master_ok = threading.Event()
        self._problem = "no master yet"
        self._hung = False
        self._send_blocked = False
        # With Curve, a monitor on the dealer tells a refused key apart from a
        # silent master: libzmq reports the failed handshake to the client.
        self._monitor: zmq.Socket[bytes] | None = None
        self._key_refused_at: float | None = None
        # SimpleQueue: its put wakes the worker without a Python-level Condition,
        # which was the member thread's hottest line on the request path.
        self._jobs: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        # One byte per call wakes the member thread's poll; non-blocking, as
        # a full pipe already means a wake-up is pending.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"pool-member-{pool}", daemon=True
        )
        self._worker = threading.Thread(
            target=self._work, name=f"pool-worker-{pool}", daemon=True
        )
        self._master: Master | None = None
        # Why the master refused us a seat; None while we have one.
        self._refused: str | None = None
        self._outstanding = 0
        # Ids of broadcasts settled here, for the master to forget.
        self._finished: list[bytes] = []
        self._epoch = 0
        self._started = False
        self._closed = False

    # -- public -------------------------------------------------------------

    @property
    def is_master(self) -> bool:
        return self._master is not None and self._master.running

    @property
    def epoch(self) -> int:
        """Epoch of the master this member is connected to (0: none yet)."""
        return self._epoch

    def start(self, timeout: float = 5.0) -> None:
        """Start the threads; returns once the member is listening."""
        if self._started:
            return
        self._started = True
        self._thread.start()
        if not self._bound.wait(timeout):
            raise PoolError(f"pool member {self.info.id!r} did not start")
        self._worker.start()

    def wait_for_master(self, timeout: float) -> bool:
        """Wait until connected to a live master; False when ``timeout`` ran out."""
        return self._master_ok.wait(timeout)

    def broadcast(
        self,
        payload: bytes,
        deadline: float | None = None,
        *,
        timeout: float | None = None,
        include_self: bool = True,
        quorum: int | None = None,
    ) -> BroadcastResult:
        """Send ``payload`` to every member of the pool and gather the replies.

        ``deadline`` is a ``time.monotonic()`` value; ``timeout`` is relative
        seconds (default 10 s) and is used when no deadline is given. Returns
        when every expected member has an outcome, when ``quorum`` members
        replied, or at the deadline, whichever is first.

        :raises MasterUnavailable: this host has no usable master (none
            elected within the liveness window, or it is hung and killing it
            is disabled).
        """
        if not self._started or self._closed or not self._thread.is_alive():
            raise PoolError(f"pool member {self.info.id!r} is not running")
        now = time.monotonic()
        if deadline is None:
            deadline = now + (DEFAULT_TIMEOUT if timeout is None else timeout)
        if not self._master_ok.is_set():
            if self._hung:
                raise MasterUnavailable(self._problem)
            wait = min(deadline - now, 2 * self.liveness_timeout)
            if not self._master_ok.wait(max(0.0, wait)):
                raise MasterUnavailable(
                    f"pool {self.pool!r} has no usable master on {self.host}: "
                    f"{self._problem}"
                )
        if self._refused is not None:
            raise BroadcastRejected(
                f"pool member {self.info.id!r} has no seat: {self._refused}"
            )
        bid = f"{self.info.id}-{next(_ids)}-{secrets.token_hex(4)}"
        header = {
            "bid": bid,
            "timeout": max(0.0, deadline - time.monotonic()),
            "include_self": include_self,
        }
        call = _Call(GatherTracker(bid, deadline, quorum), encode(header), payload)
        with self._wake_lock:
            if self._closed:
                raise PoolError(f"pool member {self.info.id!r} closed")
            limit = self.settings.max_pending_broadcasts
            if self._outstanding >= limit:
                raise BroadcastRejected(
                    f"{self._outstanding} broadcasts pending on pool member "
                    f"{self.info.id!r}: max_pending_broadcasts is {limit}"
                )
            self._outstanding += 1
            call.done.add_done_callback(self._call_ended)
            self._calls.put(call)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")
        try:
            return call.done.result(max(0.0, deadline - time.monotonic()) + CALL_GRACE)
        except concurrent.futures.TimeoutError:
            raise PoolError(
                f"pool member {self.info.id!r} did not settle broadcast {bid}"
            ) from None

    def _call_ended(self, _: concurrent.futures.Future[BroadcastResult]) -> None:
        with self._wake_lock:
            self._outstanding -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Leave the pool: stop the master role if held, then the threads."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._jobs.put(None)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        if self._started:
            self._thread.join(timeout)
            self._worker.join(timeout)
        self._context.term()
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> PoolMember:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the worker thread --------------------------------------------------

    def _work(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._results_endpoint)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                bid, payload = job
                try:
                    reply = self.on_broadcast(payload)
                    frames = [bid.encode(), b"ok", bytes(reply)]
                except Exception as exc:
                    log.debug("handler failed for %s: %r", bid, exc)
                    frames = [
                        bid.encode(),
                        b"err",
                        f"{type(exc).__name__}: {exc}".encode(),
                    ]
                push.send_multipart(frames)
        except zmq.ContextTerminated:
            return
        finally:
            push.close(linger=0)

    # -- the member thread --------------------------------------------------

    def _run(self) -> None:
        results = self._context.socket(zmq.PULL)
        results.setsockopt(zmq.LINGER, 0)
        dealer: zmq.Socket[bytes] | None = None
        election: Election | None = None
        calls: dict[str, _Call] = {}
        try:
            results.bind(self._results_endpoint)
            election = Election(self.settings.runtime_dir, self.pool, self.info.id)
            election.join(self.info.pid, process_start_time(self.info.pid) or 0)
            self._bound.set()
            if self.eligible:
                # Built before it is needed: a takeover after a crash then
                # does not wait for the DNS modules to import, which took a
                # few hundred ms on a loaded machine.
                self._make_directory()
            dealer = self._loop(results, election, calls)
        except Exception:
            log.exception("pool member %s failed", self.info.id)
        finally:
            self._bound.set()
            self._master_ok.clear()
            if dealer is not None:
                with contextlib.suppress(zmq.ZMQError):
                    dealer.send_multipart([b"BYE"], zmq.NOBLOCK)
                dealer.close(linger=100)
            if self._monitor is not None:
                self._monitor.close(linger=0)
                self._monitor = None
            if self._master is not None:
                self._master.stop()
                self._master = None
            if self._auth is not None:
                # Here, on the thread that started it: its pipe is ours.
                self._auth.stop()
                self._auth = None
            if election is not None:
                election.release()
                election.leave()
            results.close(linger=0)
            # Whoever is still waiting hears now, not after CALL_GRACE.
            closed = PoolError(f"pool member {self.info.id!r} closed")
            while True:
                try:
                    queued = self._calls.get_nowait()
                except queue.Empty:
                    break
                calls[queued.tracker.broadcast_id] = queued
            for call in calls.values():
                call.done.set_exception(closed)

    def _loop(
        self,
        results: zmq.Socket[bytes],
        election: Election,
        calls: dict[str, _Call],
    ) -> zmq.Socket[bytes] | None:
        watch = MasterWatch(self.liveness_timeout)
        dealer: zmq.Socket[bytes] | None = None
        working: set[str] = set()
        answers = _Answers()
        voted_epoch = 0
        reported_epoch = 0
        next_tick = 0.0
        me = encode(self.info.to_wire())
        # Kept across turns of the loop; only a new dealer changes it.
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.interval
                # -- election: take the lock if free, follow the record ---------
                if self.eligible and election.try_acquire():
                    if self._master is None or not self._master.running:
                        self._become_master(election)
                record = election.read_record()
                if watch.observe_record(record, now):
                    if calls:
                        self._master_lost(calls, "master of this host changed", now)
                    if dealer is not None:
                        self._disconnect(dealer, poller)
                        dealer = None
                    # The new master has no route for them.
                    answers.clear()
                    self._master_ok.clear()
                    self._hung = False
                    self._key_refused_at = None
                    if record is not None:
                        dealer = self._connect(record, poller)
                        self._epoch = record.epoch
                        election.prune_votes(record.epoch)
                alive = record is not None and process_alive(
                    record.pid, record.start_time
                )
                state = watch.state(now, alive)
                refused = self._key_refused_at
                if state is MasterState.HEALTHY:
                    self._master_ok.set()
                    self._hung = False
                elif refused is not None and record is not None:
                    self._master_ok.clear()
                    self._problem = (
                        f"the master of pool {self.pool!r} on {self.host} refused "
                        "this member's Curve key: is its public key in the "
                        "master's allow-list (MESH_CURVE_ALLOW_DIR)?"
                    )
                    # A master that refuses us is not hung: no vote. libzmq
                    # does not retry a refused handshake, so we do, now and
                    # then, in case the key has been allowed since.
                    if dealer is not None and now - refused > self.liveness_timeout:
                        self._disconnect(dealer, poller)
                        dealer = self._connect(record, poller)
                        # The next try in a window's time, whatever comes of it.
                        self._key_refused_at = now
                    state = MasterState.CONNECTING
                else:
                    self._master_ok.clear()
                    self._problem = f"master state {state.value}"
                if state in (MasterState.NONE, MasterState.HUNG) and calls:
                    self._master_lost(calls, f"master of this host {state.value}", now)
                if state is MasterState.HUNG and record is not None:
                    self._on_hung(
                        election,
                        record,
                        watch.silent_for(now),
                        voted_epoch != record.epoch,
                        reported_epoch != record.epoch,
                    )
                    voted_epoch = reported_epoch = record.epoch
                # -- heartbeats and WORKING ----------------------------------
                if dealer is not None:
                    self._send(dealer, [b"HB", me])
                    for bid in working:
                        self._send(dealer, [b"WORKING", bid.encode()])
            wake_at = next_tick
            for call in list(calls.values()):
                call.tracker.tick(now)
                if call.tracker.done:
                    self._settle(calls, call)
                else:
                    wake_at = min(wake_at, call.tracker.deadline)
            if answers and dealer is not None:
                self._send_answers(dealer, answers, now)
            if self._finished:
                if dealer is not None:
                    for bid_raw in self._finished:
                        self._send(dealer, [b"DONE", bid_raw])
                self._finished.clear()
            if answers:
                wake_at = min(wake_at, now + 0.01)
            wait = max(0.0, wake_at - time.monotonic())
            ready = dict(poller.poll(int(wait * 1000) + 1))
            now = time.monotonic()
            if self._monitor is not None and self._monitor in ready:
                self._on_monitor(self._monitor, now)
            if dealer is not None and dealer in ready:
                while True:
                    try:
                        frames = recv_nowait(dealer)
                    except zmq.Again:
                        break
                    kind = frames[0]
                    watch.heard(now)
                    if kind == b"REQ":
                        bid = frames[1].decode()
                        # The first WORKING goes out with the next heartbeat:
                        # most handlers reply before that, and an immediate
                        # one doubled the messages of every broadcast.
                        if bid not in working:
                            working.add(bid)
                            self._jobs.put((bid, frames[3]))
                    elif kind == b"EV":
                        target = calls.get(frames[1].decode())
                        if target is not None:
                            self._on_event(calls, target, frames, now)
                    elif kind == b"HB":
                        self._refused = None
                    elif kind == b"REFUSED":
                        reason = frames[1].decode(errors="replace")
                        if self._refused is None:
                            log.warning("member %s refused: %s", self.info.id, reason)
                        self._refused = reason
                    elif kind == b"RESIGN":
                        log.info("master of pool %r resigned", self.pool)
                        next_tick = now
            if results in ready:
                while True:
                    try:
                        bid_raw, status, body = recv_nowait(results)
                    except zmq.Again:
                        break
                    working.discard(bid_raw.decode())
                    if dealer is not None:
                        kind = b"REPLY" if status == b"ok" else b"FAILED"
                        answers.add([kind, bid_raw, body], now + self.liveness_timeout)
                if answers and dealer is not None:
                    self._send_answers(dealer, answers, now)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                while True:
                    try:
                        call = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if dealer is None or not self._master_ok.is_set():
                        call.done.set_exception(
                            MasterUnavailable(
                                f"pool {self.pool!r} has no usable master on "
                                f"{self.host}: {self._problem}"
                            )
                        )
                    elif not self._send(dealer, [b"BCAST", call.header, call.payload]):
                        call.done.set_exception(
                            MasterUnavailable("master send queue full")
                        )
                    else:
                        calls[call.tracker.broadcast_id] = call
        return dealer

    def _become_master(self, election: Election) -> None:
        directory = self._make_directory()
        master = Master(
            self._context,
            self.pool,
            self.host,
            self.info.id,
            election,
            directory,
            self.interval,
            self.settings.heartbeat_liveness,
            self.curve,
            max_members=self.settings.max_pool_members,
            max_pending=self.settings.max_pending_broadcasts,
            max_message_size=self.settings.max_message_size,
        )
        try:
            if self.curve is not None and self._auth is None:
                self._auth = ServerAuth(self._context, self.curve).start()
            record = master.start()
        except Exception as exc:
            log.warning("could not become master of pool %r: %s", self.pool, exc)
            election.release()
            return
        self._master = master
        log.info(
            "this member is now master of pool %r (epoch %d)", self.pool, record.epoch
        )

    def _make_directory(self) -> MasterDirectory | None:
        spec = self._directory_spec
        if spec == "dns":
            if self._dns_directory is None:
                try:
                    self._dns_directory = DnsDirectory.from_settings(self.settings)
                except Exception as exc:
                    log.warning("no DNS directory for pool %r: %s", self.pool, exc)
                    return None
            # One registrar for every term as master: it is made to be shared.
            return self._dns_directory
        if isinstance(spec, str):
            raise PoolError(f"unknown directory {spec!r}")
        return spec

    def _connect(self, record: MasterRecord, poller: zmq.Poller) -> zmq.Socket[bytes]:
        dealer: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, self.info.id.encode())
        dealer.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            self.curve.client(dealer)
            self._monitor = dealer.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
            )
            poller.register(self._monitor, zmq.POLLIN)
        dealer.connect(record.endpoint)
        poller.register(dealer, zmq.POLLIN)
        log.info(
            "member %s follows master pid %d of pool %r (epoch %d)",
            self.info.id,
            record.pid,
            self.pool,
            record.epoch,
        )
        return dealer

    def _disconnect(self, dealer: zmq.Socket[bytes], poller: zmq.Poller) -> None:
        poller.unregister(dealer)
        if self._monitor is not None:
            poller.unregister(self._monitor)
            dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        dealer.close(linger=0)

    def _on_monitor(self, monitor: zmq.Socket[bytes], now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if self._key_refused_at is None:
                    log.warning(
                        "member %s: the master of pool %r refused our Curve key",
                        self.info.id,
                        self.pool,
                    )
                self._key_refused_at = now
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._key_refused_at = None

    def _on_hung(
        self,
        election: Election,
        record: MasterRecord,
        silent: float,
        first_time: bool,
        report: bool,
    ) -> None:
        if record.pid == self.info.pid:
            return
        if not self.settings.kill_hung_master:
            self._hung = True
            self._problem = (
                f"master pid {record.pid} of pool {self.pool!r} on {self.host} is "
                f"hung (silent {silent:.1f}s) and kill_hung_master is off"
            )
            if report:
                log.warning("%s", self._problem)
                election.vote(record.epoch)
            return
        if first_time:
            log.warning(
                "master pid %d of pool %r silent for %.1fs: voting it hung",
                record.pid,
                self.pool,
                silent,
            )
        election.vote(record.epoch)
        voters = election.votes(record.epoch)
        live = election.live_members()
        if kill_quorum(voters, live, record.member_id) and election.claim_kill(
            record.epoch, time.monotonic(), self.liveness_timeout
        ):
            election.kill_master(record)

    def _on_event(
        self, calls: dict[str, _Call], call: _Call, frames: list[bytes], now: float
    ) -> None:
        try:
            # [EV, bid, (header, payload)...]: events arrive batched.
            for i in range(2, len(frames) - 1, 2):
                event = decode(frames[i])
                if event.get("ev") == "rejected":
                    del calls[call.tracker.broadcast_id]
                    call.done.set_exception(BroadcastRejected(str(event["reason"])))
                    return
                _feed(call.tracker, event, frames[i + 1], now)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("dropping malformed pool event: %s", exc)
            return
        if call.tracker.done:
            self._settle(calls, call)

    def _settle(self, calls: dict[str, _Call], call: _Call) -> None:
        # Later events for this id find no call and are dropped; the master
        # hears it too, so it stops relaying them and frees the slot.
        del calls[call.tracker.broadcast_id]
        self._finished.append(call.tracker.broadcast_id.encode())
        call.done.set_result(call.tracker.result())

    def _master_lost(self, calls: dict[str, _Call], reason: str, now: float) -> None:
        for call in list(calls.values()):
            call.tracker.on_master_lost(call.tracker.broadcast_id, reason, now)
            self._settle(calls, call)

    def _send_answers(
        self, dealer: zmq.Socket[bytes], answers: _Answers, now: float
    ) -> None:
        for frames in answers.flush(lambda f: self._send(dealer, f), now):
            log.warning(
                "member %s: answer to broadcast %s dropped: the master of pool "
                "%r took no message for %.1fs",
                self.info.id,
                frames[1].decode(errors="replace"),
                self.pool,
                self.liveness_timeout,
            )

    def _send(self, dealer: zmq.Socket[bytes], frames: list[bytes]) -> bool:
        try:
            send_nowait(dealer, frames)
        except zmq.Again:
            # Heartbeats hit this every tick while the master is unreachable
            # (or refuses our Curve key): say so once per spell, not per beat.
            level = logging.DEBUG if self._send_blocked else logging.WARNING
            self._send_blocked = True
            log.log(
                level,
                "member %s: cannot queue to the master of pool %r (unreachable, "
                "or it refused our Curve key); message not sent",
                self.info.id,
                self.pool,
            )
            return False
        self._send_blocked = False
        return True


def _feed(
    tracker: GatherTracker, event: dict[str, Any], payload: bytes, now: float
) -> None:
    bid = str(event.get("bid"))
    kind = event.get("ev")
    if kind == "hosts":
        tracker.on_hosts(bid, event["forwarded"], event["unreachable"], now)
    elif kind == "expect":
        members = [MemberInfo.from_wire(m) for m in event["members"]]
        tracker.on_expect(bid, str(event["host"]), members, now)
    elif kind == "working":
        tracker.on_working(bid, str(event["member"]), now)
    elif kind == "reply":
        tracker.on_reply(bid, str(event["member"]), payload, now)
    elif kind == "failed":
        tracker.on_failed(bid, str(event["member"]), str(event["reason"]), now)
    elif kind == "undeliverable":
        tracker.on_undeliverable(bid, str(event["member"]), str(event["reason"]), now)
    elif kind == "host_lost":
        tracker.on_host_lost(bid, str(event["host"]), str(event["reason"]), now)
    elif kind == "master_lost":
        tracker.on_master_lost(bid, str(event["reason"]), now)


def demo_handler(host: str) -> Callable[[bytes], bytes]:
    """A handler for tests and demos, steered by the payload.

    ``sleep:<seconds>:<rest>`` sleeps first; ``fail:<text>`` raises. The reply
    is ``<host>/<pid>:`` followed by the payload.
    """
    prefix = f"{host}/{os.getpid()}:".encode()

    def handle(payload: bytes) -> bytes:
        if payload.startswith(b"sleep:"):
            _, seconds, _ = payload.split(b":", 2)
            time.sleep(float(seconds))
        elif payload.startswith(b"fail:"):
            raise RuntimeError(payload[5:].decode(errors="replace"))
        return prefix + payload

    return handle


def main(argv: list[str] | None = None) -> int:
    """``python -m mesh.pool.member``: run one member until SIGTERM/SIGINT."""
    from mesh.cli import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="python -m mesh.pool.member")
    add_member_arguments(parser)
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    return run_member(args, settings_from_args(args, **settings_overrides(args)))


def add_member_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="pool name")
    parser.add_argument(
        "--host", default="127.0.0.1", help="this host's address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--no-dns",
        action="store_true",
        help="do not look for masters of other hosts (a single-host pool)",
    )
    parser.add_argument(
        "--directory-dir",
        help="find other hosts' masters through files in this shared directory "
        "instead of DNS",
    )
    parser.add_argument("--heartbeat-interval", type=float, help="seconds")
    parser.add_argument("--heartbeat-liveness", type=int, help="missed heartbeats")
    parser.add_argument(
        "--no-kill-hung-master",
        action="store_true",
        help="report a hung master instead of killing it",
    )


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "heartbeat_interval": args.heartbeat_interval,
        "heartbeat_liveness": args.heartbeat_liveness,
        "kill_hung_master": False if args.no_kill_hung_master else None,
    }


def directory_from_args(args: argparse.Namespace) -> MasterDirectory | None | str:
    if args.no_dns:
        return None
    if args.directory_dir:
        return FileDirectory(args.directory_dir)
    return "dns"


def run_member(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    member = PoolMember(
        args.pool,
        settings,
        demo_handler(args.host),
        args.host,
        directory=directory_from_args(args),
    )
    member.start()
    print(json.dumps({"member": member.info.id, "pid": member.info.pid}), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        member.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
