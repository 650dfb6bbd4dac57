"""Scenarios every client must pass: each runs with the blocking and the asyncio client."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from mesh.errors import (
    HitClosed,
    HitLost,
    HitTimeout,
    MessageTooLarge,
    NoTargetAvailable,
    RemoteError,
)
from mesh.hit import protocol
from mesh.hit.protocol import Kind
from mesh.hit.server import HitServer

from .conftest import Recorder

Driver = Callable[..., Any]


def free_endpoint() -> str:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A zmq ROUTER that accepts connections and never answers."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    sock.close()
    ctx.term()


def test_call_returns_reply_and_sees_metadata(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint)
    with driver.open({"user": "ana"}) as hit:
        assert hit.call("meta").json() == {"user": "ana"}
        assert hit.call("echo", b"a", "b", bytearray(b"c")).frames == (b"a", b"b", b"c")
        assert hit.call("echo").frames == ()


def test_every_call_of_a_hit_runs_on_one_thread_with_100_hits_at_once(
    make_server: Callable[..., HitServer], make_driver: Driver
) -> None:
    server = make_server(Recorder, max_hits=200)
    driver = make_driver(server.endpoint)
    Recorder.events.clear()
    n = 100
    barrier = threading.Barrier(n, timeout=60)
    seen: dict[int, set[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with driver.open({"i": i}) as hit:
                threads = {hit.call("thread").text() for _ in range(3)}
                barrier.wait()  # every Hit is open at this point
                threads |= {hit.call("thread").text() for _ in range(3)}
                seen[i] = {int(t) for t in threads}
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors, errors[:3]
    assert all(len(threads) == 1 for threads in seen.values())
    # Open at the same time, so no two Hits may share a thread.
    assert len({next(iter(t)) for t in seen.values()}) == n
    # The handler was built and closed on the thread that ran its calls.
    for threads in seen.values():
        (thread,) = threads
        ran = [what for what, t in Recorder.events if t == thread]
        assert ran == ["open"] + ["call"] * 6 + ["close"]


def test_handler_exception_names_type_and_message_and_hit_stays_usable(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint)
    with driver.open() as hit:
        with pytest.raises(RemoteError) as info:
            hit.call("fail", "no such blob")
        assert info.value.type_name == "ValueError"
        assert info.value.remote_message == "no such blob"
        with pytest.raises(RemoteError, match="NoSuchMethod"):
            hit.call("_log", "x")
        with pytest.raises(RemoteError, match="NoSuchMethod"):
            hit.call("close")
        assert hit.call("echo", b"ok").bytes() == b"ok"


def test_failover_past_a_closed_port(server: HitServer, make_driver: Driver) -> None:
    driver = make_driver(free_endpoint(), server.endpoint, open_timeout=0.5)
    with driver.open() as hit:
        assert hit.endpoint == server.endpoint


def test_failover_past_a_silent_target(
    server: HitServer, silent_endpoint: str, make_driver: Driver
) -> None:
    driver = make_driver(silent_endpoint, server.endpoint, open_timeout=0.5)
    with driver.open() as hit:
        assert hit.endpoint == server.endpoint


def test_failover_past_a_busy_target(
    make_server: Callable[..., HitServer], make_driver: Driver
) -> None:
    full = make_server(Recorder, max_hits=1)
    spare = make_server(Recorder)
    driver = make_driver(full.endpoint, spare.endpoint)
    with driver.open() as first:
        assert first.endpoint == full.endpoint
        with driver.open() as second:
            assert second.endpoint == spare.endpoint
            # The existing Hit keeps working while its server is at the cap.
            assert first.call("echo", b"still").bytes() == b"still"


def test_no_target_lists_what_each_target_answered(
    make_server: Callable[..., HitServer], silent_endpoint: str, make_driver: Driver
) -> None:
    full = make_server(Recorder, max_hits=1)
    closed = free_endpoint()
    driver = make_driver(
        closed, silent_endpoint, full.endpoint, open_timeout=0.3, open_attempts=2
    )
    with driver.open():
        with pytest.raises(NoTargetAvailable) as info:
            driver.open()
    # Two passes (BUSY is worth a retry), each naming the three targets;
    # targets found dead by the first Hit are tried last.
    tried = [t for t, _ in info.value.attempts]
    assert tried == [full.endpoint, closed, silent_endpoint] * 2
    text = str(info.value)
    assert "refused or unreachable" in text
    assert "no answer" in text
    assert "BUSY" in text


def test_call_timeout_ends_the_hit_and_a_new_hit_works(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint, call_timeout=0.3)
    hit = driver.open()
    with pytest.raises(HitTimeout):
        hit.call("sleep", "1.0")
    # The REQ trap (C01) never surfaces: the Hit is simply over.
    with pytest.raises(HitClosed):
        hit.call("echo", b"x")
    hit.close()
    with driver.open() as again:
        assert again.call("echo", b"x").bytes() == b"x"


def test_a_long_call_is_kept_alive_by_pings(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint, ping_interval=0.1, liveness_timeout=0.4)
    with driver.open() as hit:
        assert hit.call("sleep", "1.0").text() == "slept"


def test_oversized_call_is_refused_before_sending(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint, max_message_size=1000)
    with driver.open() as hit:
        with pytest.raises(MessageTooLarge) as info:
            hit.call("echo", bytes(2000))
        assert info.value.limit == 1000
        assert hit.call("echo", bytes(100)).bytes() == bytes(100)


def test_256_mib_round_trip_is_byte_identical(
    server: HitServer, make_driver: Driver
) -> None:
    payload = bytearray(256 * 1024 * 1024)
    for i in range(0, len(payload), 4096):
        payload[i : i + 8] = i.to_bytes(8, "little")
    driver = make_driver(server.endpoint, call_timeout=60)
    with driver.open() as hit:
        reply = hit.call("echo", memoryview(payload), b"tail")
        assert reply[0].nbytes == len(payload)
        assert hashlib.sha256(reply[0]).digest() == hashlib.sha256(payload).digest()
        assert reply.bytes(1) == b"tail"


@pytest.mark.slow
def test_1_gib_round_trip_is_not_mistaken_for_a_silent_server(
    server: HitServer, make_driver: Driver
) -> None:
    payload = bytearray(1024**3)
    for i in range(0, len(payload), 4096):
        payload[i : i + 8] = i.to_bytes(8, "little")
    digest = hashlib.sha256(payload).digest()
    # Either way the transfer takes far longer than this liveness timeout;
    # only silence that the transfer does not explain may count.
    driver = make_driver(
        server.endpoint, call_timeout=300, ping_interval=0.1, liveness_timeout=0.5
    )
    with driver.open() as hit:
        reply = hit.call("echo", memoryview(payload))
        del payload
        assert reply[0].nbytes == 1024**3
        assert hashlib.sha256(reply[0]).digest() == digest
        del reply


def test_a_server_gone_between_calls_is_lost_within_the_liveness_timeout(
    make_server: Callable[..., HitServer], make_driver: Driver
) -> None:
    server = make_server(Recorder)
    driver = make_driver(server.endpoint, call_timeout=60, liveness_timeout=1.0)
    hit = driver.open()
    assert hit.call("echo", b"x").bytes() == b"x"
    server.close()
    start = time.monotonic()
    with pytest.raises(HitLost) as info:
        hit.call("echo", b"y")
    assert not isinstance(info.value, HitTimeout)
    # Liveness is 1 s; the call timeout of 60 s must play no part.
    assert time.monotonic() - start < 1.0 + 5.0
    hit.close()


def test_a_reply_over_the_clients_limits_is_an_error_not_a_timeout(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(
        server.endpoint, max_message_size=1000, max_frames=8, call_timeout=20
    )
    with driver.open() as hit:
        with pytest.raises(RemoteError) as info:
            hit.call("big", "2000")
        assert info.value.type_name == "MessageTooLarge"
        assert "2000 bytes" in info.value.remote_message
        with pytest.raises(RemoteError, match="MessageTooLarge"):
            hit.call("many", "8")  # with the header: 9 frames
        assert hit.call("big", "1000").bytes() == bytes(1000)
        assert len(hit.call("many", "7")) == 7


def test_a_call_over_the_frame_limit_is_refused_before_sending(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint, max_frames=8)
    with driver.open() as hit:
        with pytest.raises(MessageTooLarge, match="9 frames") as info:
            hit.call("echo", *[b"x"] * 7)  # header, method and 7 arguments
        assert info.value.limit == 8
        assert len(hit.call("echo", *[b"x"] * 6)) == 6


def test_oversized_open_metadata_is_refused_before_sending(
    server: HitServer, make_driver: Driver
) -> None:
    driver = make_driver(server.endpoint, max_message_size=1000)
    with pytest.raises(MessageTooLarge) as info:
        driver.open({"blob": "x" * 2000})
    assert info.value.limit == 1000
    assert len(server.table) == 0
    with driver.open({"blob": "x" * 100}) as hit:
        assert hit.call("echo", b"ok").bytes() == b"ok"


class GoesSilent:
    """A fake server that answers the first OPEN, then nothing ever again."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.opens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            peer, *frames = self.router.recv_multipart()
            message = protocol.decode(frames)
            if message.kind is Kind.OPEN:
                self.opens += 1
                if self.opens == 1:
                    ok = protocol.encode(Kind.OK, 77, message.request_id)
                    self.router.send_multipart([peer, *ok])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.router.close()
        self.ctx.term()


def test_a_lost_server_is_tried_last_by_the_next_open(
    server: HitServer, make_driver: Driver
) -> None:
    silent = GoesSilent()
    try:
        driver = make_driver(
            silent.endpoint,
            server.endpoint,
            ping_interval=0.1,
            liveness_timeout=0.5,
            open_timeout=2.0,
        )
        hit = driver.open()
        assert hit.endpoint == silent.endpoint
        with pytest.raises(HitLost):
            hit.call("echo", b"x")
        hit.close()
        with driver.open() as again:
            assert again.endpoint == server.endpoint
        # Marked down, so the next open did not even ask it.
        assert silent.opens == 1
    finally:
        silent.close()
