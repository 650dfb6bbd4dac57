"""Server behaviour seen through raw sockets and the blocking client."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from mesh.config import Settings
from mesh.errors import HitLost, NoTargetAvailable, WrongThread
from mesh.hit import protocol
from mesh.hit.aio import AsyncClient, AsyncHit
from mesh.hit.client import Client
from mesh.hit.protocol import Kind
from mesh.hit.server import HitServer

from .conftest import Recorder, StaticResolver


def client_for(*servers: HitServer | str, **options: Any) -> Client:
    endpoints = [s if isinstance(s, str) else s.endpoint for s in servers]
    return Client(
        "_test._tcp.mesh.internal.", resolver=StaticResolver(*endpoints), **options
    )


@pytest.fixture
def raw() -> Iterator[Callable[[str], zmq.Socket[bytes]]]:
    ctx = zmq.Context()
    socks: list[zmq.Socket[bytes]] = []

    def connect(endpoint: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(endpoint)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close()
    ctx.term()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_malformed_frames_get_an_error_or_are_dropped_and_others_keep_working(
    server: HitServer, raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    with client_for(server) as client, client.hit() as hit:
        peer = raw(server.endpoint)
        # Garbage without a readable header: dropped, nothing comes back.
        for frames in ([b""], [b"hello"], [b"x" * 100, b"y"]):
            peer.send_multipart(frames)
        # A readable header with bad frames: an ERROR naming the problem.
        bad = [
            [protocol.encode_header(Kind.CALL, hit.hit_id, 5)],
            [protocol.encode_header(Kind.OPEN, 0, 6), b"not json"],
            [protocol.encode_header(Kind.REPLY, hit.hit_id, 7)],
            [protocol.encode_header(Kind.CALL, hit.hit_id, 8), b"echo"],  # not its Hit
            [protocol.encode_header(Kind.CALL, 12345, 9), b"echo"],  # unknown Hit
        ]
        for frames in bad:
            peer.send_multipart(frames)
            answer = protocol.decode(peer.recv_multipart())
            assert answer.kind is Kind.ERROR
            assert answer.request_id == protocol.decode_header(frames[0]).request_id
        assert hit.call("echo", b"fine").bytes() == b"fine"


def test_an_oversized_peer_cannot_take_the_server_down(
    make_server: Callable[..., HitServer], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    server = make_server(Recorder, max_message_size=1024)
    with client_for(server) as client, client.hit() as hit:
        peer = raw(server.endpoint)
        # One frame past MAXMSGSIZE: libzmq drops that peer's connection.
        peer.send_multipart(
            [protocol.encode_header(Kind.CALL, 1, 1), b"echo", bytes(200_000)]
        )
        # Many frames each under the limit: refused by the total size check.
        peer2 = raw(server.endpoint)
        peer2.send_multipart(
            [protocol.encode_header(Kind.CALL, 1, 2), b"echo"] + [bytes(60_000)] * 3
        )
        answer = protocol.decode(peer2.recv_multipart())
        assert answer.kind is Kind.ERROR and "exceeds" in answer.text(1)
        assert hit.call("echo", bytes(500)).bytes() == bytes(500)


def test_idle_hits_are_reaped_with_close_on_their_own_thread(
    make_server: Callable[..., HitServer],
) -> None:
    server = make_server(Recorder, idle_timeout=0.3)
    Recorder.events.clear()
    with client_for(server) as client:
        hit = client.hit()
        thread = int(hit.call("thread").text())
        wait_for(lambda: ("close", thread) in Recorder.events)
        assert {t for _, t in Recorder.events} == {thread}
        wait_for(lambda: len(server.table) == 0)
        with pytest.raises(HitLost, match="no longer knows"):
            hit.call("thread")


def test_cap_answers_busy_while_existing_hits_keep_working(
    make_server: Callable[..., HitServer],
) -> None:
    server = make_server(Recorder, max_hits=2)
    with client_for(server, open_attempts=1) as client:
        with client.hit() as a, client.hit() as b:
            with pytest.raises(NoTargetAvailable, match="BUSY"):
                client.hit()
            assert a.call("echo", b"a").bytes() == b"a"
            assert b.call("echo", b"b").bytes() == b"b"
        with client.hit() as c:
            assert c.call("echo", b"c").bytes() == b"c"


class FakeRegistrar:
    def __init__(self) -> None:
        self.log: list[str] = []

    def register(
        self,
        srv_name: str,
        target: str,
        port: int,
        addresses: Any,
        priority: int = 0,
        weight: int = 1,
    ) -> Any:
        self.log.append(
            f"register {srv_name} {target} {port} {list(addresses)} {priority} {weight}"
        )
        registrar = self

        class Registration:
            def close(self) -> None:
                registrar.log.append("deregister")

        return Registration()


def test_drain_deregisters_first_refuses_opens_and_lets_open_hits_finish(
    make_server: Callable[..., HitServer],
) -> None:
    registrar = FakeRegistrar()
    server = make_server(
        Recorder,
        registrar=registrar,
        srv_name="_t._tcp.z.",
        target="h.z.",
        priority=3,
        weight=7,
    )
    assert registrar.log == [
        f"register _t._tcp.z. h.z. {server.port} ['127.0.0.1'] 3 7"
    ]
    with client_for(server, open_attempts=1) as client:
        hit = client.hit()
        server.drain()
        wait_for(lambda: registrar.log[-1] == "deregister")
        with pytest.raises(NoTargetAvailable, match="draining"):
            client.hit()
        assert hit.call("echo", b"still").bytes() == b"still"
        assert not server.wait(0.2)
        hit.close()
        assert server.wait(10)
    assert registrar.log.count("deregister") == 1


def test_drain_gives_up_on_open_hits_after_the_drain_timeout(
    make_server: Callable[..., HitServer],
) -> None:
    server = make_server(Recorder, drain_timeout=0.3)
    Recorder.events.clear()
    with client_for(server) as client:
        hit = client.hit()
        server.drain()
        assert server.wait(10)
        assert [e for e, _ in Recorder.events] == ["open", "close"]
        with pytest.raises(HitLost):
            hit.call("echo", b"x", timeout=1)


def test_a_hit_used_from_another_thread_raises_wrong_thread(server: HitServer) -> None:
    with client_for(server) as client, client.hit() as hit:
        caught: list[BaseException] = []

        def intruder() -> None:
            try:
                hit.call("echo", b"x")
            except BaseException as exc:
                caught.append(exc)

        t = threading.Thread(target=intruder)
        t.start()
        t.join(10)
        assert len(caught) == 1 and isinstance(caught[0], WrongThread)
        assert hit.call("echo", b"mine").bytes() == b"mine"


def test_a_stale_reply_is_dropped_never_returned() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_server() -> None:
        peer, *frames = router.recv_multipart()
        opened = protocol.decode(frames)
        router.send_multipart([peer, *protocol.encode(Kind.OK, 77, opened.request_id)])
        peer, *frames = router.recv_multipart()
        call = protocol.decode(frames)
        # An old answer, one for another Hit, then the real one.
        router.send_multipart(
            [peer, *protocol.encode(Kind.REPLY, 77, call.request_id - 1, [b"stale"])]
        )
        router.send_multipart(
            [peer, *protocol.encode(Kind.REPLY, 78, call.request_id, [b"alien"])]
        )
        router.send_multipart(
            [peer, *protocol.encode(Kind.REPLY, 77, call.request_id, [b"fresh"])]
        )

    t = threading.Thread(target=fake_server)
    t.start()
    try:
        with client_for(f"tcp://127.0.0.1:{port}") as client:
            hit = client.hit()
            assert hit.call("anything").bytes() == b"fresh"
            hit._abandon()
    finally:
        t.join(10)
        router.close()
        ctx.term()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_5000_sequential_hits_leave_the_fd_count_where_it_started(
    make_server: Callable[..., HitServer],
) -> None:
    server = make_server(Recorder)
    with client_for(server) as client:
        with client.hit() as hit:  # warm up the context's I/O thread
            hit.call("echo", b"x")
        before = open_fds()
        for _ in range(5000):
            with client.hit() as hit:
                hit.call("echo", b"x")
        wait_for(lambda: abs(open_fds() - before) <= 16, timeout=15)


def test_a_reconnect_keeps_the_hit(server: HitServer) -> None:
    with client_for(server) as client, client.hit() as hit:
        thread = hit.call("thread").text()
        sock = hit._sock
        assert sock is not None
        # A new TCP connection, as after a network blip.
        sock.disconnect(server.endpoint)
        sock.connect(server.endpoint)
        # What was in flight during the switch may be lost (zmq delivers at
        # most once), so let the new connection settle before calling.
        time.sleep(0.5)
        assert hit.call("thread", timeout=10).text() == thread


def test_hit_sockets_have_zmtp_heartbeats_off(server: HitServer) -> None:
    # C09: liveness is our PING/PONG, which knows a long call from a dead peer.
    with client_for(server) as client, client.hit() as hit:
        assert hit._sock is not None
        assert hit._sock.getsockopt(zmq.HEARTBEAT_IVL) == 0

    async def main() -> None:
        async with AsyncClient(
            "_t._tcp.z.", resolver=StaticResolver(server.endpoint)
        ) as client:
            async with client.hit() as hit:
                assert hit._sock is not None
                assert hit._sock.getsockopt(zmq.HEARTBEAT_IVL) == 0

    asyncio.run(main())


def test_too_many_frames_get_an_error_or_are_dropped_and_others_keep_working(
    make_server: Callable[..., HitServer], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    server = make_server(Recorder, max_frames=16)
    with client_for(server) as client, client.hit() as hit:
        peer = raw(server.endpoint)
        peer.send_multipart([b"garbage"] * 100_000)
        header = protocol.encode_header(Kind.CALL, hit.hit_id, 5)
        peer.send_multipart([header, b"echo", *[b"x"] * 15])  # 17 frames
        answer = protocol.decode(peer.recv_multipart())
        assert answer.kind is Kind.ERROR and answer.request_id == 5
        assert "17 frames exceeds the limit of 16" in answer.text(1)
        assert not peer.poll(300)  # nothing for the garbage
        assert len(hit.call("echo", *[b"x"] * 14)) == 14  # 16 frames: fine


def test_settings_carry_max_frames_from_the_environment() -> None:
    assert Settings.load(env={}).max_frames == 1024
    assert Settings.load(env={"MESH_MAX_FRAMES": "7"}).max_frames == 7


@pytest.mark.slow
def test_ctrl_c_interrupts_a_blocked_call_and_the_server_reaps_the_hit(
    server: HitServer,
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT raises KeyboardInterrupt on the main thread only")
    with client_for(server) as client:
        hit = client.hit()
        sent: list[float] = []

        def interrupt() -> None:
            wait_for(lambda: any(h.state.value == "calling" for h in hits()))
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

        def hits() -> list[Any]:
            return list(server.table.hits.values())

        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            hit.call("sleep", "3")
        # Polls are 0.1 s slices; allow plenty for a loaded machine.
        assert time.monotonic() - sent[0] < 1.5
        assert hit.closed
        # The CLOSE sent on the way out lets the server reap it after the call.
        wait_for(lambda: len(server.table) == 0, timeout=15)
        with client.hit() as again:
            assert again.call("echo", b"x").bytes() == b"x"


def test_cancelling_a_task_mid_call_ends_cleanly_and_the_server_reaps_the_hit(
    server: HitServer,
) -> None:
    async def main() -> None:
        async with AsyncClient(
            "_t._tcp.z.", resolver=StaticResolver(server.endpoint)
        ) as client:
            opened: list[AsyncHit] = []

            async def use() -> None:
                hit = await client.open()
                opened.append(hit)
                await hit.call("sleep", "1.5")

            task = asyncio.create_task(use())
            deadline = time.monotonic() + 10
            while not any(
                h.state.value == "calling" for h in server.table.hits.values()
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - cancelled_at < 1.5
            assert opened[0].closed

    asyncio.run(main())
    wait_for(lambda: len(server.table) == 0, timeout=15)


def test_an_async_hit_used_from_another_task_raises_wrong_thread(
    server: HitServer,
) -> None:
    async def main() -> None:
        async with AsyncClient(
            "_t._tcp.z.", resolver=StaticResolver(server.endpoint)
        ) as client:
            async with client.hit() as hit:
                with pytest.raises(WrongThread):
                    await asyncio.create_task(hit.call("echo", b"x"))
                assert (await hit.call("echo", b"mine")).bytes() == b"mine"

    asyncio.run(main())


def test_async_pings_to_a_gone_server_leave_no_unread_failed_futures(
    server: HitServer,
) -> None:
    unread: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unread.append(context)
        )
        async with AsyncClient(
            "_t._tcp.z.",
            resolver=StaticResolver(server.endpoint),
            ping_interval=0.05,
            liveness_timeout=1.0,
        ) as client:
            hit = await client.open()
            closer = threading.Thread(target=lambda: (time.sleep(0.3), server.close()))
            closer.start()
            # Pings and the final CLOSE go out while nothing is connected.
            with pytest.raises(HitLost):
                await hit.call("sleep", "2")
            closer.join(10)
            gc.collect()
            await asyncio.sleep(0.1)

    asyncio.run(main())
    gc.collect()
    assert not unread, [c.get("message") for c in unread]


def test_a_message_the_server_fails_on_is_dropped_and_the_loop_goes_on(
    server: HitServer,
    raw: Callable[[str], zmq.Socket[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = server.table.from_client
    poisoned = protocol.encode_header(Kind.OPEN, 0, 77)

    def from_client(peer: bytes, header: Any, now: float) -> Any:
        # Stands for any bug a strange message could still reach.
        if header.request_id == 77:
            raise RuntimeError("a bug")
        return real(peer, header, now)

    monkeypatch.setattr(server.table, "from_client", from_client)
    peer = raw(server.endpoint)
    peer.send_multipart([poisoned, b"{}"])
    with client_for(server) as client, client.hit() as hit:
        assert hit.call("echo", b"still serving").bytes() == b"still serving"
    assert "could not be handled" in caplog.text
